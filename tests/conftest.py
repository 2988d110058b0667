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


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the cores between workers: two workers of two OpenMP threads each on
    two cores wait at every barrier for a preempted thread. Subprocesses inherit the setting."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    from filelock import FileLock

    from refusal_lab.organism.build import OrganismConfig, default_organism

    cache = Path(os.environ.get("RLAB_TEST_CACHE", default_cache_dir()))
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".organism.lock"):  # pytest-xdist workers: one builds, the others then reuse
        return default_organism(cache, OrganismConfig(), log=lambda _m: None)


@pytest.fixture(scope="session")
def organism(organism_dir: Path):
    from refusal_lab.core.model import load

    return load(organism_dir, dtype="float32", device="cpu")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its count of forked and subprocess commands to the controller."""
    from cli_process import COUNTS  # imported here: at conftest's import the workers' threads are not yet set

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["cli_commands"] = dict(COUNTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    from cli_process import COUNTS

    COUNTS.update(getattr(node, "workeroutput", {}).get("cli_commands", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How the tests' commands ran (forked from a parent that imported torch, or as plain subprocesses: a
    suite whose commands all fall back is correct but about twice as slow), and each cached organism."""
    import json

    from cli_process import COUNTS

    if COUNTS:
        terminalreporter.write_line("refusal-lab commands: " + ", ".join(f"{n} {k}" for k, n in sorted(COUNTS.items())))

    cache = Path(os.environ.get("RLAB_TEST_CACHE", default_cache_dir()))
    for manifest in sorted(cache.glob("organism-*/organism.json")):
        m = json.loads(manifest.read_text())
        seed, kernels = m["config"]["corpus"]["seed"], m.get("kernels")
        source = m.get("weights_source", "trained")
        terminalreporter.write_line(
            f"organism seed {seed} {m['config_hash']}: weights {m.get('weights')} ({source}), {kernels}"
        )
