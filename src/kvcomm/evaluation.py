"""Evaluation grid: tasks × methods × selection ratios for one sender/receiver pair.

``run_grid(EvalConfig(...))`` loads the two models once and, task by task, runs every cell into
``OUT/<task>/<label>/`` (``predictions.jsonl``, ``metrics.json``, ``config.json`` — written by
:func:`kvcomm.runner.run_items`, which resumes item by item). One calibration per task is shared by all its ratios
(``OUT/<task>/layer_scores.json`` with ``calibration.json`` saying what it was computed from, reused when it
matches). A finished cell (its config unchanged and every expected item in ``predictions.jsonl``) makes no model
call. The run root gets ``eval_config.yaml``, ``environment.json`` and, at the end, the tables and plots of
:func:`kvcomm.report.write_grid_report`. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from kvcomm.chunk import best_chunk
from kvcomm.errors import KVCommError, LayerSelectionError, TaskError
from kvcomm.experiment import (METHODS, QuantOptions, SelectionOptions, build_method, build_qkvcomm,
                               calibrate_on_split, load_pair)
from kvcomm.generation import GenerationSettings
from kvcomm.methods.base import Method
from kvcomm.models import DTYPES, LoadedModel
from kvcomm.runner import CONFIG_FILE, METRICS_FILE, PREDICTIONS, read_predictions, run_items, summarize
from kvcomm.selection import LayerScores, layer_count, random_layers
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.multi import calibrate_multi
from kvcomm.online import OnlineKVComm
from kvcomm.tasks.truncate import fit_to_window
from kvcomm.tasks import TASKS, Example, Task, TaskSplit, get_task

logger = logging.getLogger(__name__)

PACKAGED = "smollm2-135m-instruct"
METHOD_CHOICES = (*METHODS, "random", "contiguous", "kvcomm_multi", "online")
# one cell per selection ratio
RATIO_METHODS = ("kvcomm", "kvcomm_s", "qkvcomm", "random", "contiguous", "kvcomm_multi", "online")
LAYER_SUBSET_FAMILIES = ("random", "contiguous")  # KVComm with layers chosen another way
CALIBRATED = ("kvcomm", "kvcomm_s", "qkvcomm")  # ratio cells whose layers come from the task's calibration
TRACKERS = ("wandb", "mlflow")
AC_COMBINES = ("replace", "sum", "mean")
CONFIG_YAML = "eval_config.yaml"
ENVIRONMENT_FILE = "environment.json"
LAYER_SCORES = "layer_scores.json"
CALIBRATION_FILE = "calibration.json"

TASK_SETTING_KEYS = ("max_input_tokens", "max_new_tokens", "answer_prefix", "methods")


def _check_task_names(per_task: dict[str, Any], what: str) -> None:
    """Every key of ``per_task`` names a registered task (:class:`TaskError` otherwise). Tasks outside the grid's
    ``tasks`` are allowed, so that ``--tasks`` can run a subset of a YAML file's grid."""
    for task in per_task:
        try:
            get_task(task)
        except TaskError as error:
            raise TaskError(f"{what}: {error}") from None


def _as_list(value: Any, what: str) -> list[Any]:
    """A list from a list/tuple or a comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise KVCommError(f"{what} must be a list or a comma-separated string, got {value!r}")


def _nested(cls: type, value: Any, what: str) -> Any:
    """A dataclass ``cls`` from a mapping (unknown keys refused) or an instance."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    return _from_mapping(cls, value, what)


def _from_mapping(cls: type, value: Any, what: str) -> Any:
    """``cls(**value)`` for a mapping whose keys are all fields of the dataclass ``cls``; clear errors otherwise."""
    if not isinstance(value, dict):
        raise KVCommError(f"{what} must be a mapping of keys to values, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise KVCommError(f"unknown key(s) {', '.join(map(repr, unknown))} in {what}; valid keys: "
                          f"{', '.join(sorted(known))}")
    try:
        return cls(**value)
    except TypeError as error:
        raise KVCommError(f"invalid {what}: {error}") from error


