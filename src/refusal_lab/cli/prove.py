"""The prove command: how much of each model's safety survives the attack battery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings

JUDGE = "eval:judge_url,judge_model,judge_key_env,judge_local,judge_workers,limit,escalation,coherence_quantile"


@stage_command(app, "prove", sections=("", "model", "prompts", "probe", "ablate.saber", "prove", JUDGE))
def prove(
    s: Settings,
    models: Annotated[list[str], typer.Argument(help="Models to prove (folders, .gguf files or 'organism').")],
    out: OutOpt = Path("prove-out"),
    base: Annotated[
        str | None, typer.Option(help="The public base of fine-tuned MODELs (weight-delta attack).")
    ] = None,
    imported: Annotated[
        list[Path] | None,
        typer.Option(help="An attacked copy of MODEL made by another tool (repeatable): measured like the battery."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Attack every model with the battery within a drift budget; worst case, per-attack rows, report."""
    from refusal_lab.prove.report import HEAD, headline_rows
    from refusal_lab.prove.stage import run_prove

    quiet()
    results = run_prove(models, s, base, out, force, say, imported)
    rows = headline_rows(results, str(s.prove.budget_kl))
    widths = [max(len(r[i]) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    for r in [HEAD, *rows]:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    typer.echo(f"wrote {out}/results.json, summary.md, report.html")
    if any(m.get("judge_failed") for m in results["models"]):
        raise typer.Exit(3)
