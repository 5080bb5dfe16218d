"""The contiguous-chunk baseline: KVMessage.restrict, the gold log-likelihood it is chosen by, and the grid cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvcomm.chunk import best_chunk, gold_log_likelihood
from kvcomm.errors import LayerSelectionError, TaskError
from kvcomm.evaluation import EvalConfig, run_grid
from kvcomm.generation import GenerationSettings
from kvcomm.message import encode_context
from kvcomm.tasks import Example, get_task
from tests.conftest import FACTS_EXAMPLE, context_and_query, receiver_logits, tiny_llama

OTHER = Example.qa(context="The lamp is green. Ada owns a boat.", question="What colour is the lamp?",
                   answers=["green"], answer_prefix="The lamp is")


@pytest.fixture(scope="module")
def six() -> object:
    return tiny_llama(seed=3, layers=6)


def test_restrict_equals_encoding_the_subset(six):
    context, query = context_and_query(six)
    full = encode_context(six, context, range(six.num_layers), sink_tokens=1)
    for layers in [(0, 1, 2, 3, 4, 5), (2, 3), (5,), ()]:
        cut = full.restrict(layers)
        direct = encode_context(six, context, layers, sink_tokens=1)
        assert cut.layers == direct.layers and cut.nbytes == direct.nbytes
        assert sorted(cut.sink_keys) == sorted(direct.sink_keys)
        assert torch.equal(receiver_logits(six, cut, query), receiver_logits(six, direct, query))
    assert full.restrict((2, 3)).nbytes < full.nbytes


def test_restrict_refuses_layers_it_does_not_hold(six):
    context, _ = context_and_query(six)
    partial = encode_context(six, context, (1, 2), sink_tokens=1)
    with pytest.raises(LayerSelectionError, match=r"layers \[3\] are not in this message"):
        partial.restrict((2, 3))
    with pytest.raises(LayerSelectionError, match="already keeps 1 sink"):
        partial.restrict((1,), sink_tokens=2)


def _skyline_gold_log_likelihood(model, example) -> float:
    """The same quantity with context and query in one model: [sender prompt ; receiver prompt ; gold]."""
    context, query = context_and_query(model, example)
    gold = model.tokenizer(" " + example.answers[0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.model(input_ids=torch.cat([context, query, gold], -1)).logits[0]
    start = context.shape[-1] + query.shape[-1] - 1
    log_probs = logits[start:-1].float().log_softmax(-1)
    return float(log_probs.gather(-1, gold[0].unsqueeze(-1)).mean())


def test_gold_log_likelihood_with_every_layer_equals_skyline(six):
    context, _ = context_and_query(six)
    message = encode_context(six, context, range(six.num_layers))
    value = gold_log_likelihood(six, message, FACTS_EXAMPLE)
    assert value == pytest.approx(_skyline_gold_log_likelihood(six, FACTS_EXAMPLE), abs=1e-4)
    no_layers = gold_log_likelihood(six, message.restrict(()), FACTS_EXAMPLE)
    assert abs(no_layers - value) > 1e-3  # the shared KV matters
    with pytest.raises(TaskError, match="no gold answer"):
        gold_log_likelihood(six, message, Example.qa(context="x y", question="z?", answers=[]))


def test_best_chunk_is_the_argmax_of_independently_encoded_blocks(six):
    items = [FACTS_EXAMPLE, OTHER]
    choice = best_chunk(six, six, items, size=2)
    assert sorted(choice.scores) == [0, 1, 2, 3, 4]
    for start, score in choice.scores.items():
        block = (start, start + 1)
        direct = [gold_log_likelihood(six, encode_context(six, context_and_query(six, e)[0], block), e) for e in items]
        assert score == pytest.approx(sum(direct) / 2, abs=1e-5)
    best = max(choice.scores.values())
    first_best = min(start for start, value in choice.scores.items() if value == best)  # lowest start on ties
    assert choice.layers == (first_best, first_best + 1)
    assert best_chunk(six, six, items, size=6).layers == tuple(range(6))
    with pytest.raises(LayerSelectionError, match="chunk size"):
        best_chunk(six, six, items, size=7)
    with pytest.raises(LayerSelectionError, match="at least one"):
        best_chunk(six, six, [], size=2)


def test_grid_contiguous_cell_uses_the_chosen_block_from_calibration_items_only(tmp_path):
    model = tiny_llama(seed=1, layers=4)
    config = EvalConfig(tasks=["demo"], methods=["contiguous"], ratios=[0.5], limit=2, chunk_calib_size=3,
                        dtype="fp32", output=str(tmp_path / "grid"), generation=GenerationSettings(max_new_tokens=3))
    summary, = run_grid(config, models=(model, model), progress=False, report=False)
    assert summary["method"] == "contiguous-0.5" and summary["n"] == 2
    cell = Path(config.output) / "demo" / "contiguous-0.5"
    chunk = json.loads((Path(config.output) / "demo" / "chunk_2.json").read_text())
    layers = json.loads((cell / "config.json").read_text())["layers"]
    assert layers == chunk["layers"] and layers[1] == layers[0] + 1
    scores = {int(start): value for start, value in chunk["mean_gold_log_likelihood_by_start"].items()}
    assert scores[layers[0]] == max(scores.values())
    split = get_task("demo").load(None)
    assert chunk["calibration_ids"] == [example.id for example in split.calibration[:3]]
    tested = {json.loads(line)["id"] for line in (cell / "predictions.jsonl").read_text().splitlines()}
    assert tested.isdisjoint(chunk["calibration_ids"])
