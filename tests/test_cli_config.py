"""CLI and configuration: fast help, layered settings, validation with clear messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_process import CLI, run_cli
from refusal_lab.config import load_settings
from refusal_lab.errors import UserError


def test_help_lists_subcommands_without_importing_torch():
    code = "import sys, refusal_lab.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("organism", "demo", "info", "chat"):
        assert name in out


def test_precedence_defaults_toml_env_cli(tmp_path, monkeypatch):
    toml = tmp_path / "refusal-lab.toml"
    toml.write_text("batch_size = 4\n[chat]\nmax_new_tokens = 10\n[organism]\nsteps = 50\n")
    assert load_settings(toml).batch_size == 4
    monkeypatch.setenv("REFUSAL_LAB_BATCH_SIZE", "8")
    monkeypatch.setenv("REFUSAL_LAB_ORGANISM__STEPS", "60")
    s = load_settings(toml)
    assert (s.batch_size, s.chat.max_new_tokens, s.organism.steps) == (8, 10, 60)
    s = load_settings(toml, batch_size=2, **{"organism.steps": 70})
    assert (s.batch_size, s.organism.steps) == (2, 70)
    assert load_settings(toml, batch_size=None).batch_size == 8  # None means "not given on the CLI"


def test_local_config_file_is_picked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refusal-lab.toml").write_text('[model]\ndtype = "bfloat16"\n')
    assert load_settings().model.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("batch_size = 0\n", "batch_size"),
        ('[model]\ndtype = "float8"\n', "dtype"),
        ("no_such_option = 1\n", "no_such_option"),
        ("batch_size = \n", "not valid TOML"),
        ("[organism]\nsteps = -1\n", "organism.steps"),
    ],
)
def test_invalid_config_is_named(tmp_path, text, needle):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(UserError) as err:
        load_settings(toml)
    assert needle in err.value.problem


def test_invalid_setting_from_cli_is_one_line(tmp_path):
    result = run_cli([*CLI, "chat", "--prompt", "hi", "--batch-size", "0"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "batch_size" in result.stderr


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("args", "seen"),
    [
        (["prove", "REAL", "organism"], ["REAL", "organism"]),  # every model a command takes, not model.path
        (["eval", "REAL"], ["REAL"]),
        (["harden", "REAL"], ["REAL"]),
        (["organism", "eval"], ["organism"]),
    ],
)
def test_kernels_are_chosen_from_the_models_a_command_is_given(tmp_path, monkeypatch, args, seen):
    """'auto' pins the CPU kernels for the organism alone: a real model among a command's models keeps its own."""
    from typer.testing import CliRunner

    from refusal_lab.cli import (
        commands,  # noqa: F401  (registers the commands)
        options,
    )
    from refusal_lab.cli.app import app
    from refusal_lab.core.kernels import use_kernels

    got: list = []

    def record(choice, paths):
        got.append([str(p) for p in paths])
        raise SystemExit(0)  # stop before any work

    monkeypatch.setattr(options, "use_kernels", record)
    real = str(tmp_path / "real")
    CliRunner().invoke(app, [a.replace("REAL", real) for a in args])
    assert got == [[s.replace("REAL", real) for s in seen]]
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    (tmp_path / "real").mkdir()
    use_kernels("auto", ["organism", real])
    assert "MKL_CBWR" not in __import__("os").environ  # one real model: native kernels


def test_bfloat16_on_a_cpu_that_would_emulate_it_is_named(monkeypatch, capsys):
    """A run asked for in bfloat16 on a CPU without AVX512-BF16 or AMX says so: it is several times slower."""
    from typer.testing import CliRunner

    from refusal_lab.cli import (
        commands,  # noqa: F401  (registers the commands)
        options,
    )
    from refusal_lab.cli.app import app
    from refusal_lab.core import kernels

    assert kernels.native_bf16("processor\t: 0\nflags\t\t: fpu avx2 fma avx512_bf16\n") is True
    assert kernels.native_bf16("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\n") is False
    assert kernels.native_bf16("processor\t: 0\n") is None  # no flags line: cannot tell, so no note

    monkeypatch.setattr(kernels, "native_bf16", lambda cpuinfo=None: False)
    for dtype, device, command, noted in [
        ("bfloat16", "cpu", "prove", True),
        ("float32", "cpu", "prove", False),
        ("auto", "cpu", "prove", False),
        ("bfloat16", "cuda", "prove", False),
    ]:
        options.dtype_note(load_settings(**{"model.dtype": dtype, "model.device": device}), command)
        assert ("bfloat16 asked for" in capsys.readouterr().err) is noted, (dtype, device)
    harden = load_settings(**{"harden.targets_dtype": "bfloat16", "model.device": "cpu"})
    options.dtype_note(harden, "harden")
    assert "emulated" in capsys.readouterr().err
    options.dtype_note(harden, "prove")  # another command's setting is not this run's
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(kernels, "native_bf16", lambda cpuinfo=None: True)
    options.dtype_note(load_settings(**{"model.dtype": "bfloat16", "model.device": "cpu"}), "prove")
    assert capsys.readouterr().err == ""

    seen = []

    def record(s, command):
        seen.append((s.model.dtype, command))
        raise SystemExit(0)  # stop before any work

    monkeypatch.setattr(options, "use_kernels", lambda *_a: None)
    monkeypatch.setattr(options, "dtype_note", record)
    CliRunner().invoke(app, ["prove", "organism", "--dtype", "bfloat16"])
    assert seen == [("bfloat16", "prove")]
