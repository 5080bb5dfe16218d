from __future__ import annotations

import pytest

from kvcomm import wire
from kvcomm.facts import FactsConfig
from kvcomm.methods import KVComm
from kvcomm.methods.qkvcomm import QKVComm, profile_allocation
from kvcomm.prompts import with_side_text
from kvcomm.quant import KVQuantConfig, QuantizedTensor
from kvcomm.tasks import get_task
from kvcomm.tasks.base import Example

EXAMPLE = Example.qa(context="Acme's revenue grew 17% to $4.2 million on 12 March 2024.", question="How much?",
                     answers=["$4.2 million"], max_new_tokens=8)


def test_unquantized_through_the_wire_equals_kvcomm(tiny):
    layers = (0, 2)
    plain = KVComm(tiny, tiny, layers).answer(EXAMPLE)
    packet, _ = QKVComm(tiny, tiny, layers, quant=None).send(EXAMPLE)
    output = QKVComm(tiny, tiny, layers, quant=None).receive(packet, EXAMPLE)
    assert output.answer == plain.answer
    assert output.costs.kv_bytes == len(packet.payload) > plain.costs.kv_bytes  # header on top of the tensors
    assert output.costs.text_bytes == 0


def test_quantized_packet_holds_codes_and_costs_count_payload_and_facts(tiny):
    method = QKVComm(tiny, tiny, (1, 3), quant=KVQuantConfig(2, 2), facts=FactsConfig(budget_tokens=30))
    packet, _ = method.send(EXAMPLE)
    decoded = wire.decode(packet.payload)
    assert all(isinstance(decoded.keys[layer], QuantizedTensor) for layer in (1, 3))
    assert "17%" in packet.facts or "$4.2 million" in packet.facts
    output = method.receive(packet, EXAMPLE)
    assert output.costs.kv_bytes == len(packet.payload)
    assert output.costs.text_bytes == len(packet.facts.encode())
    eight = QKVComm(tiny, tiny, (1, 3), quant=KVQuantConfig(8, 8)).send(EXAMPLE)[0]
    assert len(packet.payload) < len(eight.payload)


def test_facts_go_before_the_question_and_the_context_never_does():
    message = "Instruction: Answer. Question: How much?"
    assert with_side_text(message, "Key facts: 17%") == "Instruction: Answer. Key facts: 17% Question: How much?"
    assert with_side_text(message, "") == message


@pytest.mark.parametrize("measure", ["relative", "kl"])
def test_profiled_allocation_meets_the_target(tiny, measure):
    calibration = get_task("demo").load().calibration[:2]
    allocation = profile_allocation(tiny, tiny, calibration, (0, 1, 2, 3), target_bits=3.0, measure=measure)
    assert allocation.average_bits == pytest.approx(3.0)
    bits = list(allocation.key_bits.values()) + list(allocation.value_bits.values())
    assert sum(bits) / len(bits) == pytest.approx(3.0)
    method = QKVComm(tiny, tiny, (0, 1, 2, 3), allocation=allocation)
    assert method.answer(EXAMPLE).costs.kv_bytes > 0


def test_allocation_without_quant_config_is_refused(tiny):
    allocation = profile_allocation(tiny, tiny, get_task("demo").load().calibration[:1], (0, 1), target_bits=4.0)
    with pytest.raises(ValueError, match="quantization config"):
        QKVComm(tiny, tiny, (0, 1), quant=None, allocation=allocation)


def test_paper_rank_rule_allocation(tiny):
    calibration = get_task("demo").load().calibration[:1]
    allocation = profile_allocation(tiny, tiny, calibration, tuple(range(4)), target_bits=6.0, rule="rank")
    assert sorted(allocation.key_bits.values()) == [4, 6, 6, 8]  # floor(0.3·4) = 1 layer at each end
    assert allocation.key_bits == allocation.value_bits and allocation.average_bits == 6.0
    with pytest.raises(ValueError, match="allocation rule"):
        profile_allocation(tiny, tiny, calibration, (0, 1), target_bits=6.0, rule="other")
