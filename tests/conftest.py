"""Shared fixtures: the organism is built once per cache folder (about 2 minutes on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    from refusal_lab.organism.build import OrganismConfig, default_organism

    cache = Path(os.environ.get("REFUSAL_LAB_TEST_CACHE", ROOT / ".cache" / "test"))
    return default_organism(cache, OrganismConfig(), log=lambda _m: None)


@pytest.fixture(scope="session")
def organism(organism_dir: Path):
    from refusal_lab.core.model import load

    return load(organism_dir, dtype="float32", device="cpu")
