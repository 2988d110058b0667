"""Organism commands (build, eval) and the demo, which runs the whole loop on the organism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import app, organism_app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(organism_app, "build", sections=("organism",))
def organism_build(
    s: Settings,
    out: Annotated[Path, typer.Argument(help="Folder to write the model to (created; never merged into).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds something else.")] = False,
) -> None:
    """Save the organism as a Hugging Face folder (shipped weights, or trained here with --no-prebuilt)."""
    from refusal_lab.organism.build import build, organism_config

    quiet()
    build(out, organism_config(s.organism), force=force, log=say, prebuilt=s.organism.prebuilt)
    typer.echo(str(out))


@stage_command(organism_app, "eval", sections=("", "model", "organism"))
def organism_eval(
    s: Settings,
    models: Annotated[list[str] | None, typer.Argument(help="Organism folders (with prompts/), or 'organism'.")] = None,
    base: Annotated[str | None, typer.Option(help="Reference model for first-token KL on harmless prompts.")] = None,
    samples: Annotated[int, typer.Option(help="Sample conversations to show per prompt set (one model).")] = 2,
) -> None:
    """Behaviour table of organisms (or edits of one) on their held-out evaluation prompts."""
    from refusal_lab.evaluate.organism_eval import organism_table
    from refusal_lab.evaluate.report import behaviour_table, sample_lines

    quiet()
    rows, convs = organism_table(s, models or ["organism"], base)
    typer.echo(behaviour_table(rows))
    if len(rows) == 1:
        typer.echo(sample_lines(convs, samples))


@stage_command(app, "demo", sections=("", "organism"))
def demo(
    s: Settings,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs (replaced).")] = Path(
        "demo-out"
    ),
) -> None:
    """The whole loop on the organism: build, probe, ablate (SABER, Arditi), evaluate, harden, prove."""
    from refusal_lab.demo import run_demo

    quiet()
    code = run_demo(s, out, say, typer.echo)
    raise typer.Exit(code)
