"""4/8-bit loading (model.quantize): the setting's layers and flags, the refusals a CPU and weight edits
get, and ablate's export from the full-precision weights.

bitsandbytes needs a CUDA GPU, so a quantized model is stood in for here (the float32 organism with
rounded weights, marked 4bit); bench/cuda_check.sh loads in 4 and 8 bits for real on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cli_process import CLI, run_cli
from refusal_lab.config import load_settings
from refusal_lab.core import model as model_mod
from refusal_lab.core.model import Loaded, fingerprint, load, quantization_config, refuse_weight_edits, unquantized
from refusal_lab.errors import UserError

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a CUDA GPU says")


def settings_of(monkeypatch, args: list[str]):
    """The Settings a command builds from `args`, stopped before it loads anything."""
    from typer.testing import CliRunner

    from refusal_lab.cli import commands, options  # noqa: F401 - commands registers them
    from refusal_lab.cli.app import app

    seen = []
    real = options.load_settings

    def record(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    def stop(*_a):
        raise SystemExit(0)

    monkeypatch.setattr(options, "load_settings", record)
    monkeypatch.setattr(options, "use_kernels", stop)
    result = CliRunner().invoke(app, args)
    assert seen, result.output
    return seen[0]


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "--quantize", "8bit"],
        ["ablate", "--quantize", "8bit"],
        ["eval", "organism", "--quantize", "8bit"],
        ["search", "--quantize", "8bit"],
        ["prove", "organism", "--quantize", "8bit"],
    ],
)
def test_every_stage_reads_quantize_into_the_model_section(monkeypatch, args):
    assert settings_of(monkeypatch, args).model.quantize == "8bit"


def test_harden_keeps_its_own_quantize(monkeypatch):
    """--quantize on harden is [harden] quantize (QLoRA); the model section's is not its flag."""
    s = settings_of(monkeypatch, ["harden", "--quantize", "4bit"])
    assert (s.harden.quantize, s.model.quantize) == ("4bit", "none")


def test_harden_loads_its_base_as_its_own_quantize_says(monkeypatch, tmp_path):
    """A model.quantize from the environment or TOML is not harden's: its merge reloads a full base."""
    from typer.testing import CliRunner

    import refusal_lab.harden.stage as harden_stage
    import refusal_lab.organism.source as source
    from refusal_lab.cli import commands, options  # noqa: F401 - commands registers them
    from refusal_lab.cli.app import app

    seen: dict = {}
    monkeypatch.setattr(options, "use_kernels", lambda *_a: None)
    monkeypatch.setattr(source, "load_model", lambda s, name=None, quantize=None: seen.setdefault("load", quantize))
    monkeypatch.setattr(harden_stage, "run_harden", lambda _m, s, *_a: seen.update(model=s.model.quantize))
    monkeypatch.setenv("REFUSAL_LAB_MODEL__QUANTIZE", "8bit")
    result = CliRunner().invoke(app, ["harden", "--quantize", "4bit", "-o", str(tmp_path / "h")])
    assert seen == {"load": "4bit", "model": "none"}, result.output
    assert "model.quantize (8bit) is not read" in result.output


def test_a_section_can_hold_back_a_field_that_would_clash():
    from refusal_lab.cli.options import section_flags

    with pytest.raises(RuntimeError, match="--quantize would mean both"):
        section_flags(("model", "harden"))
    _, keys = section_flags(("model:-quantize", "harden"))
    assert keys["quantize"] == "harden.quantize" and keys["dtype"] == "model.dtype"


def test_toml_and_environment_set_quantize(tmp_path, monkeypatch):
    toml = tmp_path / "q.toml"
    toml.write_text('[model]\nquantize = "8bit"\n')
    assert load_settings(None).model.quantize == "none"
    assert load_settings(toml).model.quantize == "8bit"
    monkeypatch.setenv("REFUSAL_LAB_MODEL__QUANTIZE", "4bit")
    assert load_settings(toml).model.quantize == "4bit"  # environment over TOML
    monkeypatch.setenv("REFUSAL_LAB_MODEL__QUANTIZE", "2bit")
    with pytest.raises(UserError, match="quantize"):
        load_settings(None)


