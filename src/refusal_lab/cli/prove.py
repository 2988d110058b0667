"""The prove command: how much of each model's safety survives the attack battery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings

EVAL = (  # what prove's measurements read: the judge, the held-out sets, sampling, escalation, capability
    "eval:judge_url,judge_model,judge_key_env,judge_local,judge_workers,judge_retries,limit,escalation,independent,"
    "sample,sample_seed,lm_eval,lm_eval_include,coherence_quantile"
)
SEARCH = "search:methods,kl_prune,proxy,proxy_margin,proxy_learn,select_start"  # what the search attack reads
ATTACKS = ("probe", "ablate:norm_preserving", "ablate.saber", "ablate.arditi", SEARCH)  # what the attacks read


def weight_edits(s: Settings, base: str | None, imported: list[Path] | None) -> dict[str, str]:
    """What in this proof edits the weights in place (no 4/8-bit model can take it), each with how to leave it out."""
    attacks = s.prove.attack_list
    rest = ",".join(a for a in attacks if a != "search")
    found = {
        "the search attack": ("search" in attacks, f"pass --attacks {rest}" if rest else "pick other --attacks"),
        "the weight-delta attack": (bool(base) and "delta" in attacks, "drop --base"),
        "the imported copies": (bool(imported), "drop --imported"),
        "norm-preserving edits": (s.ablate.norm_preserving, "drop --norm-preserving"),
    }
    return {name: fix for name, (on, fix) in found.items() if on}


@stage_command(app, "prove", sections=("", "model", "prompts", *ATTACKS, "prove", EVAL))
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
    from refusal_lab.core.model import refuse_weight_edits
    from refusal_lab.prove.report import HEAD, headline_rows, prefill_summary
    from refusal_lab.prove.stage import replies_paths, run_prove

    edits = weight_edits(s, base, imported)
    refuse_weight_edits(s.model.quantize, list(edits), "; ".join([*edits.values(), "or drop --quantize"]))
    quiet()
    results = run_prove(models, s, base, out, force, say, imported)
    rows = headline_rows(results, str(s.prove.budget_kl))
    widths = [max(len(r[i]) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    for r in [HEAD, *rows]:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    for model, _, opener, tokens, refused, complied, broken in prefill_summary(results):
        typer.echo(f"{model}: worst prefill {opener} ({tokens} tokens): {refused} refused, {complied} complied, "
                   f"{broken} broken")  # fmt: skip
    typer.echo(f"wrote {out}/results.json, summary.md, report.html")
    for path in replies_paths(out.expanduser().resolve(), results) if s.prove.save_replies else []:
        if path.is_file():
            typer.echo(f"wrote {path}: the worst case's held-out replies (refusal-lab label reads them)")
        else:
            typer.echo(f"no replies for {path.stem}: no directional attack in --attacks made a worst case")
        if each := sorted(path.with_suffix("").glob("*.jsonl")):
            typer.echo(f"wrote {path.with_suffix('')}/: the replies of {len(each)} held-out measurements, as counted")
    if any(m.judge_failed for m in results.models):
        raise typer.Exit(3)
