"""Model cards for the folders refusal-lab writes: Hugging Face front matter and what was done."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def source_front_matter(folder: Path) -> dict[str, str]:
    """license and base_model from the input folder's own card, when it has front matter."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    m = re.match(r"^---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    out = {}
    for line in m.group(1).splitlines() if m else []:
        key, _, value = line.partition(":")
        if key.strip() in ("license", "base_model") and value.strip():
            out[key.strip()] = value.strip()
    return out


def model_card(
    src: Path, record: dict[str, Any], command: str, table: str | None = None, library: str = "transformers"
) -> str:
    """README.md for an edited or trained model (or a PEFT adapter of one): front matter, method, settings, replay."""
    inherited = source_front_matter(src)
    base = inherited.get("base_model") or str(record.get("source", src))
    method = str(record.get("method", "edit"))
    lines = ["---", f"base_model: {base}", f"library_name: {library}", "tags:", "  - refusal-lab", f"  - {method}"]
    if "license" in inherited:
        lines.append(f"license: {inherited['license']}")
    lines += ["---", f"# {src.name} ({method}, refusal-lab)", ""]
    lines += [
        f"Made by refusal-lab {record.get('version', '')} from `{record.get('source', src)}` "
        f"(weights fingerprint `{record.get('source_fingerprint', '?')}`) with method **{method}**.",
        "",
        "Every effective setting is in `settings.toml` and `ablation.json`; to make this folder again:",
        "",
        "```sh",
        f"sh reproduce.sh NEW_FOLDER   # refusal-lab {command} --config settings.toml -o NEW_FOLDER",
        "```",
        "",
    ]
    if table:
        lines += ["## Evaluation", "", table, ""]
    return "\n".join(lines)
