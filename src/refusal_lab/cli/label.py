"""The label command: refused / complied / broken for replies that came from anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refusal_lab.cli.app import ForceOpt, OutOpt, app, quiet, say
from refusal_lab.cli.options import stage_command
from refusal_lab.config import Settings


@stage_command(
    app,
    "label",
    sections=(
        "",
        "model",
        "eval:max_new_tokens,sample,sample_seed,judge_url,judge_model,judge_key_env,judge_local,judge_workers,"
        "judge_retries,coherence_quantile",
    ),
)
def label_cmd(
    s: Settings,
    replies: Annotated[
        Path,
        typer.Argument(help="JSONL: prompt, response (optional reasoning, reading); or a folder of such files."),
    ],
    out: OutOpt = Path("label-out"),
    base: Annotated[
        str | None, typer.Option(help="The model the replies' model was made from: coherence instead of keywords.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Label replies from any source with the eval scorer: labels.jsonl, summary.json, summary.md (per file of
    a folder, with a summary.md over them)."""
    from refusal_lab.evaluate.label import run_label

    quiet()
    labels = run_label(replies, s, base, out, force, say)
    typer.echo(labels.markdown())
    each = "one folder per file, and summary.md" if replies.is_dir() else "labels.jsonl, summary.json, summary.md"
    typer.echo(f"wrote {out}/: {each}")
    if (stopped := labels.failed) is not None:
        say(f"refusal-lab: the judge stopped after {stopped.n} of {stopped.of} replies: {stopped.judge_failed}")
        raise typer.Exit(3)
