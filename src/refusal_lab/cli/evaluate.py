"""The evaluate command: every number for one or more models, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, ProbeDirOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(app, "eval", sections=("", "model", "prompts", "eval"))
def eval_cmd(
    s: Settings,
    models: Annotated[list[str], typer.Argument(help="Models to evaluate (folders, .gguf files or 'organism').")],
    out: OutOpt = Path("eval-out"),
    base: Annotated[str | None, typer.Option(help="Base model for KL (first token and teacher-forced).")] = None,
    probe_dir: ProbeDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Refused / complied / broken, over-refusal, KL, capability, escalation: results.json, summary.md, report.html."""
    from refusal_lab.core.artifacts import check_output
    from refusal_lab.evaluate.report import headline_table
    from refusal_lab.evaluate.runner import evaluate_models

    check_output(out, force)
    quiet()
    outcome = evaluate_models(models, s, base, out, probe_dir, force, say)
    typer.echo(headline_table(outcome.rows))
    typer.echo(f"wrote {out}/results.json, summary.md, report.html")
    if outcome.judge_failed:
        say(f"refusal-lab: judge failed, keyword scores only: {outcome.judge_failed}")
        raise typer.Exit(3)
