"""`--lora`: an edit exported as a PEFT adapter whose merge into the base is the edited folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli_process import CLI, run_cli
from refusal_lab.ablate.adapter import factor
from refusal_lab.ablate.edit import Ablation
from refusal_lab.ablate.stage import AblationRecord, export
from refusal_lab.config import Settings
from refusal_lab.core.model import fingerprint, load
from refusal_lab.errors import UserError
from tiny_models import FAMILIES, tiny_model

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 4]])


def _base(tmp_path, organism_dir, family, dtype=torch.float32, **config):
    folder = tmp_path / "base"
    tiny_model(family, **config).to(dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(organism_dir).save_pretrained(folder)
    return folder


def _ablations(embedding: bool) -> list[Ablation]:
    """Two directions everywhere but layer 1 (half strength at layer 2), then a third on layer 0's MLP only."""
    g = torch.Generator().manual_seed(1)
    two, one = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    return [
        Ablation(two, torch.tensor([1.0, 0.6]), torch.tensor([1.0, 0.0, 0.5]), embedding=embedding),
        Ablation(one, 0.8, torch.tensor([1.0, 0.0, 0.0]), embedding=False, components=("mlp",)),
    ]


def _merged(base_folder, adapter):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _precision(edited: torch.Tensor, roundings: int) -> float:
    """The edited folder's own precision at a tensor's largest entry: an ulp per rounding (as the export allows)."""
    return torch.finfo(edited.dtype).eps * float(edited.abs().max()) * roundings


def _worst(model, edited, roundings: int) -> float:
    """The largest difference from the edited folder's tensors, in units of the folder's own precision."""
    ours, theirs = model.state_dict(), edited.state_dict()
    return max(float((ours[k] - v).abs().max()) / _precision(v, roundings) for k, v in theirs.items())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3_moe"])
def test_a_merged_adapter_is_the_edited_folder(family, organism_dir, tmp_path):
    base = _base(tmp_path, organism_dir, family)
    m = load(base, "float32", "cpu")
    before, tied = fingerprint(m.model), m.adapter.tied_embeddings
    ablations = _ablations(embedding=not tied)
    export(m, ablations, tmp_path / "out", AblationRecord("test", {}), Settings(), "ablate", lora=tmp_path / "lora")
    assert fingerprint(m.model) == before  # the loaded model is left as it was

    record = json.loads((tmp_path / "lora" / "ablation.json").read_text())
    assert AblationRecord.read(tmp_path / "lora").method == "test"
    ranks = {k.split("layers.")[-1]: r for k, r in record["adapter"]["ranks"].items()}
    expected = {"0.mlp.down_proj": 3, "0.self_attn.o_proj": 2, "2.mlp.down_proj": 2, "2.self_attn.o_proj": 2}
    assert {k: v for k, v in ranks.items() if "per_layer" not in k and "embed" not in k} == expected
    assert ("model.embed_tokens" in ranks) == (not tied)  # an untied embedding edit is an embedding LoRA
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "library_name: peft" in card and "merge_and_unload" in card

    merged, edited = _merged(base, tmp_path / "lora"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _worst(merged, edited, len(ablations) + 1) <= 1.0
    assert _worst(AutoModelForCausalLM.from_pretrained(base), edited, len(ablations) + 1) > 100  # control
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, edited(IDS).logits, atol=1e-5)


