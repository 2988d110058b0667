"""Commands that load a model and look at it or talk to it: info, chat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import app, quiet
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings

HELP = "commands: /reset (forget the conversation), /system TEXT, /save FILE, /quit"


@stage_command(app, "info", sections=("", "model"), model_arg=True)
def info(s: Settings) -> None:
    """Load a model and show where its residual stream is written (the architecture adapter)."""
    from refusal_lab.organism.source import load_model

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


@stage_command(app, "chat", sections=("", "model", "chat"), model_arg=True)
def chat(
    s: Settings,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Answer this one message and exit (for scripts).")
    ] = None,
    compare: Annotated[str | None, typer.Option(help="A second model answering beside the first.")] = None,
    system: Annotated[str, typer.Option(help="System prompt.")] = "",
) -> None:
    """Talk to a model: streamed replies, history, reasoning shown apart; --compare puts two side by side."""
    from refusal_lab.core.chat import Conversation
    from refusal_lab.errors import UserError
    from refusal_lab.organism.source import load_model

    if prompt is None and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("chat needs an interactive terminal", "pass --prompt TEXT to answer one message from a script")
    quiet()
    models = [load_model(s)] + ([load_model(s, compare)] if compare else [])
    convs = [Conversation(system) for _ in models]
    if prompt is not None:
        _turn(models, convs, prompt, s.chat.max_new_tokens, plain=True)
        return
    _interactive(models, convs, s.chat.max_new_tokens)


def _turn(models: list, convs: list, user: str, max_new: int, plain: bool = False) -> None:
    """One user message: streamed from one model, or both models' replies side by side."""
    from rich.console import Console
    from rich.table import Table

    from refusal_lab.core.chat import reply, stream

    console = Console(highlight=False, soft_wrap=not plain)
    if len(models) == 1:
        answer: list[str] = []
        for piece in stream(models[0], convs[0].messages(user), max_new):
            console.print(piece.text, style="dim italic" if piece.reasoning else None, end="", markup=False)
            if not piece.reasoning:
                answer.append(piece.text)
        console.print()
        convs[0].add(user, "".join(answer).strip())
        return
    table = Table(show_lines=True, expand=True)
    results = [reply(m, c.messages(user), max_new) for m, c in zip(models, convs, strict=True)]
    for m in models:
        table.add_column(m.name)
    table.add_row(*[(f"[dim]{r}[/dim]\n" if r else "") + a.replace("[", r"\[") for a, r in results])
    console.print(table)
    for c, (a, _) in zip(convs, results, strict=True):
        c.add(user, a)


def _interactive(models: list, convs: list, max_new: int) -> None:
    from prompt_toolkit import PromptSession

    typer.echo(f"chatting with {' and '.join(m.name for m in models)}; {HELP}")
    session: PromptSession = PromptSession()
    while True:
        try:
            line = session.prompt("> ").strip()
        except (EOFError, KeyboardInterrupt):
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            for c in convs:
                c.reset()
            typer.echo("(conversation forgotten)")
        elif line.startswith("/system"):
            for c in convs:
                c.system = line.removeprefix("/system").strip()
            typer.echo(f"(system prompt: {convs[0].system or 'none'})")
        elif line.startswith("/save"):
            path = Path(line.removeprefix("/save").strip() or "conversation.json")
            convs[0].save(path)
            typer.echo(f"(saved {path})")
        elif line.startswith("/"):
            typer.echo(HELP)
        else:
            _turn(models, convs, line, max_new)
