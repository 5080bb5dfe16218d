"""The command line on a tiny model saved to a local folder (offline)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcomm.cli import app
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny = tiny_llama(seed=5)
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return str(path)


def test_check_passes_for_one_model(model_dir):
    result = CliRunner().invoke(app, ["check", "--sender", model_dir, "--receiver", model_dir])
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in result.output and "OK" in result.output


def test_check_fails_for_different_weights(model_dir, tmp_path):
    other = tiny_llama(seed=6)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["check", "--sender", str(tmp_path), "--receiver", model_dir])
    assert result.exit_code == 1 and "FAILED" in result.output


def test_check_refuses_incompatible_pair(model_dir, tmp_path):
    other = tiny_llama(seed=6, kv_heads=4)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["check", "--sender", str(tmp_path), "--receiver", model_dir])
    assert result.exit_code == 2 and "num_kv_heads" in result.output


def test_run_writes_results(model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--method", "kvcomm", "--task", "demo", "--sender", model_dir, "--receiver", model_dir,
            "--limit", "3", "--ratio", "0.5", "--dtype", "fp32", "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "demo" and metrics["method"] == "kvcomm" and metrics["n"] == 3
    assert metrics["mean_kv_bytes"] > 0 and len(metrics["layers"]) == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "layer_scores.json").read_text())["calibration_ids"] == ["demo-calib-0000"]
    assert "score" in result.output


def test_run_rejects_bad_input(model_dir, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(app, ["run", "--method", "kvcomm", "--task", "nope", "--sender", model_dir,
                                  "--receiver", model_dir, "--output", str(tmp_path / "a")])
    assert unknown.exit_code == 2 and "unknown task" in unknown.output
    out_of_range = runner.invoke(app, ["run", "--method", "kvcomm", "--task", "demo", "--layers", "0,7",
                                       "--sender", model_dir, "--receiver", model_dir, "--output", str(tmp_path / "b")])
    assert out_of_range.exit_code == 2 and "out of range" in out_of_range.output
    both = runner.invoke(app, ["run", "--method", "kvcomm", "--task", "demo", "--layers", "0", "--ratio", "0.3",
                               "--sender", model_dir, "--receiver", model_dir, "--output", str(tmp_path / "c")])
    assert both.exit_code == 2 and "either --layers or --ratio" in both.output


def test_calibrate_and_demo(model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--sender", model_dir, "--receiver", model_dir, "--dtype", "fp32",
                                 "--output", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cal" / "layer_scores.json").is_file() and (tmp_path / "cal" / "layer_scores.png").is_file()
    assert "ratio 0.5: 2 layers" in result.output
    demo = runner.invoke(app, ["demo", "--model", model_dir, "--limit", "2", "--dtype", "fp32",
                               "--output", str(tmp_path / "demo")])
    assert demo.exit_code == 0, demo.output
    for cell in ("baseline", "skyline", "kvcomm-0.3", "kvcomm-0.5", "kvcomm-0.7"):
        assert json.loads((tmp_path / "demo" / cell / "metrics.json").read_text())["n"] == 2


def test_run_qkvcomm_with_adaptive_bits_and_facts(model_dir, tmp_path):
    out = tmp_path / "q"
    args = ["run", "--method", "qkvcomm", "--task", "demo", "--sender", model_dir, "--receiver", model_dir,
            "--limit", "2", "--layers", "0-3", "--adaptive-bits", "3", "--facts-budget", "80", "--dtype", "fp32",
            "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "qkvcomm" and metrics["costs"]["mean_text_bytes"] > 0
    assert 0 < metrics["mean_kv_bytes"]
    bad = CliRunner().invoke(app, ["run", "--method", "qkvcomm", "--task", "demo", "--bits", "5", "--sender",
                                   model_dir, "--receiver", model_dir, "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--bits must be one of" in bad.output


@pytest.mark.parametrize("method, extra", [("nld", ["--message-tokens", "4"]), ("cipher", ["--message-tokens", "4"]),
                                           ("ac", ["--ac-combine", "sum"]), ("kvcomm_s", ["--layers", "0,2"])])
def test_run_other_methods(model_dir, tmp_path, method, extra):
    out = tmp_path / method
    result = CliRunner().invoke(app, ["run", "--method", method, "--task", "demo", "--sender", model_dir,
                                      "--receiver", model_dir, "--limit", "2", "--max-new-tokens", "4",
                                      "--dtype", "fp32", "--output", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n"] == 2