def test_a_bfloat16_checkpoint_loaded_in_float32_merges_to_its_bfloat16_export(organism_dir, tmp_path):
    base = _base(tmp_path, organism_dir, "llama", torch.bfloat16)
    m = load(base, "float32", "cpu")
    ablations = _ablations(embedding=True)
    export(m, ablations, tmp_path / "out", AblationRecord("test", {}), Settings(), "ablate", lora=tmp_path / "lora")
    merged, edited = _merged(base, tmp_path / "lora"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(edited.parameters()).dtype == next(merged.parameters()).dtype == torch.bfloat16
    assert _worst(merged, edited, len(ablations) + 1) <= 1.0


@pytest.mark.parametrize(
    ("family", "config", "embedding", "settings", "says"),
    [
        ("gemma2", {}, True, {}, "ties it to the output embedding"),
        ("qwen3_moe", {}, False, {}, "fused expert tensor"),
        ("llama", {"attention_bias": True}, False, {}, "bias"),
        ("llama", {}, False, {"ablate": {"norm_preserving": True}}, "not low-rank"),
    ],
)
def test_what_no_adapter_can_carry_is_refused_before_anything_is_written(
    family, config, embedding, settings, says, organism_dir, tmp_path
):
    m = load(_base(tmp_path, organism_dir, family, **config), "float32", "cpu")
    with pytest.raises(UserError, match=says):
        export(m, _ablations(embedding), tmp_path / "out", AblationRecord("t", {}), Settings(**settings), "ablate",
               lora=tmp_path / "lora")  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "lora").exists()


def test_an_adapter_folder_that_is_the_edited_folder_is_refused(organism_dir, tmp_path):
    m = load(_base(tmp_path, organism_dir, "llama"), "float32", "cpu")
    with pytest.raises(UserError, match="also the model or the edited folder"):
        export(m, _ablations(True), tmp_path / "out", AblationRecord("t", {}), Settings(), "ablate",
               force=True, lora=tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_the_factor_takes_the_fewest_components_within_precision_and_stops_at_its_cap():
    g = torch.Generator().manual_seed(0)
    m, n = 40, 70
    low = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    allowed = torch.full((m, n), 1e-12, dtype=torch.float64)
    b, a, rest = factor(low.clone(), 6, allowed)
    assert b.shape[1] == 3 and (low - b @ a).abs().max() < 1e-12 and torch.allclose(rest, low - b @ a, atol=1e-12)
    full = torch.randn(m, n, generator=g, dtype=torch.float64)
    b, a, rest = factor(full.clone(), 6, allowed)
    assert b.shape[1] == 6 and (full - b @ a).abs().max() > 0.5  # capped: what is left is reported, not hidden
    assert torch.allclose(rest, full - b @ a, atol=1e-12)


def _config(tmp_path):
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    return ["--config", str(tmp_path / "c.toml")]


@pytest.mark.slow
def test_cli_ablate_lora_on_the_organism_merges_to_the_edited_folder(organism_dir, tmp_path):
    """projected edits the (untied) embedding and every writer at rank 1."""
    out, lora = tmp_path / "out", tmp_path / "lora"
    cmd = [*CLI, "ablate", str(organism_dir), "--method", "projected", "-o", str(out), "--lora", str(lora)]
    run = run_cli([*cmd, *_config(tmp_path)])
    assert run.returncode == 0, run.stderr
    ranks = json.loads((lora / "ablation.json").read_text())["adapter"]["ranks"]
    assert set(ranks.values()) == {1} and "model.embed_tokens" in ranks
    merged, edited = _merged(organism_dir, lora), AutoModelForCausalLM.from_pretrained(out)
    assert _worst(merged, edited, 2) <= 1.0
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, edited(IDS).logits, atol=1e-5)
    refused = run_cli([*cmd, "--norm-preserving", "--force", *_config(tmp_path)])
    assert refused.returncode == 2 and "not low-rank" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_cli_pick_lora_merges_to_the_picked_folder(organism_dir, tmp_path):
    study = tmp_path / "s"
    search = [*CLI, "search", str(organism_dir), "-o", str(study), "--methods", "kernel", "--trials", "2"]
    fast = ["--eval-count", "6", "--max-new-tokens", "12", *_config(tmp_path)]
    assert run_cli([*search, *fast]).returncode == 0
    pick = [*CLI, "pick", str(study), "--max-kl", "1000", "-o", str(tmp_path / "m"), "--lora", str(tmp_path / "l")]
    run = run_cli(pick)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "l" / "ablation.json").read_text())["method"] == "search:kernel"
    merged, edited = _merged(organism_dir, tmp_path / "l"), AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert _worst(merged, edited, 3) <= 1.0
