"""The search commands: search (a resumable study over ablation settings), pick (export a front trial)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, app, quiet, say
from refusal_lab.cli.attack import LoraOpt
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings
from refusal_lab.core.artifacts import SETTINGS_FILE

# what the search reads beyond its own section: the layer selection's KL limit, norm-preserving edits, coherence
SECTIONS = ("", "model", "prompts", "probe", "search", "ablate:norm_preserving", "ablate.arditi:arditi_max_kl",
            "eval:coherence_quantile")  # fmt: skip


@stage_command(app, "search", sections=SECTIONS, model_arg=True)
def search(
    s: Settings,
    out: Annotated[Path, typer.Option("--out", "-o", help="Study folder (resumed when it exists).")] = Path(
        "search-out"
    ),
) -> None:
    """Multi-objective Optuna search over ablation settings (compliance vs KL), resumable and shareable."""
    from refusal_lab.organism.source import load_model
    from refusal_lab.search.report import front_table
    from refusal_lab.search.stage import run_search

    refuse_quantized_search(s)
    quiet()
    front = run_search(load_model(s), s, out, say)
    typer.echo(front_table(front))
    typer.echo(f"wrote {out}/pareto.json and pareto.svg; export a trial with: refusal-lab pick {out} --max-kl X -o OUT")


def refuse_quantized_search(s: Settings) -> None:
    """Search and pick edit each trial's weights (and rebuild a trial as the search measured it): full models only."""
    from refusal_lab.core.model import refuse_weight_edits

    refuse_weight_edits(s.model.quantize, ["a search trial"], "run search and pick without --quantize")


def _study_settings(args: dict) -> Path | None:
    path = args["study"] / SETTINGS_FILE
    return path if path.is_file() else None


@stage_command(app, "pick", sections=SECTIONS, default_config=_study_settings)
def pick(
    s: Settings,
    study: Annotated[Path, typer.Argument(help="A search output folder (its settings.toml is read).")],
    out: OutOpt,
    max_kl: Annotated[float | None, typer.Option(help="The front's most compliant trial with KL at most this.")] = None,
    min_complied: Annotated[
        int | None, typer.Option(help="The front's least-KL trial complying at least this often.")
    ] = None,
    lora: LoraOpt = None,
    force: ForceOpt = False,
) -> None:
    """Export one trial of a search's Pareto front as an edited model folder (through the ablate stage)."""
    from refusal_lab.core.artifacts import check_output
    from refusal_lab.errors import UserError
    from refusal_lab.organism.source import load_model
    from refusal_lab.search.pick import pick_and_export

    if not (study / SETTINGS_FILE).is_file():
        raise UserError(
            f"{study} is not a search folder (no {SETTINGS_FILE})", "run refusal-lab search -o FOLDER first"
        )
    refuse_quantized_search(s)
    check_output(out, force)
    if lora is not None:
        check_output(lora, force)
    quiet()
    pick_and_export(load_model(s), s, study, max_kl, min_complied, out, force, say, lora)
    typer.echo(f"wrote {out}" + (f" and the adapter {lora}" if lora else ""))
