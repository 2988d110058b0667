"""Damaged inputs are one-line errors that name the file, exit code 2 from the CLI; inputs stay untouched."""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_process import CLI, run_cli
from refusal_lab.core.model import load
from refusal_lab.errors import UserError


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def cut_in_half(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def random_bytes(f: Path) -> None:
    f.write_bytes(random.Random(0).randbytes(f.stat().st_size))


def cut_short(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-1])


def not_a_tokenizer(f: Path) -> None:
    f.write_text('{"version": "1.0"}')  # valid JSON that the tokenizers library cannot read


CORRUPTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("model.safetensors", cut_in_half, "not a readable safetensors file"),
    ("model.safetensors", random_bytes, "not a readable safetensors file"),
    ("model.safetensors", cut_short, "not a readable safetensors file"),
    ("config.json", cut_in_half, "not readable JSON"),
    ("generation_config.json", cut_in_half, "not readable JSON"),
    ("tokenizer.json", cut_in_half, "not readable JSON"),
    ("tokenizer.json", not_a_tokenizer, "could not load a tokenizer"),
]


@pytest.fixture
def copy(tmp_path, organism_dir) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(organism_dir, dst)
    return dst


def test_the_intact_copy_loads(copy):
    loaded = load(copy, dtype="float32", device="cpu")
    assert loaded.source == copy and loaded.model.config.vocab_size > 0


@pytest.mark.parametrize(("name", "damage", "needle"), CORRUPTIONS, ids=lambda v: getattr(v, "__name__", v))
def test_a_damaged_file_is_named_in_one_line(copy, name, damage, needle):
    damage(copy / name)
    before = digest(copy)
    with pytest.raises(UserError) as err:
        load(copy, dtype="float32", device="cpu")
    assert str(copy / name) in err.value.problem and needle in err.value.problem
    assert err.value.fix and "\n" not in str(err.value)
    assert digest(copy) == before


def test_a_gguf_that_is_not_gguf_is_named(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(UserError, match="not a GGUF file") as err:
        load(f)
    assert str(f) in err.value.problem and "\n" not in str(err.value)


def test_a_gguf_with_damaged_metadata_is_named(tmp_path):
    pytest.importorskip("gguf")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + random.Random(0).randbytes(4096))
    with pytest.raises(UserError, match="as GGUF") as err:
        load(f)
    assert str(f) in err.value.problem and "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_truncated_weights_exit_2_with_one_line(copy):
    cut_in_half(copy / "model.safetensors")
    cmd = [*CLI, "info", str(copy)]
    result = run_cli(cmd)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(copy / "model.safetensors") in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["prove", "eval"])
def test_a_model_trained_on_the_reported_prompts_is_refused_by_name_before_any_work(copy, tmp_path, command):
    """harden records the prompts it trained on; prove and eval refuse to report on them (exit 2, one line)."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.prompts import write_trained_prompts
    from refusal_lab.core.sources import Source

    _, held = Source.of(copy).prove_split(load_settings().prompts)
    write_trained_prompts(copy, ["an unrelated prompt", held.harmful[3].prompt])
    out = tmp_path / "out"
    cmd = [*CLI, command, str(copy), "-o", str(out)]
    result = run_cli(cmd)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "was trained on 1 of the" in lines[-1] and "harmful prompts reported on" in lines[-1], lines
    assert not out.exists()


def test_an_edit_of_a_hardened_model_keeps_the_record_of_its_training_prompts(copy, tmp_path):
    from refusal_lab.core.prompts import TRAINED_PROMPTS, write_trained_prompts

    write_trained_prompts(copy, ["a prompt it was hardened on"])
    out = tmp_path / "edited"
    cmd = [*CLI, "ablate", str(copy), "-o", str(out)]
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    result = run_cli([*cmd, "--config", str(tmp_path / "c.toml")])
    assert result.returncode == 0, result.stderr
    assert (out / TRAINED_PROMPTS).read_text() == (copy / TRAINED_PROMPTS).read_text()
