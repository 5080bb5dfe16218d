"""Shared steps of the command line and scripts: load a model pair, choose layers, build a method, run it."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcomm.errors import KVCommError, LayerSelectionError
from kvcomm.generation import GenerationSettings
from kvcomm.methods import AC, CIPHER, NLD, Baseline, KVComm, KVCommS, Skyline
from kvcomm.facts import FactsConfig
from kvcomm.methods.base import Method
from kvcomm.methods.qkvcomm import QKVComm, profile_allocation
from kvcomm.quant import KVQuantConfig
from kvcomm.models import LoadedModel, check_compatible, load_model
from kvcomm.depth import layer_mapping
from kvcomm.prompts import chat_ids
from kvcomm.translate import MomentMatcher, collect_model_statistics
from kvcomm.runner import run_items
from kvcomm.selection import LayerScores, calibrate, layer_count, parse_layers, random_layers
from kvcomm.tasks import Example, TaskSplit, get_task
from kvcomm.tasks.truncate import fit_to_window

logger = logging.getLogger(__name__)

METHODS = ("baseline", "skyline", "kvcomm", "qkvcomm", "kvcomm_s", "ac", "nld", "cipher")


@dataclass
class SelectionOptions:
    """How KVComm picks its layers: an explicit list/range, or a ratio with KVComm scores or at random."""

    layers: str | None = None  # "0,3,5" or "4-12"
    ratio: float | None = None
    strategy: str = "kvcomm"  # kvcomm | random
    calib_size: int = 1
    alpha: float = 1.0
    mu: float = 0.5
    sigma: float = 10.0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.strategy not in ("kvcomm", "random"):
            raise LayerSelectionError(f"unknown selection {self.strategy!r}; choose kvcomm or random")
        if self.layers is not None and self.ratio is not None:
            raise LayerSelectionError("give either --layers or --ratio, not both")
        if self.calib_size < 1:
            raise LayerSelectionError(f"--calib-size must be >= 1, got {self.calib_size}")


@dataclass
class QuantOptions:
    """Q-KVComm parts: uniform ``bits`` (16 = no quantization), or an adaptive average ``target_bits`` from
    sensitivity profiling on calibration items; ``facts_budget`` tokens of key facts (0 = none)."""

    bits: int = 4
    group_size: int = 32
    target_bits: float | None = None
    sensitivity: str = "relative"  # relative | kl
    facts_budget: int = 0
    match: str = "none"  # moment matching of sender KV to receiver statistics: none | per_dimension | scalar
    match_samples: int = 8  # calibration items whose contexts both models prefill for the statistics
    map_depth: bool = False  # accept a receiver of another depth (layers paired by relative depth)

    def __post_init__(self) -> None:
        if self.match not in ("none", "per_dimension", "scalar"):
            raise KVCommError(f"--match must be none, per_dimension or scalar, got {self.match!r}")
        if self.match_samples < 1:
            raise KVCommError(f"--match-samples must be >= 1, got {self.match_samples}")
        if self.bits not in (2, 3, 4, 6, 8, 16):
            raise KVCommError(f"--bits must be one of 2, 3, 4, 6, 8 or 16 (no quantization), got {self.bits}")
        if self.target_bits is not None and self.bits == 16:
            raise KVCommError("--adaptive-bits needs quantization (--bits below 16)")
        if self.sensitivity not in ("relative", "kl"):
            raise KVCommError(f"--sensitivity must be relative or kl, got {self.sensitivity!r}")
        if self.facts_budget < 0:
            raise KVCommError(f"--facts-budget must be >= 0, got {self.facts_budget}")


@dataclass
class RunOptions:
    method: str
    task: str
    sender: str = "smollm2-135m-instruct"
    receiver: str = "smollm2-135m-instruct"
    data_dir: str | None = None
    limit: int | None = None
    dtype: str = "bf16"
    device: str = "cpu"
    sink_tokens: int = 1
    answer_prefix: str = ""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    message_tokens: int = 256  # NLD / CIPHER phase-1 length (paper value)
    sender_aware: bool = False  # NLD / CIPHER: "summarise for another agent" sender instruction
    ac_combine: str = "replace"  # AC: replace | sum | mean
    max_input_tokens: int | None = None  # prompt budget for truncating tasks (default: the receiver's window)
    sender_url: str | None = None  # kvcomm between agent services (kvcomm serve) instead of in-process models
    receiver_url: str | None = None
    agent_token: str | None = None  # bearer token of the agent services

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KVCommError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.limit is not None and self.limit < 1:
            raise KVCommError(f"--limit must be >= 1, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_pair(sender: str, receiver: str, dtype: str, device: str, allow_depth: bool = False
              ) -> tuple[LoadedModel, LoadedModel]:
    """Load sender and receiver (one object when both names are equal), refusing incompatible pairs.

    ``allow_depth``: models of different depth are accepted (for methods that map layers by relative depth).
    """
    receiver_model = load_model(receiver, dtype=dtype, device=device)
    sender_model = receiver_model if sender == receiver else load_model(sender, dtype=dtype, device=device)
    check_compatible(sender_model.fingerprint, receiver_model.fingerprint, allow_depth=allow_depth)
    return sender_model, receiver_model


def choose_layers(sender: LoadedModel, receiver: LoadedModel, split: TaskSplit, options: SelectionOptions
                  ) -> tuple[tuple[int, ...], LayerScores | None]:
    """Shared layers for KVComm (sender layer indices); all layers when neither a list nor a ratio is given."""
    num_layers = sender.num_layers
    if options.ratio is not None and options.strategy == "kvcomm" and sender.num_layers != receiver.num_layers:
        raise LayerSelectionError(
            "calibrated selection needs sender and receiver of the same depth; with models of different depth give "
            "--layers or --selection random"
        )
    if options.layers is not None:
        return parse_layers(options.layers, num_layers), None
    if options.ratio is None:
        return tuple(range(num_layers)), None
    if options.strategy == "random":
        return random_layers(num_layers, layer_count(options.ratio, num_layers), options.seed), None
    scores = calibrate_on_split(sender, receiver, split, options)
    return scores.select(options.ratio), scores


def calibrate_on_split(sender: LoadedModel, receiver: LoadedModel, split: TaskSplit, options: SelectionOptions
                       ) -> LayerScores:
    if len(split.calibration) < options.calib_size:
        raise LayerSelectionError(
            f"--calib-size {options.calib_size} but the task has {len(split.calibration)} calibration items"
        )
    return calibrate(sender, receiver, split.calibration[: options.calib_size], options.alpha, options.mu,
                     options.sigma)


def build_method(name: str, sender: LoadedModel, receiver: LoadedModel, layers: tuple[int, ...], sink_tokens: int,
                 settings: GenerationSettings, label: str | None = None, message_tokens: int = 256,
                 sender_aware: bool = False, ac_combine: str = "replace") -> Method:
    if name == "kvcomm_s":
        return KVCommS(sender, receiver, layers, sink_tokens, settings, name=label or "kvcomm_s", shift_back=True)
    if name == "ac":
        return AC(sender, receiver, combine=ac_combine, settings=settings, name=label or f"ac-{ac_combine}")
    if name == "nld":
        return NLD(sender, receiver, message_tokens, sender_aware, settings, name=label or "nld")
    if name == "cipher":
        return CIPHER(sender, receiver, message_tokens, sender_aware, settings=settings, name=label or "cipher")
    if name == "baseline":
        return Baseline(receiver, settings)
    if name == "skyline":
        return Skyline(receiver, settings)
    if name == "kvcomm":
        return KVComm(sender, receiver, layers, sink_tokens, settings, name=label or "kvcomm")
    if name == "qkvcomm":
        return build_qkvcomm(sender, receiver, layers, sink_tokens, settings, QuantOptions(), [], label)
    raise KVCommError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def build_qkvcomm(sender: LoadedModel, receiver: LoadedModel, layers: tuple[int, ...], sink_tokens: int,
                  settings: GenerationSettings, options: QuantOptions, calibration: list[Example],
                  label: str | None = None, match_calibration: list[Example] | None = None) -> QKVComm:
    """A :class:`QKVComm` from command-line options; adaptive widths are profiled on ``calibration`` items, moment
    matching (if on) is fitted on ``match_calibration`` (default: ``calibration``)."""
    quant = None if options.bits == 16 else KVQuantConfig(options.bits, options.bits, options.group_size)
    allocation = None
    if options.target_bits is not None and quant is not None:
        if not calibration:
            raise LayerSelectionError("adaptive bits need calibration items")
        allocation = profile_allocation(sender, receiver, calibration, layers, options.target_bits, quant,
                                        options.sensitivity, sink_tokens=sink_tokens, map_depth=options.map_depth)
    facts = FactsConfig(budget_tokens=options.facts_budget) if options.facts_budget else None
    matcher = None
    if options.match != "none":
        pool = calibration if match_calibration is None else match_calibration
        matcher = fit_matcher(sender, receiver, pool[: options.match_samples], layers, options.match)
    return QKVComm(sender, receiver, layers, quant, allocation, facts, matcher, sink_tokens, settings,
                   name=label or "qkvcomm", map_depth=options.map_depth)


def fit_matcher(sender: LoadedModel, receiver: LoadedModel, calibration: list[Example], layers: tuple[int, ...],
                mode: str) -> MomentMatcher:
    """Moment matcher from both models' KV on the sender prompts of ``calibration`` items (never test items).

    Sender statistics at ``layers``; receiver statistics at the layers they map to by relative depth.
    """
    if not calibration:
        raise LayerSelectionError("moment matching needs calibration items")
    contexts = [chat_ids(receiver.tokenizer, example.messages["sender"]) for example in calibration]
    targets = sorted(set(layer_mapping(layers, sender.num_layers, receiver.num_layers).values()))
    sender_stats = collect_model_statistics(sender, contexts, layers)
    receiver_stats = collect_model_statistics(receiver, contexts, targets)
    logger.info("moment matching (%s) fitted on %d calibration contexts", mode, len(contexts))
    return MomentMatcher.fit(sender_stats, receiver_stats, mode=mode, layers=layers)  # type: ignore[arg-type]


def environment() -> dict[str, str]:
    import platform

    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def run(options: RunOptions, output_dir: Path, progress: bool = True,
        models: tuple[LoadedModel, LoadedModel] | None = None) -> dict[str, Any]:
    """Load, select, run and summarise one (task, method) cell into ``output_dir``."""
    if options.sender_url or options.receiver_url:
        return run_remote(options, output_dir, progress)
    task = get_task(options.task)
    split = task.load(options.data_dir)
    allow_depth = options.method == "qkvcomm" and options.quant.map_depth
    sender, receiver = models or load_pair(options.sender, options.receiver, options.dtype, options.device,
                                           allow_depth=allow_depth)
    examples = split.test[: options.limit] if options.limit else split.test
    if options.answer_prefix:
        examples = [example.with_answer_prefix(options.answer_prefix) for example in examples]
    examples = fit_to_window(examples, receiver.tokenizer, receiver.max_positions, options.max_input_tokens,
                             task.truncate)
    layers: tuple[int, ...] = ()
    scores = None
    if options.method in ("kvcomm", "qkvcomm", "kvcomm_s"):
        layers, scores = choose_layers(sender, receiver, split, options.selection)
        if scores is not None:
            scores.save(Path(output_dir) / "layer_scores.json")
    if options.method == "qkvcomm":
        calibration = split.calibration[: options.selection.calib_size]
        method = build_qkvcomm(sender, receiver, layers, options.sink_tokens, options.generation, options.quant,
                               calibration, match_calibration=split.calibration[: options.quant.match_samples])
    else:
        method = build_method(options.method, sender, receiver, layers, options.sink_tokens, options.generation,
                              message_tokens=options.message_tokens, sender_aware=options.sender_aware,
                              ac_combine=options.ac_combine)
    config = {"options": options.to_dict(), "layers": list(layers),
              "fingerprints": {"sender": sender.fingerprint.to_dict(), "receiver": receiver.fingerprint.to_dict()}}
    summary = run_items(method, examples, Path(output_dir), task.name, task.metric, config, progress=progress)
    (Path(output_dir) / "environment.json").write_text(json.dumps(environment(), indent=2))
    return summary


def run_remote(options: RunOptions, output_dir: Path, progress: bool = True) -> dict[str, Any]:
    """One KVComm cell between two agent services (``kvcomm serve``): the sender service prefills, the receiver
    service answers; the answers equal the in-process method's for the same models and layers. Layers: ``--layers``,
    a seeded random subset (``--ratio r --selection random``) or all; calibrated selection needs local models."""
    from kvcomm.service.client import AgentClient
    from kvcomm.service.method import RemoteKVComm

    if options.method != "kvcomm":
        raise KVCommError(f"remote agents run the kvcomm method, not {options.method!r}")
    if not (options.sender_url and options.receiver_url):
        raise KVCommError("give both --sender-url and --receiver-url")
    selection = options.selection
    if selection.ratio is not None and selection.strategy == "kvcomm":
        raise LayerSelectionError("calibrated selection needs local models; with remote agents give --layers or "
                                  "--ratio with --selection random")
    task = get_task(options.task)
    examples = task.load(options.data_dir).test
    examples = examples[: options.limit] if options.limit else examples
    if options.answer_prefix:
        examples = [example.with_answer_prefix(options.answer_prefix) for example in examples]
    sender = AgentClient(options.sender_url, token=options.agent_token)
    receiver = AgentClient(options.receiver_url, token=options.agent_token)
    sender_print, receiver_print = sender.fingerprint(), receiver.fingerprint()
    check_compatible(sender_print, receiver_print)
    num_layers = receiver_print.num_layers
    if selection.layers is not None:
        layers = parse_layers(selection.layers, num_layers)
    elif selection.ratio is not None:
        layers = random_layers(num_layers, layer_count(selection.ratio, num_layers), selection.seed)
    else:
        layers = tuple(range(num_layers))
    method = RemoteKVComm(sender, receiver, layers, options.sink_tokens, settings=options.generation, name="kvcomm")
    saved = {**options.to_dict(), "agent_token": None}  # never write the token into the results folder
    config = {"options": saved, "layers": list(layers),
              "fingerprints": {"sender": sender_print.to_dict(), "receiver": receiver_print.to_dict()}}
    summary = run_items(method, examples, Path(output_dir), task.name, task.metric, config, progress=progress)
    (Path(output_dir) / "environment.json").write_text(json.dumps(environment(), indent=2))
    return summary


def compare_methods(sender: LoadedModel, receiver: LoadedModel, task_name: str, output_root: Path,
                    ratios: tuple[float, ...] = (0.3, 0.5, 0.7), data_dir: str | None = None,
                    limit: int | None = None, answer_prefix: str = "", sink_tokens: int = 1,
                    selection: SelectionOptions | None = None, settings: GenerationSettings | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Baseline, Skyline and KVComm at each ratio (one calibration shared by all ratios) on one task."""
    selection = selection or SelectionOptions()
    settings = settings or GenerationSettings()
    task = get_task(task_name)
    split = task.load(data_dir)
    examples = split.test[:limit] if limit else split.test
    if answer_prefix:
        examples = [example.with_answer_prefix(answer_prefix) for example in examples]
    examples = fit_to_window(examples, receiver.tokenizer, receiver.max_positions, allowed=task.truncate)
    scores = calibrate_on_split(sender, receiver, split, selection)
    scores.save(Path(output_root) / "layer_scores.json")
    cells: list[tuple[str, Method, tuple[int, ...]]] = [
        ("baseline", Baseline(receiver, settings), ()),
        ("skyline", Skyline(receiver, settings), ()),
    ]
    for ratio in ratios:
        layers = scores.select(ratio)
        label = f"kvcomm@{ratio:g}"
        cells.append((label, KVComm(sender, receiver, layers, sink_tokens, settings, name=label), layers))
    summaries = []
    base_config = {"task": task.name, "limit": limit, "answer_prefix": answer_prefix, "sink_tokens": sink_tokens,
                   "selection": asdict(selection), "generation": asdict(settings),
                   "fingerprints": {"sender": sender.fingerprint.to_dict(),
                                    "receiver": receiver.fingerprint.to_dict()}}
    for label, method, layers in cells:
        config = {**base_config, "method": label, "layers": list(layers)}
        cell_dir = Path(output_root) / label.replace("@", "-")
        summaries.append(run_items(method, examples, cell_dir, task.name, task.metric, config, progress=progress))
    (Path(output_root) / "environment.json").write_text(json.dumps(environment(), indent=2))
    return summaries
