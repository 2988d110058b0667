"""The `refusal-lab` command: the root, error handling and shared helpers.

Each command group lives in its own module and only parses, builds settings, calls one stage
function and prints. Heavy libraries (torch, transformers) are imported inside commands, so
`refusal-lab --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from refusal_lab import __version__
from refusal_lab.errors import UserError

app = typer.Typer(
    name="refusal-lab",
    help="Find, attack, harden and measure the safety behaviour of open-weight chat models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
organism_app = typer.Typer(help="Build and inspect the embedded default model organism.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be new or empty).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it is not empty.")]
ProbeDirOpt = Annotated[Path | None, typer.Option("--probe", help="A probe folder made from this model.")]


def say(message: str) -> None:
    """Progress and notes go to stderr; results go to stdout."""
    typer.echo(message, err=True)


def quiet() -> None:
    """Keep transformers' own warnings out of user-facing output unless --debug (progress bars stay)."""
    if "--debug" not in sys.argv:
        import warnings

        from transformers.utils import logging

        logging.set_verbosity_error()
        warnings.filterwarnings("ignore")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """refusal-lab: probe, ablate, evaluate, search, harden and prove refusal behaviour."""
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    """Entry point: user errors become one line and exit code 2 (full traceback with --debug)."""
    from refusal_lab.cli import commands  # noqa: F401 - registers the commands on `app`

    try:
        app()
    except UserError as exc:
        if "--debug" in sys.argv:
            raise
        typer.echo(f"refusal-lab: error: {exc.problem} (fix: {exc.fix})", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("refusal-lab: interrupted", err=True)
        sys.exit(130)
