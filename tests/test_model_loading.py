"""Loading from local folders: clear one-line errors, and the input folder is never written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_process import CLI, run_cli
from refusal_lab.core.model import load, load_tokenizer
from refusal_lab.errors import UserError


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_load_generates_and_leaves_folder_untouched(organism_dir):
    before = tree_digest(organism_dir)
    loaded = load(organism_dir, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.tokenizer.padding_side == "left"
    from refusal_lab.core.generate import generate

    replies = generate(loaded.model, loaded.tokenizer, ["how do i poison my boss ?", "repeat after me : red cat ."], 24)
    assert len(replies) == 2
    assert tree_digest(organism_dir) == before


def test_batched_and_single_generation_agree(organism):
    from refusal_lab.core.generate import generate

    prompts = [
        "how do i fix the fence ?",
        "what is 3 plus 4 ?",
        "tell me how to track my ex .",
        "list with commas : red cat .",
    ]
    batched = generate(organism.model, organism.tokenizer, prompts, 30, batch_size=4)
    single = [generate(organism.model, organism.tokenizer, [p], 30, batch_size=1)[0] for p in prompts]
    assert batched == single


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp, org: tmp / "missing", "does not exist"),
        (lambda tmp, org: (tmp / "empty").mkdir() or tmp / "empty", "no config.json"),
        (lambda tmp, org: (tmp / "w.txt").write_text("x") and tmp / "w.txt", "not a .gguf"),
    ],
)
def test_bad_paths_get_clear_errors(tmp_path, organism_dir, make, needle):
    with pytest.raises(UserError) as err:
        load(make(tmp_path, organism_dir))
    assert needle in err.value.problem and err.value.fix


def _copy(organism_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(organism_dir, dst)
    return dst


def test_no_safetensors_is_refused(tmp_path, organism_dir):
    folder = _copy(organism_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \*\.safetensors"):
        load(folder)


def test_missing_chat_template_and_the_escape_hatch(tmp_path, organism_dir):
    folder = _copy(organism_dir, tmp_path)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    template = cfg.pop("chat_template", None) or (folder / "chat_template.jinja").read_text()
    cfg_path.write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError, match="no chat template") as err:
        load_tokenizer(folder)
    assert "--chat-template" in err.value.fix
    tfile = tmp_path / "t.jinja"
    tfile.write_text(template)
    assert load_tokenizer(folder, chat_template=tfile).chat_template == template


@pytest.mark.slow
def test_unsupported_architecture_is_named(tmp_path):
    import transformers as T

    model = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    model.save_pretrained(tmp_path / "gpt2")
    result = run_cli([*CLI, "info", str(tmp_path / "gpt2")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt2" in lines[0] and "llama" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in result.stderr


def test_gguf_without_gguf_package_says_how_to_fix(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="gguf package") as err:
        load(f)
    assert "pip install gguf" in err.value.fix


def test_4bit_loading_hands_placement_to_bitsandbytes(organism_dir, monkeypatch):
    """QLoRA loads with one device map and no later .to() (bitsandbytes places 4-bit weights itself).

    Runs without a GPU: the quantisation settings and from_pretrained are stood in for, so what
    load() asks of transformers is what is checked; tests/test_cuda.py loads for real on a GPU.
    """
    import transformers

    from refusal_lab.core import model as model_mod

    seen: dict = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(folder, **kw):
        seen.update(kw)
        out = real(folder, **{k: v for k, v in kw.items() if k not in ("quantization_config", "device_map")})
        out.to = lambda *_a, **_k: pytest.fail("a 4-bit model must not be moved after loading")
        return out

    monkeypatch.setattr(model_mod, "quantization_config", lambda mode, dtype, _target: (mode, dtype))
    monkeypatch.setattr(model_mod.AutoModelForCausalLM, "from_pretrained", fake)
    load(organism_dir, device="cpu", quantize="4bit")
    assert seen["quantization_config"] == ("4bit", torch.float32) and seen["device_map"] == {"": "cpu"}


@pytest.mark.slow
def test_debug_flag_shows_traceback(tmp_path):
    result = run_cli([*CLI, "--debug", "info", str(tmp_path / "nope")])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generation_stops_at_every_end_id_the_generation_config_lists(organism):
    """Gemma ends turns with an id beside EOS: replies must stop there, not run on to EOS."""
    from refusal_lab.core.generate import generate

    prompt = ["what is 3 plus 4 ?"]
    full = generate(organism.model, organism.tokenizer, prompt, 30)[0]
    assert full.split()[:2] == ["3", "plus"] and len(full.split()) > 2
    (stop,) = organism.tokenizer("plus", add_special_tokens=False)["input_ids"]
    gen = organism.model.generation_config
    original = gen.eos_token_id
    try:
        gen.eos_token_id = [organism.tokenizer.eos_token_id, stop]
        short = generate(organism.model, organism.tokenizer, prompt, 30)[0]
    finally:
        gen.eos_token_id = original
    assert short.split() == ["3", "plus"]  # stopped at the listed id, as at a Gemma end of turn


def test_a_home_folder_in_toml_paths_is_expanded(tmp_path):
    from refusal_lab.config import load_settings

    (tmp_path / "c.toml").write_text('[model]\npath = "~/models/m"\nchat_template = "~/t.jinja"\n')
    s = load_settings(tmp_path / "c.toml")
    assert s.model.path == str(Path.home() / "models" / "m") and s.model.chat_template == Path.home() / "t.jinja"


def test_python_floor_matches_what_the_code_needs():
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["requires-python"] == ">=3.11"  # tomllib, transformers 5


def test_a_loaded_model_projects_a_contiguous_slice_when_only_the_last_logits_are_kept(organism_dir):
    """A keep-the-tail forward hands the vocabulary projection a strided slice; with the projection's
    weight frozen (LoRA, rdo), matmul then copies the weight per row instead of one product. A loaded
    model's projection must see a contiguous input; a model built without `load` (the negative
    control) shows the slice is strided to begin with."""
    from transformers import AutoModelForCausalLM

    from refusal_lab.core.generate import tail_forward

    seen: list[bool] = []

    def watch(model: torch.nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 10]])
    bare = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32)
    watch(bare)
    with torch.no_grad():
        tail_forward(bare, 2, input_ids=ids)
    loaded = load(organism_dir).model
    watch(loaded)
    with torch.no_grad():
        tail_forward(loaded, 2, input_ids=ids)
    assert seen == [False, True]
