"""Probe and ablate on the organism: SABER meets its targets, Arditi falls short, outputs are sound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lab import activations
from refusal_lab.arch import adapt
from refusal_lab.edit import Ablation, hooked
from refusal_lab.errors import UserError
from refusal_lab.evaluate import REFUSAL_MARKERS, first_token_kl, last_logits, refusal_token_ids
from refusal_lab.generate import generate
from refusal_lab.organism.build import organism_behaviour, prompt_sets
from refusal_lab.pipeline import ProbeOptions, prompt_sets_for, read_probe, run_probe
from refusal_lab.select import ArditiConfig, SaberConfig, arditi, saber
from test_model_loading import tree_digest

CLI = [sys.executable, "-m", "refusal_lab.cli"]


@pytest.fixture(scope="module")
def sets(organism_dir):
    return prompt_sets_for(organism_dir)


@pytest.fixture(scope="module")
def base_eval(organism):
    ev = prompt_sets(organism.source, "eval")
    table, _ = organism_behaviour(organism.model, organism.tokenizer, organism.source)
    logits = last_logits(organism.model, organism.tokenizer, [p.prompt for p in ev["harmless"]])
    return ev, table, logits


def _evaluate(organism, ablations, base_eval, markers=None):
    ev, _, base_logits = base_eval
    a = adapt(organism.model)
    with hooked(a, ablations):
        table, _ = organism_behaviour(organism.model, organism.tokenizer, organism.source, markers=markers)
        kl = first_token_kl(
            base_logits, last_logits(organism.model, organism.tokenizer, [p.prompt for p in ev["harmless"]])
        )
    return table, kl


def _saber(organism, sets, cfg: SaberConfig):
    a = adapt(organism.model)
    texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
    return saber(organism.model, organism.tokenizer, a, *texts, cfg)


def test_saber_defaults_remove_refusal_and_keep_capability(organism, sets, base_eval):
    """Scored as SABER scores itself (generic keyword markers); the organism's own refusal words
    also catch the fragments an edit leaves ("that would be stealing ."), and SABER leaves some
    (11% on the build measured for the README), so those are only checked against the base."""
    res = _saber(organism, sets, SaberConfig())
    assert 1 <= len(res.passes) <= 4 and all(len(p.picks) <= 14 for p in res.passes)
    table, kl = _evaluate(organism, res.ablations, base_eval, markers=REFUSAL_MARKERS)
    base = base_eval[1]
    assert table.harmful_refusal <= 0.05
    assert table.harmless_refusal <= 0.05
    assert table.capability >= 0.95 * base.capability
    assert table.recognition >= 0.85
    assert kl < 0.05
    strict, _ = _evaluate(organism, res.ablations, base_eval)
    assert strict.harmful_refusal >= table.harmful_refusal  # the organism's words only add refusals
    assert strict.harmful_compliance > base.harmful_compliance  # some requests get the compliant template


def test_saber_without_biprojection_makes_harmless_prompts_refuse(organism, sets, base_eval):
    """The measured reason biproject is on by default: SABER's raw SVD directions fail here."""
    res = _saber(organism, sets, SaberConfig(biproject=False))
    table, _ = _evaluate(organism, res.ablations, base_eval)
    assert table.harmful_refusal > 0.2 or table.harmless_refusal > 0.2


def test_arditi_single_direction_falls_short(organism, sets, base_eval):
    a = adapt(organism.model)
    harmful = sets.texts("harmful")
    ids = refusal_token_ids(organism.tokenizer, harmful, generate(organism.model, organism.tokenizer, harmful, 8))
    assert ids
    choice = arditi(organism.model, organism.tokenizer, a, harmful, sets.texts("harmless"), ids, ArditiConfig())
    assert choice.table and {"layer", "position", "kl"} <= set(choice.table[0])
    table, _ = _evaluate(organism, [Ablation(choice.direction)], base_eval)
    assert table.harmful_refusal >= 0.2 or table.harmless_refusal >= 0.2


def test_activation_cache_skips_capture_on_rerun(organism, sets, tmp_path, monkeypatch):
    opts = ProbeOptions(directions_per_layer=2)
    first = run_probe(organism, sets, opts, tmp_path, lambda _m: None)
    assert len(list(tmp_path.glob("act-*.safetensors"))) == 3

    def boom(*_a, **_k):
        raise AssertionError("capture ran again")

    monkeypatch.setattr(activations, "capture", boom)
    again = run_probe(organism, sets, opts, tmp_path, lambda _m: None)
    torch.testing.assert_close(again.fdr, first.fdr)


def test_cli_probe_then_ablate_writes_loadable_folders(organism_dir, tmp_path):
    before = tree_digest(organism_dir)
    env_cache = ["--config", str(tmp_path / "c.toml")]
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    probe = subprocess.run(
        [*CLI, "probe", str(organism_dir), "-o", str(tmp_path / "p"), *env_cache], capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    for name in ("directions.safetensors", "scores.json", "scores.csv", "fdr.svg", "entanglement.svg", "probe.json"):
        assert (tmp_path / "p" / name).is_file()
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert {"top_direction_share", "top_layer_share", "best_layer"} <= set(scores["summary"])
    out = tmp_path / "saber"
    run = subprocess.run(
        [
            *CLI,
            "ablate",
            str(organism_dir),
            "--method",
            "saber",
            "--probe",
            str(tmp_path / "p"),
            "-o",
            str(out),
            *env_cache,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["method"] == "saber" and manifest["source_fingerprint"] and manifest["chosen"]["passes"]
    assert "refusal-lab ablate" in (out / "reproduce.sh").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(organism_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("o_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert tree_digest(organism_dir) == before
    again = subprocess.run(
        [*CLI, "ablate", str(organism_dir), "-o", str(out), *env_cache], capture_output=True, text=True
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not list(tmp_path.glob(".*tmp*"))


def test_probe_folder_from_another_model_is_refused(organism, tmp_path):
    from refusal_lab.activations import fingerprint
    from refusal_lab.pipeline import write_probe

    probe = run_probe(
        organism, prompt_sets_for(organism.source), ProbeOptions(directions_per_layer=1), None, lambda _m: None
    )
    write_probe(tmp_path / "p", probe, {"fingerprint": "someone-else"})
    with pytest.raises(UserError, match="another model"):
        read_probe(tmp_path / "p", fingerprint(organism.model), probe.directions.shape[1])
    with pytest.raises(UserError, match="hidden size"):
        read_probe(tmp_path / "p", "x", probe.directions.shape[1] + 1)


def test_identical_prompt_sets_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match="identical"):
        prompt_sets_for(tmp_path, tmp_path / "a.txt", tmp_path / "a.txt")


def test_nan_activations_are_refused(organism):
    a = adapt(organism.model)
    handle = a.layers[1].register_forward_hook(
        lambda _m, _a, out: (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    )
    try:
        with pytest.raises(UserError, match="NaN"):
            activations.capture(organism.model, organism.tokenizer, a, ["how do i fix the door ?"])
    finally:
        handle.remove()


def test_post_instruction_positions(organism):
    assert activations.post_instruction_length(organism.tokenizer) == 2  # <|end|> <|assistant|>
    a = adapt(organism.model)
    s = activations.capture(organism.model, organism.tokenizer, a, ["what is 2 plus 2 ?"] * 3, "post", keep=3)
    assert s.mean.shape == (2, a.num_layers, a.hidden_size) and s.vectors.shape[1] == 2
    assert Path(organism.source).is_dir()
