"""The ``kvcomm`` command: a thin shell over the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kvcomm.cli_common import fail, setup_logging
from rich.console import Console

from kvcomm.errors import KVCommError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LLM agents that communicate through their KV caches (KVComm).")
console = Console(width=None if Console().is_terminal else 132)

PACKAGED = "smollm2-135m-instruct"




def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"--ratios must be numbers separated by commas, got {text!r}")


@app.command()
def run(
    method: str = typer.Option(..., help="baseline, skyline, kvcomm, qkvcomm, kvcomm_s, ac, nld or cipher"),
    task: str = typer.Option(..., help="demo, countries, tipsheets, hotpotqa, qasper, musique, multifieldqa_en, "
                             "twowikimqa or tmath"),
    sender: str = typer.Option(PACKAGED, help="hub id, local folder, .gguf file or smollm2-135m-instruct"),
    receiver: str = typer.Option(PACKAGED, help="hub id, local folder, .gguf file or smollm2-135m-instruct"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with the task's data files"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N test items"),
    layers: Optional[str] = typer.Option(None, help="shared layers, e.g. '0,3,5' or '4-12' (contiguous)"),
    ratio: Optional[float] = typer.Option(None, help="share the top ceil(ratio*L) layers"),
    selection: str = typer.Option("kvcomm", help="with --ratio: kvcomm (calibrated scores) or random"),
    calib_size: int = typer.Option(1, help="calibration items (never test items)"),
    alpha: float = typer.Option(1.0, help="weight of attention importance vs. the Gaussian prior"),
    mu: float = typer.Option(0.5, help="prior centre as a fraction of L-1"),
    sigma: float = typer.Option(10.0, help="prior width in layers"),
    seed: int = typer.Option(42, help="seed for random selection and sampling"),
    sink_tokens: int = typer.Option(1, help="sender tokens kept at non-selected layers (1 = attention sink, 0 = none)"),
    answer_prefix: str = typer.Option("", help="text after the receiver's generation prompt, e.g. 'The answer is:'"),
    bits: int = typer.Option(4, help="qkvcomm: uniform KV bit width 2/3/4/6/8, 16 = unquantized"),
    group_size: int = typer.Option(32, help="qkvcomm: quantization group size"),
    adaptive_bits: Optional[float] = typer.Option(None, help="qkvcomm: average width for per-layer adaptive bits"),
    sensitivity: str = typer.Option("relative", help="qkvcomm: sensitivity measure for adaptive bits (relative, kl)"),
    facts_budget: int = typer.Option(0, help="qkvcomm: tokens of key facts sent beside the KV (0 = none)"),
    match: str = typer.Option("none", help="qkvcomm: moment-match sender KV to receiver statistics "
                              "(none, per_dimension, scalar)"),
    match_samples: int = typer.Option(8, help="qkvcomm: calibration contexts for moment matching"),
    map_depth: bool = typer.Option(False, help="qkvcomm: accept a receiver of another depth (relative-depth map)"),
    message_tokens: int = typer.Option(256, help="nld/cipher: phase-1 message length"),
    sender_aware: bool = typer.Option(False, help="nld/cipher: sender summarises for another agent"),
    ac_combine: str = typer.Option("replace", help="ac: replace, sum or mean"),
    max_input_tokens: Optional[int] = typer.Option(None, help="prompt budget for tasks that truncate long contexts "
                                                   "(default: the receiver's window minus max new tokens)"),
    sender_url: Optional[str] = typer.Option(None, help="kvcomm between agent services: the sender's URL"),
    receiver_url: Optional[str] = typer.Option(None, help="kvcomm between agent services: the receiver's URL"),
    agent_token: Optional[str] = typer.Option(None, envvar="KVCOMM_TOKEN", help="bearer token of the agents"),
    max_new_tokens: Optional[int] = typer.Option(None, help="override the task's max new tokens"),
    do_sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, help="sampling temperature"),
    dtype: str = typer.Option("bf16", help="bf16 or fp32"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    output: Path = typer.Option(Path("runs/run"), help="results folder (resumes when it exists)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one method on one task and write predictions.jsonl, metrics.json and config.json."""
    setup_logging(verbose)
    from kvcomm.experiment import QuantOptions, RunOptions, SelectionOptions, run as run_cell
    from kvcomm.generation import GenerationSettings
    from kvcomm.report import summary_table

    try:
        options = RunOptions(
            method=method, task=task, sender=sender, receiver=receiver,
            data_dir=str(data_dir) if data_dir else None, limit=limit, dtype=dtype, device=device,
            sink_tokens=sink_tokens, answer_prefix=answer_prefix,
            generation=GenerationSettings(max_new_tokens, do_sample, temperature, seed=seed if do_sample else None),
            selection=SelectionOptions(layers, ratio, selection, calib_size, alpha, mu, sigma, seed),
            quant=QuantOptions(bits, group_size, adaptive_bits, sensitivity, facts_budget, match, match_samples,
                               map_depth),
            message_tokens=message_tokens, sender_aware=sender_aware, ac_combine=ac_combine,
            max_input_tokens=max_input_tokens, sender_url=sender_url, receiver_url=receiver_url,
            agent_token=agent_token,
        )
        summary = run_cell(options, output)
    except (KVCommError, ValueError) as error:
        fail(error)
    console.print(summary_table([summary], title=f"{task} → {output}"))
    console.print(f"{summary['method']} on {summary['task']}: {summary['metric']} = {summary['score']:.3f} "
                  f"over {summary['n']} items, mean KV {summary['mean_kv_bytes'] / 1024:.1f} KiB"
                  + (f" + {summary['costs']['mean_text_bytes']:.0f} B text" if summary["costs"]["mean_text_bytes"] else ""))


