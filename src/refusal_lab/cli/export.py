"""The export command: a model folder as one GGUF file, made by llama.cpp's own converter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import app, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(app, "export", sections=("",))
def export(
    s: Settings,
    model: Annotated[
        str, typer.Argument(help="A Hugging Face model folder (an ablated or hardened one), or 'organism'.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The GGUF file to write.")],
    gguf: Annotated[str, typer.Option("--gguf", help="Weight type: f16, bf16, q8_0 or f32.")] = "f16",
    converter: Annotated[
        Path | None,
        typer.Option(help="llama.cpp's converter offline: a llama-cpp-python sdist (.tar.gz) or an unpacked folder."),
    ] = None,
) -> None:
    """Write MODEL as a GGUF file that llama.cpp (and tools built on it) loads."""
    from refusal_lab.organism.source import model_path
    from refusal_lab.ship.gguf import export_gguf

    say(f"converting {model} to {gguf} with llama.cpp's convert_hf_to_gguf.py")
    path = export_gguf(model_path(s, model), out, gguf, s.cache_dir, converter)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