@NO_GPU
def test_quantized_loading_on_a_cpu_is_a_one_line_error(tmp_path):
    args = [*CLI, "eval", "organism", "--quantize", "8bit", "-o", str(tmp_path / "out")]
    r = run_cli(args, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("refusal-lab: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "8bit loading (bitsandbytes) needs a CUDA GPU" in r.stderr and "drop --quantize 8bit" in r.stderr
    assert not (tmp_path / "out").exists()


@NO_GPU
def test_load_refuses_quantize_without_a_gpu(organism_dir):
    with pytest.raises(UserError, match="needs a CUDA GPU") as err:
        load(organism_dir, device="auto", quantize="8bit")
    assert "--quantize 8bit" in err.value.fix


def test_quantize_on_the_cpu_device_or_without_bitsandbytes_is_refused(organism_dir, monkeypatch):
    """With a GPU visible: --device cpu cannot hold bitsandbytes weights; nor can a missing bitsandbytes load any."""
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="the device is cpu") as err:
        load(organism_dir, device="cpu", quantize="4bit")
    assert "--device cuda" in err.value.fix
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(
        model_mod.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError, match="needs the bitsandbytes package") as err:
        quantization_config("8bit", torch.bfloat16, "cuda")
    assert "pip install '.[qlora]'" in err.value.fix


def test_the_two_modes_build_their_bitsandbytes_settings(monkeypatch):
    """One builder for harden's 4-bit QLoRA and the model's 8-bit: NF4 with double quantisation, LLM.int8."""
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name, *a: object())
    four = quantization_config("4bit", torch.bfloat16, "cuda")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and not four.load_in_8bit
    eight = quantization_config("8bit", torch.bfloat16, None)  # device 'multi': placed by a device map
    assert eight.load_in_8bit and not eight.load_in_4bit
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantization_config("2bit", torch.bfloat16, "cuda")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["probe", "--quantize", "4bit"], None),  # loads (and, without a GPU, stops there)
        (["search", "--quantize", "4bit"], "a search trial would edit the weights"),
        (["ablate", "--quantize", "8bit", "--norm-preserving"], "saber with norm-preserving edits would edit"),
        (["ablate", "--quantize", "8bit", "--norm-preserving", "--method", "kernel"], None),
        (["prove", "organism", "--quantize", "4bit"], "the search attack would edit the weights"),
        (["prove", "organism", "--quantize", "4bit", "--attacks", "arditi,rdo,prefill"], None),
    ],
)
def test_weight_edits_on_a_quantized_model_are_refused_before_loading(monkeypatch, tmp_path, args, needle):
    from typer.testing import CliRunner

    import refusal_lab.organism.source as source
    import refusal_lab.prove.stage as prove_stage
    from refusal_lab.cli import commands, options  # noqa: F401 - commands registers them
    from refusal_lab.cli.app import app

    class Loading(Exception):
        pass

    def loading(*_a, **_k):
        raise Loading

    monkeypatch.setattr(options, "use_kernels", lambda *_a: None)
    monkeypatch.setattr(source, "load_model", loading)  # the commands import it when they run
    monkeypatch.setattr(prove_stage, "run_prove", loading)
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out")])
    if needle is None:
        assert isinstance(result.exception, Loading), result.output
    else:
        assert isinstance(result.exception, UserError) and needle in str(result.exception), result.output
        assert "bitsandbytes layers do not allow" in result.exception.problem


def test_prove_names_what_to_drop():
    from refusal_lab.cli.prove import weight_edits
    from refusal_lab.config import Settings

    s = Settings()
    edits = weight_edits(s, "base-folder", None)
    assert list(edits) == ["the search attack", "the weight-delta attack"]
    assert edits["the search attack"] == "pass --attacks arditi,saber,adaptive,subspace,rdo,delta,finetune,prefill"
    s.prove.attacks = "arditi,prefill,finetune"
    assert weight_edits(s, None, None) == {}  # hooks, prefill, LoRA: a quantized model takes them
    refuse_weight_edits("4bit", [], "unused")
    refuse_weight_edits("none", ["the search attack"], "unused")
    with pytest.raises(UserError, match="the imported copies would edit the weights in place, which 8bit bitsandbytes"):
        refuse_weight_edits("8bit", list(weight_edits(s, None, ["x"])), "drop --imported")


def test_ablate_saves_the_edit_on_the_full_precision_weights(organism_dir, organism, tmp_path):
    """The quantized model measures, the checkpoint's own weights take the edit: every weight the edit
    does not touch is saved exactly as the checkpoint holds it, not as the quantized copy does."""
    from transformers import AutoModelForCausalLM

    from refusal_lab.ablate.stage import run_ablate
    from refusal_lab.config import Settings

    stand_in = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in stand_in.parameters():
            if p.ndim == 2:
                p.copy_((p * 16).round() / 16)  # a coarse grid, as a 4-bit model's weights are
    rounded = fingerprint(stand_in)
    quantized = Loaded(stand_in, organism.tokenizer, organism.source, quantize="4bit")
    s = Settings(cache_dir=tmp_path / "cache")
    s.ablate.method = "projected"
    said: list[str] = []
    run_ablate(quantized, s, tmp_path / "out", None, False, said.append)

    assert any("full-precision weights" in m and "saved unquantized" in m for m in said)
    assert fingerprint(stand_in) == rounded  # the quantized model was only read
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert record["source_fingerprint"] == organism.fingerprint  # the edit's base: the checkpoint itself
    with safe_open(str(organism_dir / "model.safetensors"), "pt") as f:
        source = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    same = [k for k in source if torch.equal(source[k], saved[k])]
    edited = [k for k in source if k not in same]
    assert any("q_proj" in k for k in same) and all("q_proj" not in k for k in edited)
    assert any("o_proj" in k or "down_proj" in k for k in edited)
    assert all(saved[k].dtype == source[k].dtype for k in source)


def test_unquantized_returns_a_full_model_as_it_is(organism):
    said: list[str] = []
    assert unquantized(organism, said.append) is organism and said == []
