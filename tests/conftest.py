"""Tiny random models built in-process (no downloads) and the packaged-model fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvcomm.message import KVMessage, receiver_cache
from kvcomm.models import LoadedModel, prepare_model
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, 3 special tokens): any text encodes, 259 ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIALS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, layers: int = 4, kv_heads: int = 2, max_positions: int = 512,
               vocab_size: int = 259, name: str = "tiny") -> LoadedModel:
    """A random Llama with hidden 64, 4 heads (GQA), fp32, eval mode, kvcomm attention."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    return prepare_model(name, model, byte_tokenizer())


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return tiny_llama()


def shared_data_dir() -> Path:
    """``$KVCOMM_DATA_DIR`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("KVCOMM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def packaged() -> LoadedModel:
    from kvcomm.models import load_model

    return load_model("smollm2-135m-instruct", dtype="fp32")


FACTS_EXAMPLE = Example.qa(context="Bob lives in Ollerby. Alice's code is 4821.", question="What is Alice's code?",
                           answers=["4821"], max_new_tokens=12, answer_prefix="Alice's code is")


def context_and_query(model: LoadedModel, example: Example = FACTS_EXAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-wrapped sender and receiver ids ``[1, C]``, ``[1, Q]`` of ``example``."""
    context = chat_ids(model.tokenizer, example.messages["sender"])
    query = chat_ids(model.tokenizer, example.messages["receiver"], example.answer_prefix)
    return context, query


def receiver_logits(model: LoadedModel, message: KVMessage, query: torch.Tensor) -> torch.Tensor:
    """Receiver logits ``[1, Q, vocab]`` over ``query`` while attending to ``message``."""
    mask = torch.ones(1, message.context_length + query.shape[-1], dtype=torch.long)
    with torch.no_grad():
        return model.model(input_ids=query, attention_mask=mask, cache=receiver_cache(message, model)).logits
