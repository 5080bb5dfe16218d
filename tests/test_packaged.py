"""Invariants on the packaged SmolLM2-135M-Instruct (30 layers, GQA 9/3, head dim 64), in fp32."""

from __future__ import annotations

import pytest
import torch

from kvcomm.checks import equivalence
from kvcomm.methods import KVComm
from kvcomm.metrics import token_f1
from kvcomm.tasks import get_task
from kvcomm.tasks.base import Example
from tests.conftest import shared_data_dir

pytestmark = pytest.mark.packaged


def test_packaged_fingerprint(packaged):
    fp = packaged.fingerprint
    assert (fp.architecture, fp.num_layers, fp.num_attention_heads, fp.num_kv_heads, fp.head_dim) == \
        ("LlamaForCausalLM", 30, 9, 3, 64)


def test_all_layers_shared_equals_single_model(packaged):
    example = get_task("demo").load().test[0]
    result = equivalence(packaged, packaged, example, max_new_tokens=12)
    # fp32 over 30 layers: the split attention ([C] cached, then [Q]) sums in another order than one pass over [C;Q];
    # measured 6.7e-05 to 1.2e-04 depending on the thread count, against logits of magnitude ~20
    assert result.max_logit_diff < 5e-4
    assert result.tokens_equal and len(result.kvcomm_tokens) > 0


def test_removing_the_kv_changes_hotpotqa_answers(packaged):
    items = [e.with_answer_prefix("The answer is:") for e in get_task("hotpotqa").load(shared_data_dir()).test[:6]]
    with_kv = KVComm(packaged, packaged, range(30))
    without_kv = KVComm(packaged, packaged, ())  # every layer hides the context (sink token only)
    answers = [(with_kv.answer(e).answer, without_kv.answer(e).answer) for e in items]
    changed = sum(a != b for a, b in answers)
    assert changed >= 5, answers
    f1_with = sum(token_f1(a, e.answers[0]) for (a, _), e in zip(answers, items))
    f1_without = sum(token_f1(b, e.answers[0]) for (_, b), e in zip(answers, items))
    assert f1_with > f1_without, answers


def test_packaged_demo_item_needs_the_context(packaged):
    example = Example.qa(context="Alice's code is 4821.", question="What is Alice's code?", answers=["4821"],
                         max_new_tokens=6, answer_prefix="Alice's code is")
    assert "4821" in KVComm(packaged, packaged, range(30)).answer(example).answer
    assert "4821" not in KVComm(packaged, packaged, ()).answer(example).answer
    assert torch.get_default_dtype() == torch.float32


def test_eight_bit_kv_gives_the_unquantized_answers_on_countries(packaged):
    from kvcomm.methods.qkvcomm import QKVComm
    from kvcomm.quant import KVQuantConfig

    items = get_task("countries").load(shared_data_dir()).test[:10]
    layers = tuple(range(30))
    plain = KVComm(packaged, packaged, layers)
    eight = QKVComm(packaged, packaged, layers, quant=KVQuantConfig(8, 8, group_size=64))
    two = QKVComm(packaged, packaged, layers, quant=KVQuantConfig(2, 2, group_size=64))
    answers = [(plain.answer(e).answer, eight.answer(e).answer, two.answer(e).answer) for e in items]
    assert all(a == b for a, b, _ in answers), answers
    assert any(a != c for a, _, c in answers), answers  # 2 bits does change answers: the KV really is used
