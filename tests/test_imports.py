"""The dependency order is the data's journey: a module imports only from its own layer or below.

core (with config and errors) is the bottom; the organism sits beside it as a source and may use it;
the stages follow the journey probe -> ablate -> search -> evaluate -> prove -> harden -> ship; cli and
the demo sit on top. Every import in src/ is parsed, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "refusal_lab"
LAYER = {
    "__init__": 0,
    "errors": 0,
    "config": 0,
    "core": 0,
    "organism": 1,
    "probe": 2,
    "ablate": 3,
    "search": 4,
    "evaluate": 5,
    "prove": 6,
    "harden": 7,
    "ship": 8,
    "cli": 9,
    "demo": 9,
    "__main__": 9,
}


def arrows(src: Path = SRC) -> list[str]:
    """Every import that points up the journey, as 'file:line -> module'."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        here = rel.parts[0].removesuffix(".py")
        assert here in LAYER, f"{rel}: a top-level module or package with no place in the order"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "refusal_lab" or len(parts) < 2:
                    continue
                there = parts[1]
                if LAYER[there] > LAYER[here]:
                    bad.append(f"{rel}:{node.lineno} -> {name}")
    return bad


def test_no_import_points_up_the_journey():
    assert arrows() == []


def test_relative_imports_are_not_used():
    """Relative imports would hide an arrow from the check above."""
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"


def test_the_check_sees_an_upward_import(tmp_path):
    """Negative control: a core module that imports a stage, even inside a function, is caught."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("def f():\n    from refusal_lab.evaluate import runner\n")
    (tmp_path / "organism").mkdir()
    (tmp_path / "organism" / "y.py").write_text("import refusal_lab.probe.stage\n")
    assert arrows(tmp_path) == [
        "core/x.py:2 -> refusal_lab.evaluate",
        "organism/y.py:1 -> refusal_lab.probe.stage",
    ]
