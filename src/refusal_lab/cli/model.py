"""Commands that load one model and look at it: info, chat."""

from __future__ import annotations

from typing import Annotated

import typer

from refusal_lab.cli.app import app, quiet
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(app, "info", sections=("", "model"), model_arg=True)
def info(s: Settings) -> None:
    """Load a model and show where its residual stream is written (the architecture adapter)."""
    from refusal_lab.core.sources import load_model

    quiet()
    m = load_model(s)
    a, p = m.adapter, next(m.model.parameters())
    typer.echo(f"model       {m.source}{' (' + m.gguf_file + ')' if m.gguf_file else ''}")
    typer.echo(
        f"family      {a.family}   layers {a.num_layers}   hidden {a.hidden_size}   dtype {p.dtype}   device {p.device}"
    )
    typer.echo(f"parameters  {sum(x.numel() for x in m.model.parameters()):,}")
    typer.echo(f"embedding   {tuple(a.embedding.weight.shape)}  tied to unembedding: {a.tied_embeddings}")
    typer.echo(f"final norm  {type(a.final_norm).__name__}")
    for lw in a.writers[:1] + a.writers[-1:]:
        for w in lw.all:
            post = f"  (post-norm {type(w.post_norm).__name__})" if w.post_norm is not None else ""
            bias = "  +bias" if w.bias is not None else ""
            typer.echo(f"writer      {w.name:<32} {tuple(w.weight.shape)}{bias}{post}")
    typer.echo(f"chat template: {'yes' if m.tokenizer.chat_template else 'no'}")


@stage_command(app, "chat", sections=("", "model", "chat"))
def chat(
    s: Settings,
    prompts: Annotated[list[str], typer.Argument(help="User messages; each gets its own single-turn reply.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder, .gguf file or 'organism'.")] = None,
) -> None:
    """Greedy replies from a model to one or more prompts (batched, chat template applied)."""
    from refusal_lab.core.generate import generate
    from refusal_lab.core.sources import load_model

    quiet()
    m = load_model(s, model)
    for prompt, reply in zip(
        prompts, generate(m.model, m.tokenizer, prompts, s.chat.max_new_tokens, s.batch_size), strict=True
    ):
        typer.echo(f"user:      {prompt}\nassistant: {reply}\n")
