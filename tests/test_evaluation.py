"""The evaluation grid (kvcomm.evaluation), its tables and plots (kvcomm.report) and commands (kvcomm.cli_eval), on
tiny random models (no downloads)."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import kvcomm.evaluation as evaluation
from kvcomm.cli_eval import register
from kvcomm.costs import CostRecord, peak_memory
from kvcomm.errors import KVCommError, LayerSelectionError, TaskError
from kvcomm.evaluation import EvalConfig, cell_config, plan_cells, prepare_task, run_grid
from kvcomm.generation import GenerationSettings
from kvcomm.report import _byte_label, display_name, grid_cost_table, grid_score_table, load_grid, write_grid_report
from tests.conftest import shared_data_dir, tiny_llama

SHORT = {"max_new_tokens": 3}


@pytest.fixture(scope="module")
def pair():
    """A model of its own (forward hooks are added here), used as both sender and receiver."""
    model = tiny_llama(seed=11)
    return model, model


class Killed(BaseException):
    """Stands for a kill (like KeyboardInterrupt, not caught by the runner's per-item error handling)."""


@dataclass
class Counting:
    """Wraps a method: counts answered items and raises :class:`Killed` on call ``kill_at``."""

    inner: object
    log: list
    kill_at: int | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    def answer(self, example):
        self.log.append((self.inner.name, example.id))
        if self.kill_at is not None and len(self.log) == self.kill_at:
            raise Killed
        return self.inner.answer(example)


ORIGINAL_BUILD = evaluation.build_cell_method


def counting_builder(monkeypatch, log, kill_at=None):
    def build(*args, **kwargs):
        return Counting(ORIGINAL_BUILD(*args, **kwargs), log, kill_at)

    monkeypatch.setattr(evaluation, "build_cell_method", build)


def forward_counter(model):
    calls = []
    handle = model.model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def grid_config(tmp_path, **changes) -> EvalConfig:
    values = dict(tasks=["demo"], methods=["baseline", "skyline", "kvcomm", "random"], ratios=[0.25, 0.5], limit=3,
                  dtype="fp32", output=str(tmp_path / "grid"), generation=SHORT)
    values.update(changes)
    return EvalConfig(**values)


# --- configuration ------------------------------------------------------------------------------------------------

def test_yaml_round_trip_and_overrides(tmp_path):
    config = EvalConfig(tasks=["demo", "countries"], methods=["baseline", "kvcomm", "ac", "random"], ratios=[0.3, 0.7],
                        limit=5, answer_prefix="The answer is:", calib_size=2, tracking=None, ac_combines=["sum"],
                        generation=GenerationSettings(max_new_tokens=7), quant={"bits": 8}, limits={"countries": 3},
                        task_settings={"countries": {"methods": ["skyline"]}})
    path = tmp_path / "eval.yaml"
    config.to_yaml(path)
    loaded = EvalConfig.from_yaml(path)
    assert loaded == config and loaded.quant.bits == 8 and loaded.generation.max_new_tokens == 7
    overridden = EvalConfig.from_yaml(path, limit=2, tasks="demo", ratios="0.5", answer_prefix=None)
    assert overridden.limit == 2 and overridden.tasks == ["demo"] and overridden.ratios == [0.5]
    assert overridden.answer_prefix == "The answer is:"  # None overrides nothing
    assert [cell.label for cell in plan_cells(overridden)] == ["baseline", "kvcomm-0.5", "ac-sum", "random-0.5"]
    assert overridden.limits == {"countries": 3}  # a subset of the file's tasks keeps its per-task entries
    labels = [cell.label for cell in plan_cells(config) if cell.task == "demo"]
    assert labels == ["baseline", "kvcomm-0.3", "kvcomm-0.7", "ac-sum", "random-0.3", "random-0.7"]


@pytest.mark.parametrize("text, error, message", [
    ("tasks: [demo]\nratio: 0.3\n", KVCommError, "unknown key\\(s\\) 'ratio'.*valid keys"),
    ("generation: {max_tokens: 3}\n", KVCommError, "'max_tokens' in generation"),
    ("methods: [kvcomm, telepathy]\n", KVCommError, "telepathy"),
    ("tasks: [nope]\n", TaskError, "unknown task"),
    ("ratios: [0.0]\n", LayerSelectionError, "ratio must be in"),
    ("tracking: neptune\n", KVCommError, "tracking must be"),
    ("- a\n- b\n", KVCommError, "must be a mapping"),
    ("tasks: [demo\n", KVCommError, "not valid YAML"),
    ("tasks: [demo]\ntask_settings: {contries: {max_new_tokens: 3}}\n", TaskError, "task_settings: unknown task"),
    ("tasks: [demo]\nlimits: {contries: 3}\n", TaskError, "limits: unknown task"),
    ("tasks: [demo]\ntask_settings: {demo: {max_tokens: 3}}\n", KVCommError, "may only hold"),
    ("tasks: [demo]\ntask_settings: {demo: {max_new_tokens: 0}}\n", KVCommError, "positive integer"),
    ("tasks: [demo]\ntask_settings: {demo: {methods: [kvcomm, telepathy]}}\n", KVCommError,
     "telepathy.*task_settings.demo.methods"),
    ("tasks: [demo]\ntask_settings: {demo: {answer_prefix: 3}}\n", KVCommError, "must be text"),
    ("tasks: [demo, hotpotqa_2senders]\nmethods: [kvcomm_multi]\n", TaskError,
     "kvcomm_multi needs a task whose items are split.*'demo'"),
])
def test_bad_config_files(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        EvalConfig.from_yaml(path)


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(KVCommError, match="'colour'"):
        EvalConfig().with_overrides(colour="red")
    with pytest.raises(KVCommError, match="not found"):
        EvalConfig.from_yaml(tmp_path / "missing.yaml")


# --- running, resuming ----------------------------------------------------------------------------------------------

def test_grid_writes_every_file(pair, tmp_path):
    config = grid_config(tmp_path, limit=2)
    summaries = run_grid(config, models=pair, progress=False)
    root = Path(config.output)
    labels = ["baseline", "skyline", "kvcomm-0.25", "kvcomm-0.5", "random-0.25", "random-0.5"]
    assert [s["method"] for s in summaries] == labels
    for label in labels:
        cell = root / "demo" / label
        assert len((cell / "predictions.jsonl").read_text().splitlines()) == 2
        metrics = json.loads((cell / "metrics.json").read_text())
        assert metrics["n"] == 2 and metrics["method"] == label
        assert set(CostRecord().to_dict()) == {key[len("mean_"):] for key in metrics["costs"]}
        assert metrics["totals"]["total_generated_tokens"] == pytest.approx(2 * metrics["costs"]["mean_generated_tokens"])
        saved = json.loads((cell / "config.json").read_text())
        assert saved["label"] == label and saved["fingerprints"]["sender"]["num_layers"] == 4
    kv = json.loads((root / "demo" / "kvcomm-0.25" / "config.json").read_text())
    scores = json.loads((root / "demo" / "layer_scores.json").read_text())
    best = max(range(4), key=lambda layer: (scores["combined"][layer], -layer))
    assert kv["layers"] == [best] and kv["params"]["strategy"] == "kvcomm"
    assert len(json.loads((root / "demo" / "random-0.5" / "config.json").read_text())["layers"]) == 2
    assert EvalConfig.from_yaml(root / "eval_config.yaml") == config
    environment = json.loads((root / "environment.json").read_text())
    assert environment["packages"]["torch"] and environment["models"]["receiver"]["fingerprint"]["num_layers"] == 4
    assert environment["device"]["requested"] == "cpu"
    row = json.loads((root / "demo" / "kvcomm-0.25" / "predictions.jsonl").read_text().splitlines()[0])
    assert {"question", "context", "answer", "gold", "scores", "costs"} <= set(row)
    assert row["costs"]["sender_flops"] > 0 and row["costs"]["kv_bytes"] > 0 and row["costs"]["peak_memory_bytes"] >= 0
    costs = {s["method"]: s["costs"] for s in summaries}
    assert costs["skyline"]["mean_receiver_flops"] > costs["kvcomm-0.25"]["mean_receiver_flops"]
    assert costs["baseline"]["mean_kv_bytes"] == 0 < costs["kvcomm-0.25"]["mean_kv_bytes"] < costs["kvcomm-0.5"]["mean_kv_bytes"]


def test_interrupted_grid_resumes_and_finished_cells_make_no_model_call(pair, tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods=["baseline", "kvcomm"], ratios=[0.5], limit=4)
    root = Path(config.output)
    log: list = []
    counting_builder(monkeypatch, log, kill_at=6)  # baseline's 4 items, then killed on kvcomm's 2nd
    with pytest.raises(Killed):
        run_grid(config, models=pair, progress=False)
    assert len((root / "demo" / "kvcomm-0.5" / "predictions.jsonl").read_text().splitlines()) == 1
    assert not (root / "demo" / "kvcomm-0.5" / "metrics.json").exists()

    log.clear()
    counting_builder(monkeypatch, log)
    summaries = run_grid(config, models=pair, progress=False)
    assert [item for name, item in log if name == "baseline"] == []  # finished: not rebuilt, not rerun
    assert [item for _, item in log] == [f"demo-{i:04d}" for i in (1, 2, 3)]  # only the items not done
    assert [s["n"] for s in summaries] == [4, 4]

    log.clear()
    calls, handle = forward_counter(pair[0])
    try:
        again = run_grid(config, models=pair, progress=False)
    finally:
        handle.remove()
    assert log == [] and calls == []  # no method built, no calibration: the saved layer scores are reused
    assert again == summaries

    lower = run_grid(grid_config(tmp_path, methods=["baseline", "kvcomm"], ratios=[0.5], limit=2), models=pair,
                     progress=False)
    assert log == [] and [s["n"] for s in lower] == [2, 2]  # rebuilt from the saved rows

    with pytest.raises(KVCommError, match="different config"):
        run_grid(grid_config(tmp_path, methods=["baseline", "kvcomm"], ratios=[0.5], limit=4, sink_tokens=0),
                 models=pair, progress=False)


def test_local_data_task_and_truncation_hook(pair, tmp_path, monkeypatch):
    seen = []

    def truncate_example(example, tokenizer, max_input_tokens):
        seen.append((example.id, max_input_tokens, tokenizer is pair[1].tokenizer))
        return example

    import kvcomm.tasks
    import kvcomm.tasks.truncate

    monkeypatch.setattr(kvcomm.tasks.truncate, "truncate_example", truncate_example)
    countries = kvcomm.tasks.get_task("countries")
    if hasattr(countries, "truncate"):  # only tasks flagged for truncation are cut; demo is not
        monkeypatch.setitem(kvcomm.tasks.TASKS, "countries", dataclasses.replace(countries, truncate=True))
    config = grid_config(tmp_path, tasks=["demo", "countries"], methods=["baseline", "kvcomm"], ratios=[0.5],
                         limit=2, data_dir=str(shared_data_dir()), max_input_tokens=300, calib_size=2)
    summaries = run_grid(config, models=pair, progress=False)
    assert [s["task"] for s in summaries] == ["demo", "demo", "countries", "countries"]
    assert all(s["n"] == 2 for s in summaries)
    assert summaries[-1]["metric"] == countries.metric
    assert len(seen) == 4 and all(limit == 300 and same for _, limit, same in seen)  # 2 test + 2 calibration items
    assert not any(item.startswith("demo") for item, *_ in seen)
    assert json.loads((Path(config.output) / "countries" / "calibration.json").read_text())["calib_size"] == 2


def test_task_settings_override_budgets_for_one_task_only(pair, tmp_path, monkeypatch):
    seen = []

    def truncate_example(example, tokenizer, max_input_tokens):
        seen.append((example.id, max_input_tokens))
        return example

    import kvcomm.tasks
    import kvcomm.tasks.truncate

    monkeypatch.setattr(kvcomm.tasks.truncate, "truncate_example", truncate_example)
    for name in ("demo", "countries"):
        monkeypatch.setitem(kvcomm.tasks.TASKS, name, dataclasses.replace(kvcomm.tasks.get_task(name), truncate=True))
    config = grid_config(tmp_path, tasks=["demo", "countries"], methods=["baseline"], limit=2,
                         data_dir=str(shared_data_dir()), max_input_tokens=300,
                         task_settings={"countries": {"max_input_tokens": 120, "max_new_tokens": 3}})
    demo, countries = (prepare_task(name, config, pair[1]) for name in config.tasks)
    assert {budget for item, budget in seen if item.startswith("demo")} == {300}
    assert {budget for item, budget in seen if not item.startswith("demo")} == {120}
    assert {example.max_new_tokens for example in countries.test} == {3}
    assert {example.max_new_tokens for example in demo.test} == {kvcomm.tasks.get_task("demo").load(None).test[0]
                                                                 .max_new_tokens}
    cell = plan_cells(config)[-1]
    resolved = cell_config(cell, config, *pair)
    assert resolved["max_input_tokens"] == 120 and resolved["max_new_tokens"] == 3
    assert "max_new_tokens" not in cell_config(plan_cells(config)[0], config, *pair)  # demo keeps its own


def test_task_settings_choose_methods_and_answer_prefix_per_task(pair, tmp_path):
    config = grid_config(tmp_path, tasks=["demo", "countries"], methods=["baseline", "kvcomm"], ratios=[0.5],
                         limit=2, data_dir=str(shared_data_dir()), answer_prefix="The answer is:",
                         task_settings={"countries": {"methods": ["skyline"], "answer_prefix": "Country:"}})
    assert [(cell.task, cell.label) for cell in plan_cells(config)] == [
        ("demo", "baseline"), ("demo", "kvcomm-0.5"), ("countries", "skyline")]
    demo, countries = (prepare_task(name, config, pair[1]) for name in config.tasks)
    assert all(example.answer_prefix.startswith("The answer is:") for example in demo.test)
    assert {example.answer_prefix for example in countries.test} == {"Country:"}
    assert cell_config(plan_cells(config)[-1], config, *pair)["answer_prefix"] == "Country:"


# --- tables and plots ---------------------------------------------------------------------------------------------

def test_tables_and_plots_equal_the_saved_metrics(pair, tmp_path):
    config = grid_config(tmp_path, tasks=["demo", "countries"], data_dir=str(shared_data_dir()), limit=1,
                         methods=["baseline", "skyline", "kvcomm", "ac", "nld"], ratios=[0.5, 1.0], message_tokens=2)
    run_grid(config, models=pair, progress=False)
    root = Path(config.output)
    metrics = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text())
               for p in root.glob("*/*/metrics.json")}
    assert len(metrics) == 2 * 6

    with (root / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(metrics)
    for row in rows:
        saved = metrics[(row["task"], row["label"])]
        assert float(row["score"]) == pytest.approx(saved["score"]) and int(row["n"]) == saved["n"]
        assert float(row["score_stderr"]) == pytest.approx(saved["score_stderr"])
        for key, value in saved["costs"].items():
            assert float(row[key]) == pytest.approx(value)
        for key, value in saved["totals"].items():
            assert float(row[key]) == pytest.approx(value)
    assert {row["method"] for row in rows} == {"Baseline", "Skyline", "KVComm (0.5)", "KVComm (1)", "AC (replace)",
                                               "NLD"}

    markdown = (root / "results.md").read_text()
    score_section = markdown.split("## Score")[1].split("## Continuous token F1")[0]
    lines = {line.split("|")[1].strip(): line for line in score_section.splitlines() if line.startswith("| ")}
    f1_section = markdown.split("## Continuous token F1")[1].split("## Cost")[0]
    f1_lines = {line.split("|")[1].strip(): line for line in f1_section.splitlines() if line.startswith("| ")}
    header = next(line for line in markdown.splitlines() if line.startswith("| method | demo"))
    assert header.index("demo") < header.index("countries")  # the configured task order
    for (task, label), saved in metrics.items():
        cells = [c.strip() for c in lines[display_name({**saved, **_cell_info(root, task, label)})].split("|")[2:4]]
        assert f"{saved['score']:.3f}" == cells[0 if task == "demo" else 1]
        f1_cells = [c.strip() for c in f1_lines[display_name({**saved, **_cell_info(root, task, label)})].split("|")[2:4]]
        assert f"{saved['metrics']['token_f1']:.3f}" == f1_cells[0 if task == "demo" else 1]
        assert f"| {saved['score']:.3f} ± {saved['score_stderr']:.3f} |" in markdown.split("## Cells")[1]

    cells = load_grid(root)
    console = Console(record=True, width=250)
    console.print(grid_score_table(cells))
    console.print(grid_cost_table(cells))
    text = console.export_text()
    kv = [metrics[(task, "kvcomm-0.5")] for task in ("demo", "countries")]
    assert f"{kv[0]['score']:.3f}" in text and f"{kv[1]['score']:.3f}" in text
    mean_flops = (kv[0]["costs"]["mean_receiver_flops"] + kv[1]["costs"]["mean_receiver_flops"]) / 2
    assert f"{mean_flops:.3g}" in text  # the cost table averages the per-item means over tasks

    for name in ("score_vs_ratio.png", "score_vs_bytes.png", "layer_heatmap.png"):
        path = root / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    for path in [root / "results.md", root / "results.csv", *(root / "plots").iterdir()]:
        path.unlink()
    written = write_grid_report(root)
    assert set(written) == {"markdown", "csv", "score_vs_ratio", "score_vs_bytes", "layer_heatmap"}
    assert (root / "results.md").read_text() == markdown


def test_byte_axis_labels_use_decimal_units():
    assert [_byte_label(v, 0) for v in (64, 1_152, 430_000, 1_500_000, 7e9)] == ["64 B", "1.152 kB", "430 kB",
                                                                                  "1.5 MB", "7 GB"]


def _cell_info(root: Path, task: str, label: str) -> dict:
    config = json.loads((root / task / label / "config.json").read_text())
    return {"family": config["family"], "ratio": config["params"].get("ratio"),
            "ac_combine": config["params"].get("ac_combine")}


# --- tracking -------------------------------------------------------------------------------------------------------

def fake_wandb(calls):
    module = types.ModuleType("wandb")

    class Run:
        def log(self, data):
            calls.append(("log", dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    return module


def fake_mlflow(calls):
    module = types.ModuleType("mlflow")
    module.set_experiment = lambda name: calls.append(("set_experiment", name))
    module.start_run = lambda run_name: calls.append(("start_run", run_name))
    module.log_params = lambda params: calls.append(("log_params", dict(params)))
    module.log_metrics = lambda metrics: calls.append(("log_metrics", dict(metrics)))
    module.end_run = lambda: calls.append(("end_run",))
    return module


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_tracking_logs_every_cell(pair, tmp_path, monkeypatch, kind):
    calls: list = []
    monkeypatch.setitem(sys.modules, kind, fake_wandb(calls) if kind == "wandb" else fake_mlflow(calls))
    config = grid_config(tmp_path, methods=["baseline", "kvcomm"], ratios=[0.5], limit=2, tracking=kind,
                         tracking_project="proj")
    summaries = run_grid(config, models=pair, progress=False)
    logged = [call[1] for call in calls if call[0] in ("log", "log_metrics")]
    assert len(logged) == 2
    for data, summary in zip(logged, summaries):
        assert data[f"demo/{summary['method']}/score"] == summary["score"]
        assert data[f"demo/{summary['method']}/mean_receiver_flops"] == summary["costs"]["mean_receiver_flops"]
    if kind == "wandb":
        assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["config"]["limit"] == 2
        assert calls[-1] == ("finish",)
    else:
        assert calls[0] == ("set_experiment", "proj") and calls[2][1]["limit"] == "2" and calls[-1] == ("end_run",)


def test_missing_tracking_package_fails_before_any_work(pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    config = grid_config(tmp_path, methods=["baseline"], tracking="wandb")
    with pytest.raises(KVCommError, match="wandb is not installed"):
        run_grid(config, models=pair, progress=False)
    assert not Path(config.output).exists()


# --- costs ----------------------------------------------------------------------------------------------------------

def test_peak_memory_sees_an_allocation():
    with peak_memory("cpu") as peak:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        block += 1
    assert peak.bytes >= 35 * 2**20 and peak.method in ("rss_hwm", "rss_sampled")
    with peak_memory("cpu") as idle:
        pass
    assert idle.bytes < 8 * 2**20


# --- command line ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval-model")
    tiny = tiny_llama(seed=5)
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return str(path)


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_eval_and_report(model_dir, tmp_path):
    app, runner = cli_app(), CliRunner()
    config = tmp_path / "eval.yaml"
    config.write_text("tasks: [demo]\nmethods: [baseline, kvcomm]\nratios: [0.5]\nlimit: 5\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--config", str(config), "--sender", model_dir, "--receiver", model_dir,
                                 "--limit", "2", "--dtype", "fp32", "--max-new-tokens", "3", "--output", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "KVComm (0.5)" in result.output and "receiver FLOPs" in result.output
    assert json.loads((out / "demo" / "kvcomm-0.5" / "metrics.json").read_text())["n"] == 2
    saved = EvalConfig.from_yaml(out / "eval_config.yaml")
    assert saved.limit == 2 and saved.generation.max_new_tokens == 3 and saved.methods == ["baseline", "kvcomm"]

    (out / "results.md").unlink()
    rebuilt = runner.invoke(app, ["report", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "results.md").is_file() and "Baseline" in rebuilt.output

    config.write_text("tasks: [demo]\nlimt: 5\n")
    bad = runner.invoke(app, ["eval", "--config", str(config), "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown key(s) 'limt'" in bad.output
    missing = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output


# --- several senders and online recalibration in the grid -----------------------------------------------------------

def _answers(root: Path, task: str, label: str) -> dict[str, str]:
    rows = [json.loads(line) for line in (root / task / label / "predictions.jsonl").read_text().splitlines()]
    return {row["id"]: row["answer"] for row in rows}


def test_grid_runs_several_senders_and_online_recalibration(tmp_path):
    from kvcomm.methods.multi_sender import MultiSenderKVComm
    from kvcomm.tasks import get_task

    model = tiny_llama(seed=12, max_positions=4096)
    config = grid_config(tmp_path, tasks=["hotpotqa_2senders"], data_dir=str(shared_data_dir()), limit=2,
                         methods=["kvcomm", "kvcomm_multi", "online"], ratios=[0.5], online_interval=100)
    summaries = {s["method"]: s for s in run_grid(config, models=(model, model), progress=False, report=False)}
    assert all(s["n"] == 2 and s["errors"] == 0 for s in summaries.values())
    root = Path(config.output)
    # online with an interval longer than the run keeps the initial (static) selection: the same answers as KVComm
    assert _answers(root, "hotpotqa_2senders", "online-0.5") == _answers(root, "hotpotqa_2senders", "kvcomm-0.5")
    # the several-senders cell answers as the method does with the layers it recorded
    layers = tuple(summaries["kvcomm_multi-0.5"]["layers"])
    direct = MultiSenderKVComm([model, model], model, layers, settings=config.generation)
    items = get_task("hotpotqa_2senders").load(shared_data_dir()).test[:2]
    assert _answers(root, "hotpotqa_2senders", "kvcomm_multi-0.5") == {e.id: direct.answer(e).answer for e in items}
    assert (root / "hotpotqa_2senders" / "layer_scores_2_senders.json").is_file()
