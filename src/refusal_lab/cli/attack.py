"""The attack commands: probe (directions and scores), ablate (an edited model folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, ProbeDirOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings

ATTACK = ("", "model", "prompts", "probe")
LoraOpt = Annotated[
    Path | None,
    typer.Option(
        "--lora",
        help="Also write the edit as a PEFT LoRA adapter folder here (exact: its merge into the model is the edited "
        "folder's weights; refused for an edit that is not low-rank or changes a bias or a tied embedding).",
    ),
]


@stage_command(app, "probe", sections=ATTACK, model_arg=True)
def probe(s: Settings, out: OutOpt = Path("probe-out"), force: ForceOpt = False) -> None:
    """Extract refusal directions at every layer and score them (FDR, entanglement); write them to OUT."""
    from refusal_lab.core.artifacts import check_output
    from refusal_lab.core.sources import Source
    from refusal_lab.organism.source import load_model
    from refusal_lab.probe.stage import run_probe, write_probe

    check_output(out, force)
    quiet()
    m = load_model(s)
    sets = Source.of(m.source).probe_sets(s.prompts)
    result = run_probe(m, sets, s.probe, s.batch_size, s.cache_dir / "activations", say)
    write_probe(out, result, m, s, sets, force)
    summ = result.summary()
    typer.echo(
        f"wrote {out}: best layer {summ['best_layer']}, top direction carries {summ['top_direction_share']:.0%} "
        f"of separability, top layer {summ['top_layer_share']:.0%}"
    )


@stage_command(
    app, "ablate", sections=(*ATTACK, "ablate", "ablate.saber", "ablate.arditi", "ablate.kernel"), model_arg=True
)
def ablate(
    s: Settings,
    out: OutOpt = Path("ablated"),
    probe_dir: ProbeDirOpt = None,
    lora: LoraOpt = None,
    force: ForceOpt = False,
) -> None:
    """Remove refusal directions from the weights (SABER, Arditi, projected, kernel); save an ordinary model folder."""
    from refusal_lab.ablate.stage import run_ablate
    from refusal_lab.core.artifacts import check_output
    from refusal_lab.core.model import refuse_weight_edits
    from refusal_lab.organism.source import load_model

    measured = s.ablate.norm_preserving and s.ablate.method in ("saber", "arditi")  # measured on the weights
    refuse_weight_edits(
        s.model.quantize,
        [f"{s.ablate.method} with norm-preserving edits"] if measured else [],
        "drop --norm-preserving or --quantize, or use --method projected or kernel",
    )
    check_output(out, force)
    if lora is not None:
        check_output(lora, force)
    quiet()
    run_ablate(load_model(s), s, out, probe_dir, force, say, lora)
    typer.echo(f"wrote {out}" + (f" and the adapter {lora}" if lora else ""))
