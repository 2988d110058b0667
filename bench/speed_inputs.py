"""What the speed benchmarks share: a model (the organism, a folder or a hub id) in a dtype, and the
harmful prompts to time it on (the organism's own, or a CSV/JSONL column)."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusal_lab.config import load_settings
from refusal_lab.core.model import Loaded
from refusal_lab.core.prompts import load_prompts
from refusal_lab.organism.build import prompt_sets
from refusal_lab.organism.source import load_model


def add_model_options(ap: argparse.ArgumentParser, prompts: int = 64) -> None:
    ap.add_argument("--model", default="organism")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--prompts", type=int, default=prompts)


def model_and_prompts(args: argparse.Namespace, reported: bool = False) -> tuple[Loaded, list[str]]:
    """The model and `--prompts` harmful prompts: the file's last ones where `reported` (the half prove
    reports on), else its first; the organism's evaluation prompts without `--harmful`."""
    m = load_model(load_settings(**{"model.path": args.model, "model.dtype": args.dtype}))
    if args.harmful:
        every = [p.prompt for p in load_prompts(args.harmful, args.column)]
        return m, every[-args.prompts :] if reported else every[: args.prompts]
    return m, [p.prompt for p in prompt_sets(m.folder, "eval")["harmful"]][: args.prompts]