@dataclass
class EvalConfig:
    """Everything an evaluation grid needs; loadable from YAML (:meth:`from_yaml`) with overrides.

    ``methods``: any of :data:`kvcomm.experiment.METHODS` plus ``random`` (KVComm with randomly chosen layers) and
    ``contiguous`` (KVComm with the block of adjacent layers whose gold log-likelihood on ``chunk_calib_size``
    calibration items is highest); ratio methods (:data:`RATIO_METHODS`) give one cell per entry of ``ratios``;
    ``ac`` one cell per
    entry of ``ac_combines``. ``limit``: the first N test items of each task
    (``limits``: per task). ``max_input_tokens``: context budget
    for tasks that support truncation. ``task_settings``: per-task ``max_input_tokens``, ``max_new_tokens`` (over the
    task's own answer length), ``answer_prefix`` and ``methods`` that override the global ones, e.g.
    ``{tmath: {max_new_tokens: 128}, hotpotqa_2senders: {methods: [kvcomm_multi]}}``.
    ``tracking``: ``wandb``, ``mlflow`` or ``None``.
    """

    sender: str = PACKAGED
    receiver: str = PACKAGED
    dtype: str = "bf16"
    device: str = "cpu"
    data_dir: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["demo"])
    methods: list[str] = field(default_factory=lambda: ["baseline", "skyline", "kvcomm"])
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    limit: int | None = None
    limits: dict[str, int] = field(default_factory=dict)  # per-task limits that override ``limit``
    answer_prefix: str = ""
    calib_size: int = 1
    chunk_calib_size: int = 8  # contiguous: calibration items that choose the block
    sink_tokens: int = 1
    max_input_tokens: int | None = None
    task_settings: dict[str, dict[str, int]] = field(default_factory=dict)
    output: str = "runs/eval"
    tracking: str | None = None
    tracking_project: str = "kvcomm"
    alpha: float = 1.0
    mu: float = 0.5
    sigma: float = 10.0
    seed: int = 42
    message_tokens: int = 256
    sender_aware: bool = False
    ac_combines: list[str] = field(default_factory=lambda: ["replace"])
    sender_url: str | None = None  # kvcomm / random cells between agent services (kvcomm serve) of the same models
    receiver_url: str | None = None
    senders: int = 2  # kvcomm_multi: senders per item (items carry extra["contexts"], e.g. task hotpotqa_2senders)
    online_interval: int = 10  # online: recalibrate every T items from the item being answered
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    quant: QuantOptions = field(default_factory=QuantOptions)

    def __post_init__(self) -> None:
        self.tasks = [str(task) for task in _as_list(self.tasks, "tasks")]
        self.methods = [str(method) for method in _as_list(self.methods, "methods")]
        self.ac_combines = [str(rule) for rule in _as_list(self.ac_combines, "ac_combines")]
        try:
            self.ratios = [float(ratio) for ratio in _as_list(self.ratios, "ratios")]
        except ValueError as error:
            raise LayerSelectionError(f"ratios must be numbers, got {self.ratios!r}") from error
        self.generation = _nested(GenerationSettings, self.generation, "generation")
        self.quant = _nested(QuantOptions, self.quant, "quant")
        if self.tracking in ("", "none", "null", "None"):
            self.tracking = None
        self._validate()

    def _validate(self) -> None:
        if not self.tasks:
            raise TaskError("tasks is empty; give at least one task, e.g. demo")
        for task in self.tasks:
            get_task(task)  # raises TaskError naming the known tasks
        if len(set(self.tasks)) != len(self.tasks):
            raise TaskError(f"tasks has duplicates: {self.tasks}")
        self._check_methods(self.methods, "methods")
        for task in self.tasks:
            if "kvcomm_multi" in self.methods_for(task) and get_task(task).senders < 2:
                several = ", ".join(name for name, known in TASKS.items() if known.senders >= 2)
                raise TaskError(f"kvcomm_multi needs a task whose items are split between senders ({several}); "
                                f"{task!r} has one context per item (restrict it with task_settings.<task>.methods)")
        for ratio in self.ratios:
            if not 0 < ratio <= 1:
                raise LayerSelectionError(f"ratio must be in (0, 1], got {ratio}")
        bad = [rule for rule in self.ac_combines if rule not in AC_COMBINES]
        if bad or not self.ac_combines:
            raise KVCommError(f"ac_combines must be a non-empty subset of {', '.join(AC_COMBINES)}, got "
                              f"{self.ac_combines}")
        if self.dtype not in DTYPES:
            raise KVCommError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if not isinstance(self.limits, dict) or any(int(n) < 1 for n in self.limits.values()):
            raise KVCommError(f"limits must map task names to positive item counts, got {self.limits!r}")
        _check_task_names(self.limits, "limits")
        self._validate_task_settings()
        if self.limit is not None and self.limit < 1:
            raise KVCommError(f"limit must be >= 1, got {self.limit}")
        if self.calib_size < 1 or self.chunk_calib_size < 1:
            raise LayerSelectionError(f"calib_size and chunk_calib_size must be >= 1, got {self.calib_size}, "
                                      f"{self.chunk_calib_size}")
        if bool(self.sender_url) != bool(self.receiver_url):
            raise KVCommError("give both sender_url and receiver_url (or neither)")
        if self.senders < 1 or self.online_interval < 1:
            raise KVCommError(f"senders and online_interval must be >= 1, got {self.senders}, {self.online_interval}")
        if self.sink_tokens < 0:
            raise LayerSelectionError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise KVCommError(f"max_input_tokens must be >= 1, got {self.max_input_tokens}")
        if self.message_tokens < 1:
            raise KVCommError(f"message_tokens must be >= 1, got {self.message_tokens}")
        if self.tracking is not None and self.tracking not in TRACKERS:
            raise KVCommError(f"tracking must be one of {', '.join(TRACKERS)} or null, got {self.tracking!r}")
        SelectionOptions(calib_size=self.calib_size, alpha=self.alpha, mu=self.mu, sigma=self.sigma, seed=self.seed)

    def _check_methods(self, methods: list[str], where: str) -> None:
        if not methods:
            raise KVCommError(f"{where} is empty; choose from {', '.join(METHOD_CHOICES)}")
        bad = [method for method in methods if method not in METHOD_CHOICES]
        if bad:
            raise KVCommError(f"unknown method(s) {bad} in {where}; choose from {', '.join(METHOD_CHOICES)}")
        if any(method in RATIO_METHODS for method in methods) and not self.ratios:
            raise LayerSelectionError(f"ratios is empty but {where} asks a ratio method ({', '.join(RATIO_METHODS)})")

    def _validate_task_settings(self) -> None:
        if not isinstance(self.task_settings, dict):
            raise KVCommError(f"task_settings must map task names to settings, got {self.task_settings!r}")
        _check_task_names(self.task_settings, "task_settings")
        for task, settings in self.task_settings.items():
            if not isinstance(settings, dict) or set(settings) - set(TASK_SETTING_KEYS):
                raise KVCommError(f"task_settings.{task} may only hold {', '.join(TASK_SETTING_KEYS)}, "
                                  f"got {settings!r}")
            for key, value in settings.items():
                where = f"task_settings.{task}.{key}"
                if key == "methods":
                    settings[key] = [str(method) for method in _as_list(value, where)]
                    self._check_methods(settings[key], where)
                elif key == "answer_prefix":
                    if not isinstance(value, str):
                        raise KVCommError(f"{where} must be text, got {value!r}")
                elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise KVCommError(f"{where} must be a positive integer, got {value!r}")

    def input_budget(self, task: str) -> int | None:
        """The context budget in tokens for ``task``: its ``task_settings`` entry, else ``max_input_tokens``."""
        return self.task_settings.get(task, {}).get("max_input_tokens", self.max_input_tokens)

    def methods_for(self, task: str) -> list[str]:
        """The method families run on ``task``: its ``task_settings`` list, else ``methods``."""
        return self.task_settings.get(task, {}).get("methods", self.methods)

    def prefix_for(self, task: str) -> str:
        """The answer prefix of ``task``: its ``task_settings`` entry, else ``answer_prefix``."""
        return self.task_settings.get(task, {}).get("answer_prefix", self.answer_prefix)

    def answer_budget(self, task: str) -> int | None:
        """``task``'s max new tokens from ``task_settings`` (``None``: the task's own value)."""
        return self.task_settings.get(task, {}).get("max_new_tokens")

    @property
    def selection(self) -> SelectionOptions:
        """Calibration settings as :class:`~kvcomm.experiment.SelectionOptions`."""
        return SelectionOptions(calib_size=self.calib_size, alpha=self.alpha, mu=self.mu, sigma=self.sigma,
                                seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> "EvalConfig":
        """From a mapping; unknown keys raise :class:`KVCommError` listing the valid ones."""
        return _from_mapping(cls, data, source)

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides: Any) -> "EvalConfig":
        """Read ``path`` (YAML mapping); ``overrides`` that are not ``None`` replace its values."""
        path = Path(path)
        if not path.is_file():
            raise KVCommError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise KVCommError(f"{path} is not valid YAML: {error}") from error
        config = cls.from_dict(data, source=str(path))
        return config.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "EvalConfig":
        """A copy with every override that is not ``None`` applied (unknown names refused)."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        return EvalConfig.from_dict({**self.to_dict(), **changes}, source="the overrides")

    def to_yaml(self, path: Path | str | None = None) -> str:
        """The config as YAML (also written to ``path`` when given)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text


