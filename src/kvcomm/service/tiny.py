"""A tiny random Llama with a byte-level tokenizer, built in-process (no download): for smoke tests of the service,
Ray actors and ``bench/service_load.py --tiny``. Its answers are gibberish but deterministic for a given seed."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvcomm.models import LoadedModel, prepare_model

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte plus ``<s>``, ``</s>``, ``<pad>`` (259 ids), with a minimal chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0, layers: int = 4, name: str = "tiny-random-llama") -> LoadedModel:
    """A random fp32 Llama (hidden 64, 4 heads, 2 KV heads, ``layers`` layers), ready for kvcomm."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    return prepare_model(name, model, byte_tokenizer())


def save_tiny_model(folder: str | Path, seed: int = 0, layers: int = 4) -> Path:
    """Write :func:`tiny_model` as a model folder that :func:`kvcomm.models.load_model` (and ``serve``) can load."""
    folder = Path(folder)
    loaded = tiny_model(seed, layers)
    loaded.model.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    return folder
