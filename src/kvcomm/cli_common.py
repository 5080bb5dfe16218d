"""Helpers shared by the command modules: logging setup and the error exit."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

console = Console(width=None if Console().is_terminal else 132)


def setup_logging(verbose: bool) -> None:
    """``logging`` at INFO (``verbose``) or WARNING; transformers' own logs and bars silenced."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fail(error: Exception) -> None:
    """Print ``error`` in red and exit with status 2."""
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)