@dataclass(frozen=True)
class Cell:
    """One (task, method, ratio) cell. ``family``: the row kind (a method name or ``random``); ``label``: its folder
    name and the method name in its results."""

    task: str
    family: str
    label: str
    ratio: float | None = None
    ac_combine: str | None = None

    @property
    def method(self) -> str:
        """The :data:`~kvcomm.experiment.METHODS` entry that runs this cell."""
        return "kvcomm" if self.family in LAYER_SUBSET_FAMILIES else self.family


def plan_cells(config: EvalConfig) -> list[Cell]:
    """Every cell of the grid, task by task, in the order of the task's methods (ratios ascending as given)."""
    cells = []
    for task in config.tasks:
        for family in config.methods_for(task):
            if family in RATIO_METHODS:
                cells.extend(Cell(task, family, f"{family}-{ratio:g}", ratio) for ratio in config.ratios)
            elif family == "ac":
                cells.extend(Cell(task, "ac", f"ac-{rule}", ac_combine=rule) for rule in config.ac_combines)
            else:
                cells.append(Cell(task, family, family))
    return cells


def cell_config(cell: Cell, config: EvalConfig, sender: LoadedModel, receiver: LoadedModel,
                layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The resolved config saved as the cell's ``config.json``: only what changes its predictions (not ``limit``,
    ``device`` or ``output``, so that a grid can be extended or resumed elsewhere)."""
    params: dict[str, Any] = {}
    if cell.family in RATIO_METHODS:
        params.update(ratio=cell.ratio, sink_tokens=config.sink_tokens)
        if cell.family == "random":
            params.update(strategy="random", seed=config.seed)
        elif cell.family == "contiguous":
            params.update(strategy="contiguous", chunk_calib_size=config.chunk_calib_size)
        else:
            params.update(strategy="kvcomm", calib_size=config.calib_size, alpha=config.alpha, mu=config.mu,
                          sigma=config.sigma)
        if cell.family == "qkvcomm":
            params["quant"] = asdict(config.quant)
        if cell.family == "kvcomm_multi":
            params["senders"] = config.senders
        if config.receiver_url and cell.method == "kvcomm":
            params["remote"] = True  # answered by the agent services (same answers as in process)
        if cell.family == "online":
            params["interval"] = config.online_interval
    elif cell.family in ("nld", "cipher"):
        params.update(message_tokens=config.message_tokens, sender_aware=config.sender_aware)
    elif cell.family == "ac":
        params["ac_combine"] = cell.ac_combine
    resolved = {"task": cell.task, "label": cell.label, "family": cell.family, "method": cell.method, "params": params,
                "answer_prefix": config.prefix_for(cell.task), "max_input_tokens": config.input_budget(cell.task),
                "generation": asdict(config.generation), "dtype": config.dtype,
                "sender": config.sender, "receiver": config.receiver,
                "fingerprints": {"sender": sender.fingerprint.to_dict(), "receiver": receiver.fingerprint.to_dict()},
                "layers": None if layers is None else list(layers)}
    if config.answer_budget(cell.task) is not None:
        resolved["max_new_tokens"] = config.answer_budget(cell.task)
    return resolved


def _without_layers(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "layers"}


def finished_summary(cell_dir: Path, expected: dict[str, Any], example_ids: Sequence[str], task: str, label: str,
                     metric: str) -> dict[str, Any] | None:
    """The summary of a finished cell without any model call, else ``None``.

    Finished: ``config.json`` equals ``expected`` (its layers aside: they follow from the rest) and every id of
    ``example_ids`` is in ``predictions.jsonl``. ``metrics.json`` is returned as it is when its ``n`` matches;
    otherwise (e.g. after a lower ``limit``, or written before a summary field existed) it is rebuilt from the rows.
    """
    config_path = cell_dir / CONFIG_FILE
    if not config_path.is_file():
        return None
    stored = json.loads(config_path.read_text())
    if _without_layers(stored) != _without_layers(json.loads(json.dumps(expected))):
        return None
    rows = read_predictions(cell_dir / PREDICTIONS)
    if any(item not in rows for item in example_ids):
        return None
    metrics_path = cell_dir / METRICS_FILE
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("n") == len(example_ids) and metrics.get("method") == label and "score_stderr" in metrics:
            return metrics
    summary = summarize([rows[item] for item in example_ids], task, label, metric)
    metrics_path.write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class TaskData:
    """A task's test items (limit, truncation and answer prefix applied), calibration pool (truncated) and the
    items that choose a contiguous block (answer prefix applied, truncated; empty unless ``contiguous`` is asked)."""

    task: Task
    test: list[Example]
    calibration: list[Example]
    chunk_calibration: list[Example] = field(default_factory=list)


def prepare_task(name: str, config: EvalConfig, receiver: LoadedModel) -> TaskData:
    """Load ``name`` and apply ``limit``, ``answer_prefix`` and truncation to the receiver's window (or
    ``max_input_tokens``) for tasks that allow it."""
    task = get_task(name)
    split = task.load(config.data_dir)
    limit = config.limits.get(name, config.limit)
    test = split.test[:limit] if limit else list(split.test)
    prefix = config.prefix_for(name)
    if prefix:
        test = [example.with_answer_prefix(prefix) for example in test]
    answer_budget = config.answer_budget(name)
    if answer_budget is not None:
        test = [dataclasses.replace(example, max_new_tokens=answer_budget) for example in test]
    budget = config.input_budget(name)
    test = fit_to_window(test, receiver.tokenizer, receiver.max_positions, budget, task.truncate)
    calibration = fit_to_window(list(split.calibration[: config.calib_size]), receiver.tokenizer,
                                receiver.max_positions, budget, task.truncate)
    chunk_items: list[Example] = []
    if "contiguous" in config.methods_for(name):
        chunk_items = list(split.calibration[: config.chunk_calib_size])
        if prefix:
            chunk_items = [example.with_answer_prefix(prefix) for example in chunk_items]
        chunk_items = fit_to_window(chunk_items, receiver.tokenizer, receiver.max_positions, budget, task.truncate)
    return TaskData(task, test, calibration, chunk_items)


def task_scores(sender: LoadedModel, receiver: LoadedModel, data: TaskData, config: EvalConfig, task_dir: Path
                ) -> LayerScores:
    """The task's layer scores: read from ``task_dir`` when computed from the same items, settings and models,
    else calibrated and saved there (``layer_scores.json`` and ``calibration.json``)."""
    meta = {"calib_size": config.calib_size, "alpha": config.alpha, "mu": config.mu, "sigma": config.sigma,
            "calibration_ids": [example.id for example in data.calibration],
            "max_input_tokens": config.input_budget(data.task.name),
            "fingerprints": {"sender": sender.fingerprint.to_dict(), "receiver": receiver.fingerprint.to_dict()}}
    scores_path, meta_path = task_dir / LAYER_SCORES, task_dir / CALIBRATION_FILE
    if scores_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        logger.info("%s: reusing the calibration in %s", data.task.name, scores_path)
        return LayerScores.load(scores_path)
    logger.info("%s: calibrating on %d item(s)", data.task.name, len(data.calibration))
    scores = calibrate_on_split(sender, receiver, TaskSplit(test=[], calibration=data.calibration), config.selection)
    scores.save(scores_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    return scores


class _Calibration:
    """Calibrates a task at most once, and only when a cell needs it."""

    def __init__(self, sender: LoadedModel, receiver: LoadedModel, data: TaskData, config: EvalConfig,
                 task_dir: Path) -> None:
        self.args = (sender, receiver, data, config, task_dir)
        self.scores: LayerScores | None = None

    def get(self) -> LayerScores:
        if self.scores is None:
            self.scores = task_scores(*self.args)
        return self.scores

    def get_chunk(self, size: int) -> tuple[int, ...]:
        """The best block of ``size`` adjacent layers on the task's chunk-calibration items (its per-start scores are
        saved as ``chunk_<size>.json``)."""
        sender, receiver, data, config, task_dir = self.args
        choice = best_chunk(sender, receiver, data.chunk_calibration, size, config.sink_tokens)
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / f"chunk_{size}.json").write_text(json.dumps(
            {"layers": list(choice.layers), "mean_gold_log_likelihood_by_start": choice.scores,
             "calibration_ids": [example.id for example in data.chunk_calibration]}, indent=2))
        return choice.layers

    def get_multi(self, senders: int) -> LayerScores:
        """Several-sender scores (importance over every sender's context tokens) on the task's calibration items."""
        sender, receiver, data, config, task_dir = self.args
        scores = calibrate_multi([sender] * senders, receiver, data.calibration, config.alpha, config.mu, config.sigma)
        scores.save(task_dir / f"layer_scores_{senders}_senders.json")
        return scores


def cell_layers(cell: Cell, config: EvalConfig, num_layers: int, calibration: _Calibration) -> tuple[int, ...]:
    """Shared layers of a ratio cell (calibrated top layers or a seeded random subset); ``()`` for other cells."""
    if cell.ratio is None:
        return ()
    if cell.family == "random":
        return random_layers(num_layers, layer_count(cell.ratio, num_layers), config.seed)
    if cell.family == "contiguous":
        return calibration.get_chunk(layer_count(cell.ratio, num_layers))
    if cell.family == "kvcomm_multi":
        return calibration.get_multi(config.senders).select(cell.ratio)
    return calibration.get().select(cell.ratio)  # online: the initial selection


def build_cell_method(cell: Cell, config: EvalConfig, sender: LoadedModel, receiver: LoadedModel,
                      layers: tuple[int, ...], calibration: list[Example]) -> Method:
    """The method object of ``cell``, named by its label."""
    if cell.method == "qkvcomm":
        method: Method = build_qkvcomm(sender, receiver, layers, config.sink_tokens, config.generation, config.quant,
                                       calibration, label=cell.label)
    elif cell.method == "kvcomm" and config.receiver_url:
        method = remote_kvcomm(config, sender, receiver, layers, cell.label)
    elif cell.method == "kvcomm_multi":
        method = MultiSenderKVComm([sender] * config.senders, receiver, layers, config.sink_tokens, config.generation,
                                   name=cell.label)
    elif cell.method == "online":
        method = OnlineKVComm(sender, receiver, cell.ratio, config.online_interval, config.alpha, config.mu,
                              config.sigma, initial_layers=layers, sink_tokens=config.sink_tokens,
                              settings=config.generation, name=cell.label)
    else:
        method = build_method(cell.method, sender, receiver, layers, config.sink_tokens, config.generation,
                              label=cell.label, message_tokens=config.message_tokens,
                              sender_aware=config.sender_aware, ac_combine=cell.ac_combine or "replace")
    method.name = cell.label
    return method


def remote_kvcomm(config: EvalConfig, sender: LoadedModel, receiver: LoadedModel, layers: tuple[int, ...],
                  label: str) -> Method:
    """A KVComm cell answered by the agent services at ``config.sender_url`` / ``config.receiver_url``; they must
    serve the grid's own models (their fingerprints are checked), whose calibration chose ``layers``."""
    import os

    from kvcomm.service.client import AgentClient
    from kvcomm.service.method import RemoteKVComm

    token = os.environ.get("KVCOMM_TOKEN")
    agents = (AgentClient(config.sender_url, token=token), AgentClient(config.receiver_url, token=token))
    for agent, model, role in zip(agents, (sender, receiver), ("sender", "receiver")):
        if agent.fingerprint() != model.fingerprint:
            raise KVCommError(f"the {role} service at {agent.base_url} does not serve the grid's {role} "
                              f"{model.name!r}; start it with the same model")
    return RemoteKVComm(agents[0], agents[1], layers, config.sink_tokens, settings=config.generation, name=label)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _model_info(model: LoadedModel) -> dict[str, Any]:
    return {"name": model.name, "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "parameters": sum(p.numel() for p in model.model.parameters()), "fingerprint": model.fingerprint.to_dict()}


def environment_info(config: EvalConfig, sender: LoadedModel, receiver: LoadedModel) -> dict[str, Any]:
    """Package versions, machine and device, and the two models' fingerprints (``environment.json``)."""
    device: dict[str, Any] = {"requested": config.device, "torch_threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if receiver.device.type == "cuda":
        index = receiver.device.index or 0
        device.update(cuda_name=torch.cuda.get_device_name(index), cuda_version=torch.version.cuda,
                      cuda_capability=".".join(map(str, torch.cuda.get_device_capability(index))))
    packages = {name: _version(name) for name in ("kvcomm", "torch", "transformers", "tokenizers", "accelerate",
                                                  "numpy", "safetensors", "PyYAML", "psutil", "matplotlib", "rich",
                                                  "tqdm", "typer")}
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "packages": packages, "device": device,
            "models": {"sender": _model_info(sender), "receiver": _model_info(receiver)}}


def cell_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of one cell for trackers: score, n, errors, every metric and every mean/total cost."""
    values: dict[str, float] = {"score": summary["score"], "n": summary["n"], "errors": summary.get("errors", 0)}
    values.update(summary.get("metrics", {}))
    values.update(summary.get("costs", {}))
    values.update(summary.get("totals", {}))
    return {key: float(value) for key, value in values.items()}


class Tracker:
    """Logs a grid to an experiment tracker (``wandb`` or ``mlflow``), imported only when asked for."""

    def __init__(self, kind: str, module: Any, project: str, run_name: str, config: dict[str, Any]) -> None:
        self.kind, self.module = kind, module
        if kind == "wandb":
            self.run = module.init(project=project, name=run_name, config=config)
        else:
            module.set_experiment(project)
            self.run = module.start_run(run_name=run_name)
            module.log_params(_flatten(config))

    def log_cell(self, cell: Cell, summary: dict[str, Any]) -> None:
        metrics = {f"{cell.task}/{cell.label}/{key}": value for key, value in cell_metrics(summary).items()}
        if self.kind == "wandb":
            self.run.log(metrics)
        else:
            self.module.log_metrics(metrics)

    def finish(self) -> None:
        if self.kind == "wandb":
            self.run.finish()
        else:
            self.module.end_run()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def open_tracker(config: EvalConfig) -> Tracker | None:
    """The tracker ``config.tracking`` asks for (``None`` for none); a clear error when its package is missing."""
    if config.tracking is None:
        return None
    try:
        module = importlib.import_module(config.tracking)
    except ImportError as error:
        raise KVCommError(f"tracking: {config.tracking} is not installed; `pip install {config.tracking}` or set "
                          "tracking to null") from error
    return Tracker(config.tracking, module, config.tracking_project, Path(config.output).name, config.to_dict())


def run_grid(config: EvalConfig, models: tuple[LoadedModel, LoadedModel] | None = None, progress: bool = True,
             report: bool = True) -> list[dict[str, Any]]:
    """Run every cell of ``config`` into ``config.output``; returns the cells' summaries (``metrics.json``).

    ``models``: an already loaded ``(sender, receiver)`` pair (otherwise loaded once from the config). ``report``:
    write ``results.md``, ``results.csv`` and ``plots/`` at the end.
    """
    root = Path(config.output)
    tracker = open_tracker(config)  # fail on a missing package before any model is loaded
    sender, receiver = models or load_pair(config.sender, config.receiver, config.dtype, config.device)
    root.mkdir(parents=True, exist_ok=True)
    config.to_yaml(root / CONFIG_YAML)
    (root / ENVIRONMENT_FILE).write_text(json.dumps(environment_info(config, sender, receiver), indent=2))
    cells = plan_cells(config)
    logger.info("grid of %d cells (%d tasks) into %s", len(cells), len(config.tasks), root)
    summaries: list[dict[str, Any]] = []
    try:
        with tqdm(total=len(cells), desc="grid", unit="cell", disable=not progress) as bar:
            for task_name in config.tasks:
                data = prepare_task(task_name, config, receiver)
                calibration = _Calibration(sender, receiver, data, config, root / task_name)
                for cell in (c for c in cells if c.task == task_name):
                    bar.set_postfix_str(f"{task_name}/{cell.label}")
                    summary = run_cell(cell, config, sender, receiver, data, calibration, root, progress)
                    summaries.append(summary)
                    if tracker is not None:
                        tracker.log_cell(cell, summary)
                    bar.update(1)
    finally:
        if tracker is not None:
            tracker.finish()
    if report:
        from kvcomm.report import write_grid_report

        write_grid_report(root)
    return summaries


def run_cell(cell: Cell, config: EvalConfig, sender: LoadedModel, receiver: LoadedModel, data: TaskData,
             calibration: _Calibration, root: Path, progress: bool = True) -> dict[str, Any]:
    """One cell into ``root/<task>/<label>/``: skipped when finished, resumed when partial."""
    cell_dir = root / cell.task / cell.label
    ids = [example.id for example in data.test]
    expected = cell_config(cell, config, sender, receiver)
    done = finished_summary(cell_dir, expected, ids, data.task.name, cell.label, data.task.metric)
    if done is not None:
        logger.info("%s/%s: finished (%d items), skipped", cell.task, cell.label, len(ids))
        return done
    layers = cell_layers(cell, config, receiver.num_layers, calibration)
    method = build_cell_method(cell, config, sender, receiver, layers, data.calibration)
    resolved = cell_config(cell, config, sender, receiver, layers if cell.ratio is not None else None)
    logger.info("%s/%s: running %d items%s", cell.task, cell.label, len(ids),
                f" with layers {list(layers)}" if layers else "")
    summary = run_items(method, data.test, cell_dir, data.task.name, data.task.metric, resolved, progress=progress)
    logger.info("%s/%s: %s = %.3f", cell.task, cell.label, summary["metric"], summary["score"])
    return summary
