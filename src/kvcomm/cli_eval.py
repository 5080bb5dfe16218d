"""``kvcomm eval`` (an evaluation grid) and ``kvcomm report`` (rebuild its tables and plots): ``register(app)`` adds
both commands to a typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kvcomm.cli_common import fail, setup_logging
from rich.columns import Columns
from rich.console import Console

from kvcomm.errors import KVCommError

console = Console(width=None if Console().is_terminal else 200)




def _show(run_dir: Path, written: dict[str, Path]) -> None:
    from kvcomm.report import grid_cost_table, grid_score_table, load_grid

    cells = load_grid(run_dir)
    if not cells:
        console.print(f"[yellow]{run_dir}: no finished cells (no <task>/<method>/metrics.json)[/yellow]")
        return
    console.print(Columns([grid_score_table(cells, title=f"score — {run_dir}"), grid_cost_table(cells)]))
    for name, path in written.items():
        console.print(f"{name}: {path}")


def eval_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of EvalConfig keys"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks, e.g. demo,countries"),
    methods: Optional[str] = typer.Option(None, help="comma-separated: baseline, skyline, kvcomm, kvcomm_s, qkvcomm, "
                                                     "random, ac, nld, cipher"),
    ratios: Optional[str] = typer.Option(None, help="selection ratios, e.g. 0.3,0.5,0.7"),
    sender: Optional[str] = typer.Option(None, help="hub id, local folder, .gguf file or smollm2-135m-instruct"),
    receiver: Optional[str] = typer.Option(None, help="hub id, local folder, .gguf file or smollm2-135m-instruct"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with the tasks' data files"),
    limit: Optional[int] = typer.Option(None, help="first N test items of each task"),
    answer_prefix: Optional[str] = typer.Option(None, help="text after the generation prompt, e.g. 'The answer is:'"),
    output: Optional[Path] = typer.Option(None, help="run folder (resumes when it exists)"),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, ..."),
    calib_size: Optional[int] = typer.Option(None, help="calibration items per task (shared by all ratios)"),
    sink_tokens: Optional[int] = typer.Option(None, help="sender tokens kept at non-selected layers"),
    max_input_tokens: Optional[int] = typer.Option(None, help="truncate long contexts to this many tokens"),
    max_new_tokens: Optional[int] = typer.Option(None, help="override every task's max new tokens"),
    message_tokens: Optional[int] = typer.Option(None, help="nld/cipher: phase-1 message length"),
    ac_combines: Optional[str] = typer.Option(None, help="ac: comma-separated rules (replace, sum, mean)"),
    tracking: Optional[str] = typer.Option(None, help="wandb, mlflow or none"),
    sender_url: Optional[str] = typer.Option(None, help="kvcomm/random cells through agent services: sender URL "
                                             "(serving --sender; token from $KVCOMM_TOKEN)"),
    receiver_url: Optional[str] = typer.Option(None, help="kvcomm/random cells through agent services: receiver URL"),
    progress: bool = typer.Option(True, help="progress bars"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a grid of tasks × methods × ratios for one sender/receiver pair (resumable), then print and save tables
    (results.md, results.csv) and plots (plots/*.png) in the run folder."""
    setup_logging(verbose)
    from kvcomm.evaluation import EvalConfig, run_grid
    from kvcomm.report import write_grid_report

    overrides: dict[str, Any] = dict(
        tasks=tasks, methods=methods, ratios=ratios, sender=sender, receiver=receiver,
        data_dir=str(data_dir) if data_dir else None, limit=limit, answer_prefix=answer_prefix,
        output=str(output) if output else None, dtype=dtype, device=device, calib_size=calib_size,
        sink_tokens=sink_tokens, max_input_tokens=max_input_tokens, message_tokens=message_tokens,
        ac_combines=ac_combines, tracking=tracking, sender_url=sender_url, receiver_url=receiver_url,
    )
    try:
        settings = EvalConfig.from_yaml(config) if config else EvalConfig()
        if max_new_tokens is not None:
            from dataclasses import replace

            overrides["generation"] = replace(settings.generation, max_new_tokens=max_new_tokens)
        settings = settings.with_overrides(**overrides)
        run_grid(settings, progress=progress, report=False)
        written = write_grid_report(Path(settings.output))
    except (KVCommError, ValueError) as error:
        fail(error)
    _show(Path(settings.output), written)


def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="grid run folders (OUT of kvcomm eval)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Rebuild the tables (results.md, results.csv) and plots of grid runs from their saved folders."""
    setup_logging(verbose)
    from kvcomm.report import write_grid_report

    for run_dir in run_dirs:
        if not run_dir.is_dir():
            fail(KVCommError(f"{run_dir} is not a folder"))
        _show(run_dir, write_grid_report(run_dir))


def register(app: typer.Typer) -> None:
    """Add the ``eval`` and ``report`` commands to ``app``."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