@app.command()
def calibrate(
    task: str = typer.Option("demo", help="task whose calibration split is used"),
    sender: str = typer.Option(PACKAGED),
    receiver: str = typer.Option(PACKAGED),
    data_dir: Optional[Path] = typer.Option(None),
    calib_size: int = typer.Option(1),
    alpha: float = typer.Option(1.0),
    mu: float = typer.Option(0.5),
    sigma: float = typer.Option(10.0),
    ratios: str = typer.Option("0.3,0.5,0.7", help="ratios whose chosen layers are shown"),
    dtype: str = typer.Option("bf16"),
    device: str = typer.Option("cpu"),
    output: Path = typer.Option(Path("runs/calibration"), help="folder for layer_scores.json and the plot"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compute, print and save the KVComm per-layer scores and the layers chosen at each ratio."""
    setup_logging(verbose)
    from kvcomm.experiment import SelectionOptions, calibrate_on_split, load_pair
    from kvcomm.report import plot_scores, scores_table
    from kvcomm.tasks import get_task

    try:
        chosen_ratios = _ratios(ratios)
        options = SelectionOptions(calib_size=calib_size, alpha=alpha, mu=mu, sigma=sigma)
        split = get_task(task).load(data_dir)
        sender_model, receiver_model = load_pair(sender, receiver, dtype, device)
        scores = calibrate_on_split(sender_model, receiver_model, split, options)
        table = scores_table(scores, chosen_ratios)
        selections = {ratio: scores.select(ratio) for ratio in chosen_ratios}
    except (KVCommError, ValueError) as error:
        fail(error)
    scores.save(output / "layer_scores.json")
    plot_scores(scores, output / "layer_scores.png")
    console.print(table)
    for ratio, layers in selections.items():
        console.print(f"ratio {ratio:g}: {len(layers)} layers {list(layers)}")
    console.print(f"saved {output / 'layer_scores.json'} and {output / 'layer_scores.png'}")


@app.command()
def check(
    sender: str = typer.Option(PACKAGED),
    receiver: str = typer.Option(PACKAGED),
    dtype: str = typer.Option("fp32", help="fp32 gives the tight check; bf16 needs a looser --tolerance"),
    device: str = typer.Option("cpu"),
    tolerance: Optional[float] = typer.Option(
        None, help="largest allowed |logit difference| (default 1e-3 in fp32; 2.0 in bf16/fp16, where the two "
                   "kernel paths round differently and only the greedy tokens are a tight check)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Verify a pair: compatibility, and that sharing every layer reproduces the single-model run."""
    setup_logging(verbose)
    from kvcomm.checks import equivalence
    from kvcomm.experiment import load_pair

    try:
        sender_model, receiver_model = load_pair(sender, receiver, dtype, device)
    except KVCommError as error:
        fail(error)
    console.print(f"compatible: {sender_model.fingerprint.model_id} → {receiver_model.fingerprint.model_id} "
                  f"({receiver_model.num_layers} layers, {receiver_model.fingerprint.num_kv_heads} KV heads, "
                  f"head dim {receiver_model.fingerprint.head_dim})")
    if tolerance is None:
        tolerance = 1e-3 if dtype in ("fp32", "float32") else 2.0
    result = equivalence(sender_model, receiver_model)
    tokenizer = receiver_model.tokenizer
    console.print(f"max |logit difference| all layers shared vs. single model: {result.max_logit_diff:.3g} "
                  f"(tolerance {tolerance:g})")
    console.print(f"greedy tokens identical: {result.tokens_equal} "
                  f"({tokenizer.decode(result.kvcomm_tokens)!r} vs {tokenizer.decode(result.single_tokens)!r})")
    console.print(f"without the shared KV the answer changes: {result.kv_matters} "
                  f"({tokenizer.decode(result.no_kv_tokens)!r})")
    if result.max_logit_diff > tolerance or not result.tokens_equal:
        console.print("[red]FAILED[/red]")
        raise typer.Exit(1)
    console.print("[green]OK[/green]")


def _compare(task: str, model: str, data_dir: Optional[Path], limit: Optional[int], ratios: str,
             answer_prefix: str, sink_tokens: int, calib_size: int, alpha: float, dtype: str, device: str,
             output: Path, title: str) -> None:
    from kvcomm.experiment import SelectionOptions, compare_methods, load_pair
    from kvcomm.report import markdown_table, summary_table

    try:
        selection = SelectionOptions(calib_size=calib_size, alpha=alpha)
        sender_model, receiver_model = load_pair(model, model, dtype, device)
        summaries = compare_methods(sender_model, receiver_model, task, output, ratios=_ratios(ratios),
                                    data_dir=str(data_dir) if data_dir else None, limit=limit,
                                    answer_prefix=answer_prefix, sink_tokens=sink_tokens, selection=selection)
    except (KVCommError, ValueError) as error:
        fail(error)
    (output / "summary.md").write_text(markdown_table(summaries))
    console.print(summary_table(summaries, title=title))
    console.print(f"results in {output}/ (summary.md, one folder per method)")


@app.command()
def compare(
    task: str = typer.Option(..., help="demo, countries, tipsheets or hotpotqa"),
    model: str = typer.Option(PACKAGED, help="used as both sender and receiver"),
    data_dir: Optional[Path] = typer.Option(None),
    limit: Optional[int] = typer.Option(None),
    ratios: str = typer.Option("0.3,0.5,0.7"),
    answer_prefix: str = typer.Option("", help="e.g. 'The answer is:'"),
    sink_tokens: int = typer.Option(1),
    calib_size: int = typer.Option(1),
    alpha: float = typer.Option(1.0),
    dtype: str = typer.Option("bf16"),
    device: str = typer.Option("cpu"),
    output: Path = typer.Option(Path("runs/compare")),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Baseline, Skyline and calibrated KVComm at several ratios on one task, in one table."""
    setup_logging(verbose)
    _compare(task, model, data_dir, limit, ratios, answer_prefix, sink_tokens, calib_size, alpha, dtype, device,
             output, title=f"{task}: {model} as both agents")


@app.command()
def demo(
    model: str = typer.Option(PACKAGED, help="used as both sender and receiver"),
    limit: int = typer.Option(30, help="number of demo items"),
    ratios: str = typer.Option("0.3,0.5,0.7"),
    sink_tokens: int = typer.Option(1),
    dtype: str = typer.Option("bf16"),
    device: str = typer.Option("cpu"),
    output: Path = typer.Option(Path("runs/demo")),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Baseline, Skyline and KVComm at three ratios on the built-in facts task (no data files needed)."""
    setup_logging(verbose)
    _compare("demo", model, None, limit, ratios, "", sink_tokens, 1, 1.0, dtype, device, output,
             title=f"demo: {limit} generated facts, {model} as both agents (score = gold string in the answer)")


def _register_commands() -> None:
    """``eval`` / ``report`` (evaluation harness) and ``serve`` / ``agent`` / ``topology`` (agent services)."""
    from kvcomm import cli_eval
    from kvcomm.service import cli as service_cli

    cli_eval.register(app)
    service_cli.register(app)


_register_commands()

if __name__ == "__main__":
    app()
