"""A model named by hub id is read from a Hugging Face cache the test lays out itself: never the network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from cli_process import CLI, run_cli
from refusal_lab.core.hub import is_hub_id, resolve
from refusal_lab.core.model import load
from refusal_lab.errors import UserError

REV = "0123456789abcdef0123456789abcdef01234567"


def lay_out(cache: Path, repo_id: str, folder: Path) -> Path:
    """The hub's own layout: files as blobs, the snapshot as symlinks to them, refs/main naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache; any call that could reach the network fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import: set for this process too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    real = huggingface_hub.snapshot_download

    def local_only(repo_id, **kw):
        if not kw.get("local_files_only"):
            pytest.fail(f"{repo_id} would have been fetched from the network")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    return cache


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("org/tiny", True),
        ("organism", False),
        ("./org/tiny", False),
        ("/models/qwen", False),
        ("~/models/qwen", False),
        ("org/tiny/extra", False),
        ("model.gguf", False),
    ],
)
def test_what_counts_as_a_hub_id(name, hub_id):
    assert is_hub_id(name) is hub_id


def test_hub_id_loads_the_cached_snapshot_as_the_folder(hub, organism_dir, organism):
    snap = lay_out(hub, "org/tiny", organism_dir)
    loaded = load("org/tiny", dtype="float32", device="cpu")
    assert loaded.source == snap and loaded.folder == snap
    assert loaded.name == "org/tiny" and organism.name == organism_dir.name  # the id, not the revision hash
    ids = organism.tokenizer(["what is 3 plus 4 ?"], return_tensors="pt")
    assert loaded.tokenizer(["what is 3 plus 4 ?"], return_tensors="pt")["input_ids"].equal(ids["input_ids"])
    with torch.no_grad():
        ours, theirs = loaded.model(**ids).logits, organism.model(**ids).logits
    assert torch.equal(ours, theirs)
    assert loaded.fingerprint == organism.fingerprint


def test_an_existing_folder_wins_over_a_hub_id(hub, organism_dir, tmp_path, monkeypatch):
    lay_out(hub, "org/tiny", organism_dir)
    (tmp_path / "work" / "org" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve("org/tiny") == Path("org/tiny")
    assert resolve(str(organism_dir)) == organism_dir


def test_an_id_missing_from_the_cache_says_how_to_get_it(hub):
    with pytest.raises(UserError) as err:
        load("org/absent")
    assert "org/absent" in err.value.problem and str(hub) in err.value.problem
    assert "hf download org/absent" in err.value.fix and "--download" in err.value.fix
    assert "\n" not in str(err.value)


def test_download_is_refused_while_the_hub_is_offline(hub):
    with pytest.raises(UserError) as err:
        load("org/absent", download=True)
    assert "HF_HUB_OFFLINE" in err.value.problem and "HF_HUB_OFFLINE" in err.value.fix


def test_a_failed_download_is_one_line(hub, monkeypatch):
    """With the network allowed, a download that fails (here: stood in for) is named in one line."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    offline = huggingface_hub.snapshot_download
    asked: list[str] = []

    def no_network(repo_id, **kw):
        if kw.get("local_files_only"):
            return offline(repo_id, **kw)
        asked.append(repo_id)
        raise OSError("Cannot reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserError) as err:
        load("org/absent", download=True)
    assert asked == ["org/absent"]
    assert "could not download 'org/absent'" in err.value.problem and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        load("org/absent")  # without the setting, nothing is fetched
    assert asked == ["org/absent"]


@pytest.mark.slow
def test_cli_missing_hub_id_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [*CLI, "info", "org/absent"]
    result = run_cli(cmd, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/absent" in lines[0] and "hf download org/absent" in lines[0]
