"""Bad input gets a clear error, before any compute where possible."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import IncompatibleModelsError, LayerSelectionError, ModelLoadError, PromptError, TaskError
from kvcomm.message import encode_context
from kvcomm.methods import KVComm, Skyline
from kvcomm.models import load_model
from kvcomm.tasks import get_task
from kvcomm.tasks.base import Example
from tests.conftest import tiny_llama

EXAMPLE = Example.qa(context="Bob lives in Ollerby.", question="Where does Bob live?", answers=["Ollerby"])


@pytest.mark.parametrize("kwargs, field", [({"kv_heads": 4}, "num_kv_heads"), ({"layers": 3}, "num_layers"),
                                           ({"vocab_size": 300}, "vocab_size")])
def test_incompatible_pair_is_refused_before_compute(tiny, kwargs, field):
    other = tiny_llama(seed=1, **kwargs)
    calls = []
    handle = other.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(IncompatibleModelsError, match=field):
            KVComm(other, tiny, (0,))
    finally:
        handle.remove()
    assert calls == []


def test_message_from_incompatible_sender_is_refused(tiny):
    other = tiny_llama(seed=1, kv_heads=4)
    message = encode_context(other, torch.tensor([[0, 5, 6, 7]]), (0,))
    method = KVComm(tiny, tiny, (0,))
    with pytest.raises(IncompatibleModelsError, match="num_kv_heads"):
        method.receive(message, EXAMPLE)


@pytest.mark.parametrize("layers", [(4,), (-1,), (0, 99)])
def test_layer_index_out_of_range(tiny, layers):
    with pytest.raises(LayerSelectionError, match="out of range"):
        KVComm(tiny, tiny, layers)


def test_empty_context_and_question():
    with pytest.raises(PromptError, match="context is empty"):
        Example.qa(context="  ", question="Where?")
    with pytest.raises(PromptError, match="question is empty"):
        Example.qa(context="Bob.", question="")


def test_empty_context_ids(tiny):
    with pytest.raises(PromptError, match="empty"):
        encode_context(tiny, torch.zeros(1, 0, dtype=torch.long), (0,))


def test_unknown_task():
    with pytest.raises(TaskError, match="unknown task 'nope'.*countries"):
        get_task("nope")


def test_context_longer_than_window():
    small = tiny_llama(seed=2, max_positions=64)
    long_example = Example.qa(context="word " * 80, question="Which word?", answers=["word"])
    with pytest.raises(PromptError, match="allows 64"):
        KVComm(small, small, (0,)).answer(long_example)
    with pytest.raises(PromptError, match="allows 64"):
        Skyline(small).answer(long_example)


def test_missing_and_malformed_data_files(tmp_path):
    with pytest.raises(TaskError, match="--data-dir"):
        get_task("countries").load(None)
    with pytest.raises(TaskError, match="countries.jsonl"):
        get_task("countries").load(tmp_path)
    (tmp_path / "countries.jsonl").write_text('{"id": "1", "person": "Uma"}\n')
    with pytest.raises(TaskError, match="missing field.*landmark"):
        get_task("countries").load(tmp_path)
    (tmp_path / "tipsheets.jsonl").write_text("{not json\n")
    with pytest.raises(TaskError, match="tipsheets.jsonl:1: not valid JSON"):
        get_task("tipsheets").load(tmp_path)


def test_missing_model_files(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="int3")
