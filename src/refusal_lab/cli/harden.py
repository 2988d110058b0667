"""The harden command: two-stage safety fine-tuning whose refusals should survive the attack battery."""

from __future__ import annotations

from pathlib import Path

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(app, "harden", sections=("", "model:-quantize", "prompts", "harden"), model_arg=True)
def harden(s: Settings, out: OutOpt = Path("hardened"), force: ForceOpt = False) -> None:
    """Midtrain on specification documents, then LoRA alignment fine-tuning; merge into a model folder."""
    from refusal_lab.core.artifacts import check_output
    from refusal_lab.harden.stage import run_harden
    from refusal_lab.organism.source import load_model

    check_output(out, force)
    quiet()
    if s.model.quantize != "none":  # harden's --quantize is [harden] quantize; its merge needs a full-precision base
        say(f"harden: model.quantize ({s.model.quantize}) is not read; the base loads as harden.quantize "
            f"({s.harden.quantize}) says")  # fmt: skip
        s.model.quantize = "none"
    record = run_harden(load_model(s, quantize=s.harden.quantize), s, out, force, say)
    if record is not None:
        typer.echo(f"wrote {out} ({record.steps} steps)")
