from __future__ import annotations

import torch

from kvcomm.models import Fingerprint, check_compatible, load_model, tokenizer_hash
from tests.conftest import byte_tokenizer, tiny_llama


def test_fingerprint_fields(tiny):
    fp = tiny.fingerprint
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.vocab_size) == \
        ("LlamaForCausalLM", 4, 2, 16, 259)
    assert "rope_theta" in fp.rope
    assert Fingerprint.from_dict(fp.to_dict()) == fp


def test_same_architecture_different_weights_are_compatible(tiny):
    other = tiny_llama(seed=9)
    check_compatible(other.fingerprint, tiny.fingerprint)
    assert other.fingerprint.kv_mismatches(tiny.fingerprint) == []


def test_tokenizer_hash_sees_vocabulary_changes():
    first, second = byte_tokenizer(), byte_tokenizer()
    assert tokenizer_hash(first) == tokenizer_hash(second)
    second.add_tokens(["<extra>"])
    assert tokenizer_hash(first) != tokenizer_hash(second)


def test_load_local_folder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = tiny_llama(seed=4)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="fp32")
    assert loaded.fingerprint.kv_mismatches(tiny.fingerprint) == []
    ids = torch.tensor([[0, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits, atol=1e-6)
    assert loaded.model.config._attn_implementation == "kvcomm_sdpa"
    bf16 = load_model(str(tmp_path), dtype="bf16")
    assert bf16.dtype == torch.bfloat16
