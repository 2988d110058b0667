"""Prompt sets on disk: TXT (one per line), JSONL ({"prompt": ...}) or CSV (a named column)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from refusal_lab.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """A prompt with optional category and exact expected answer (capability tasks)."""

    prompt: str
    category: str = ""
    answer: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False)


TRAINED_PROMPTS = "trained_prompts.json"  # in a hardened folder: hashes of the prompts it was trained on


def prompt_hash(text: str) -> str:
    """A prompt's identity across files (case and spacing do not count); a hash, so no request is copied."""
    return hashlib.sha256(" ".join(text.casefold().split()).encode()).hexdigest()[:16]


def write_trained_prompts(folder: Path, prompts: list[str]) -> None:
    """Record in `folder` which prompts a model was trained on, so no report is made on them."""
    (folder / TRAINED_PROMPTS).write_text(json.dumps(sorted({prompt_hash(p) for p in prompts})) + "\n")


def trained_prompts(folder: Path) -> set[str]:
    """The hashes a folder records (empty for a model refusal-lab did not train)."""
    path = folder / TRAINED_PROMPTS
    return set(json.loads(path.read_text())) if path.is_file() else set()


def load_prompts(path: Path, column: str = "prompt") -> list[Prompt]:
    """Read a prompt file; errors name the file, the line and the fix."""
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist", "check the path")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        prompts = _jsonl(path, text, column)
    elif suffix == ".csv":
        prompts = _csv(path, text, column)
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(
            f"prompt file {path} has no prompts", "add prompts, one per line (TXT) or one object per line (JSONL)"
        )
    return prompts


def jsonl_rows(path: Path, text: str | None = None) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a bad line is named in the error."""
    out = []
    for n, line in enumerate((path.read_text() if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n} is not valid JSON ({exc.msg})", "write one JSON object per line") from exc
    return out


def _jsonl(path: Path, text: str, column: str) -> list[Prompt]:
    out = []
    for n, row in jsonl_rows(path, text):
        if not isinstance(row, dict) or not isinstance(row.get(column), str) or not row[column].strip():
            raise UserError(
                f"{path}:{n} has no non-empty string field {column!r}", f'give each line a "{column}" field'
            )
        extra = {k: str(v) for k, v in row.items() if k not in {column, "category", "answer"}}
        out.append(Prompt(row[column], str(row.get("category", "")), str(row.get("answer", "")), extra))
    return out


def _csv(path: Path, text: str, column: str) -> list[Prompt]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise UserError(
            f"{path} has no column {column!r} (columns: {', '.join(reader.fieldnames or [])})",
            "pass the prompt column's name with --column",
        )
    cat = next((c for c in ("category", "Category", "SemanticCategory") if c in reader.fieldnames), None)
    return [Prompt(row[column], row.get(cat, "") if cat else "") for row in reader if (row.get(column) or "").strip()]


def write_jsonl(path: Path, prompts: list[Prompt]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            row = {"prompt": p.prompt, "category": p.category, **({"answer": p.answer} if p.answer else {}), **p.meta}
            f.write(json.dumps(row) + "\n")
