"""Shared fixtures: the organism is built once per cache folder (from its shipped weights: seconds).

The folder is the one `make demo` and the CLI use (~/.cache/refusal-lab), so a fresh machine builds
the organism once for both; RLAB_TEST_CACHE points the tests elsewhere. The run ends by
printing each cached organism's weights digest, kernels and source (shipped or trained here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refusal_lab.config import default_cache_dir


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    from refusal_lab.organism.build import OrganismConfig, default_organism

    cache = Path(os.environ.get("RLAB_TEST_CACHE", default_cache_dir()))
    return default_organism(cache, OrganismConfig(), log=lambda _m: None)


@pytest.fixture(scope="session")
def organism(organism_dir: Path):
    from refusal_lab.core.model import load

    return load(organism_dir, dtype="float32", device="cpu")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    import json

    cache = Path(os.environ.get("RLAB_TEST_CACHE", default_cache_dir()))
    for manifest in sorted(cache.glob("organism-*/organism.json")):
        m = json.loads(manifest.read_text())
        seed, kernels = m["config"]["corpus"]["seed"], m.get("kernels")
        source = m.get("weights_source", "trained")
        terminalreporter.write_line(
            f"organism seed {seed} {m['config_hash']}: weights {m.get('weights')} ({source}), {kernels}"
        )
