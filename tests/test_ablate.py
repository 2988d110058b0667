"""Probe and ablate on the organism: SABER meets its targets, Arditi falls short, outputs are sound."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_process import CLI, run_cli
from refusal_lab.ablate.arditi import arditi
from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.ablate.saber import saber
from refusal_lab.ablate.stage import AblationRecord
from refusal_lab.config import SABER_SCOPES, ArditiSettings, ProbeSettings, PromptSettings, SaberSettings
from refusal_lab.core import activations
from refusal_lab.core.arch import adapt
from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import KeywordScorer, first_token_kl, last_logits, refusal_token_ids
from refusal_lab.core.sources import Source
from refusal_lab.errors import UserError
from refusal_lab.organism.build import organism_behaviour, prompt_sets
from refusal_lab.probe.stage import read_probe, run_probe
from test_model_loading import tree_digest

GENERIC = KeywordScorer()  # the standard keyword markers only


def prompt_sets_for(folder, harmful=None, harmless=None):
    return Source.of(folder).probe_sets(PromptSettings(harmful=harmful, harmless=harmless))


@pytest.fixture(scope="module")
def sets(organism_dir):
    return prompt_sets_for(organism_dir)


@pytest.fixture(scope="module")
def base_eval(organism):
    ev = prompt_sets(organism.source, "eval")
    table, _ = organism_behaviour(organism.model, organism.tokenizer, organism.source)
    logits = last_logits(organism.model, organism.tokenizer, [p.prompt for p in ev["harmless"]])
    return ev, table, logits


def _evaluate(organism, ablations, base_eval, scorer=None):
    ev, _, base_logits = base_eval
    a = adapt(organism.model)
    with hooked(a, ablations):
        table, _ = organism_behaviour(organism.model, organism.tokenizer, organism.source, scorer=scorer)
        kl = first_token_kl(
            base_logits, last_logits(organism.model, organism.tokenizer, [p.prompt for p in ev["harmless"]])
        )
    return table, kl


def _saber(organism, sets, cfg: SaberSettings, probe: ProbeSettings | None = None):
    a = adapt(organism.model)
    texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
    return saber(organism.model, organism.tokenizer, a, *texts, probe or ProbeSettings(), cfg)


@pytest.mark.slow
def test_saber_defaults_make_the_organism_comply_and_keep_capability(organism, sets, base_eval):
    """SABER's published defaults turn refusals into compliance (the template for this very request),
    not into babble or merely missing refusal words. How much varies by build (bench/organism_seeds.py:
    51-100% complied over seeds 0-4, broken <= 3.3%), so the bar is a third of the base's refusals;
    the per-category oracle (test_organism) carries the >= 70% bar. Other thresholds are relative to
    this build's own base figures."""
    res = _saber(organism, sets, SaberSettings())
    assert 1 <= len(res.passes) <= 4 and all(len(p.picks) <= 14 for p in res.passes)
    table, kl = _evaluate(organism, res.ablations, base_eval)
    base = base_eval[1]
    assert table.harmful_compliance >= 0.33 * base.harmful_refusal
    assert table.harmful_broken <= 0.1  # what stopped refusing complied
    assert table.harmless_compliance >= base.harmless_compliance - 0.05
    assert table.capability >= base.capability - 0.1
    assert table.recognition >= base.recognition - 0.15
    assert 0 < kl < 0.05
    generic, _ = _evaluate(organism, res.ablations, base_eval, scorer=GENERIC)
    assert generic.harmful_refusal <= table.harmful_refusal  # the organism's own words only add refusals


def _same_edit(a: list[Ablation], b: list[Ablation]) -> bool:
    return len(a) == len(b) and all(
        x.directions.shape == y.directions.shape
        and torch.allclose(x.directions, y.directions, atol=1e-6)
        and torch.equal(x.alphas, y.alphas)
        and (x.layer_scale is None) == (y.layer_scale is None)
        and x.embedding == y.embedding
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("scope", SABER_SCOPES)
def test_saber_from_the_probe_stages_probe_is_saber_probing_itself(organism, sets, tmp_path, scope):
    """prove and ablate hand SABER the probe stage's probe of the unedited model (cached on disk, one
    for both scopes and the search): it must be the probe SABER's first pass would take itself, or the
    edits differ. A probe with other settings gives another edit, so the probe handed in is the one used."""
    cfg = SaberSettings(scope=scope, passes=2)
    texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
    m, tok, a = organism.model, organism.tokenizer, adapt(organism.model)
    own = saber(m, tok, a, *texts, ProbeSettings(), cfg)
    for _ in range(2):  # captured, then read back from the cache
        first = run_probe(organism, sets, ProbeSettings(), 16, tmp_path, lambda _m: None)
        given = saber(m, tok, a, *texts, ProbeSettings(), cfg, first_probe=first)
        assert own.ablations and _same_edit(own.ablations, given.ablations)
    other = run_probe(organism, sets, ProbeSettings(biproject=False), 16, tmp_path, lambda _m: None)
    assert not _same_edit(own.ablations, saber(m, tok, a, *texts, ProbeSettings(), cfg, first_probe=other).ablations)


@pytest.mark.slow
def test_biprojection_on_against_off(organism, sets, base_eval):
    """The measured reason biproject is on by default: SABER's directions made orthogonal to the
    harmless mean (on) buy about the same compliance as the raw SVD directions (off) for far less
    drift on harmless prompts. Seeds 0-4: first-token KL 0.0002-0.0022 on against 0.012-0.045 off,
    compliance on >= off - 7 points (figures in the README)."""
    on, kl_on = _evaluate(organism, _saber(organism, sets, SaberSettings()).ablations, base_eval)
    off_res = _saber(organism, sets, SaberSettings(), ProbeSettings(biproject=False))
    off, kl_off = _evaluate(organism, off_res.ablations, base_eval)
    assert kl_on > 0 and kl_off > 0  # both edited the model
    assert kl_on < kl_off / 3, (kl_on, kl_off)
    assert on.harmful_compliance >= off.harmful_compliance - 0.15, (on, off)


def test_arditi_single_direction_falls_short(organism, sets, base_eval):
    """Arditi et al.'s selection finds a direction that changes the model yet leaves it refusing (or
    makes harmless prompts refuse): one direction is not enough on the organism. Seeds 0-4: 33-51% of
    harmful prompts still refused, first-token KL 0.0003-0.0034."""
    a = adapt(organism.model)
    harmful = sets.texts("harmful")
    ids = refusal_token_ids(organism.tokenizer, generate(organism.model, organism.tokenizer, harmful, 8))
    assert ids
    choice = arditi(organism.model, organism.tokenizer, a, harmful, sets.texts("harmless"), ids, ArditiSettings())
    assert choice.table and {"layer", "position", "kl"} <= set(choice.table[0])
    table, kl = _evaluate(organism, [Ablation(choice.direction)], base_eval)
    base = base_eval[1]
    assert kl > 1e-4  # the edit acted
    assert table.harmful_refusal >= 0.2 * base.harmful_refusal or table.harmless_refusal >= 0.2


@pytest.mark.parametrize("seed", range(8))
def test_arditi_checks_candidates_lazily_and_chooses_as_checking_all_would(seed):
    """The steering and KL checks run in order of ablation score (KL only after steering passed) and
    stop at the first pass; the choice (and any relaxation) must equal the exhaustive one. Seeds
    cover: a pass early or late, ties (3), none within the KL limit (2: KL relaxed), none within it
    and none passing steering either (4: both relaxed), a NaN score (5)."""
    from refusal_lab.ablate.arditi import Candidate, Rules, admissible, checked_in_order

    g = torch.Generator().manual_seed(seed)
    n, limit, max_kl = 40, 30, 0.1
    high = seed in (2, 4)
    hidden = [
        {
            "kl": float(torch.rand(1, generator=g)) * (0.01 if high else 0.3) + (0.2 if high else 0.0),
            "steering_score": float(torch.randn(1, generator=g)) - (10.0 if seed == 4 else 0.0),
        }
        for _ in range(n)
    ]
    scores = torch.randn(n, generator=g).round(decimals=0 if seed == 3 else 4)  # seed 3: many ties
    if seed == 5:
        scores[int(scores.argmin())] = float("nan")
    rows = [Candidate(i % 32, -1, [], ablation_score=float(scores[i])) for i in range(n)]
    full = [Candidate(r.layer, -1, [], ablation_score=r.ablation_score, **h) for r, h in zip(rows, hidden, strict=True)]
    index = {id(r): i for i, r in enumerate([*rows, *full])}
    calls: list[tuple[str, int]] = []

    def check(name: str):
        def run(r: Candidate) -> None:
            calls.append((name, index[id(r)]))
            setattr(r, name, hidden[index[id(r)]][name])

        return run

    rules = Rules(max_kl, limit)
    ok, relaxed = checked_in_order(rows, check("kl"), check("steering_score"), rules)
    want_ok, want_relaxed = admissible(full, rules)
    got, want = min(ok, key=lambda r: r.ablation_score), min(want_ok, key=lambda r: r.ablation_score)
    assert (index[id(got)], relaxed) == (index[id(want)] - n, want_relaxed)
    assert relaxed == {2: ["kl"], 4: ["kl", "steering"]}.get(seed, [])
    assert len(set(calls)) == len(calls)  # each check run once at most per candidate
    assert len(calls) < 2 * n  # fewer passes than checking every candidate
    if seed == 4:  # nothing passes steering: no KL pass is needed to know the choice
        assert {name for name, _ in calls} == {"steering_score"}


@dataclass
class _FakeJudge:
    """select()'s judge over made-up per-prompt refusal scores: candidate i's ablation leaves
    `table[i, j]` refusal on harmful prompt j; KL is 0.05 everywhere, and steering always passes."""

    table: torch.Tensor  # [candidates, prompts]
    harmful: list[str]
    harmless: tuple[str, ...] = ("h",)
    checked: list[int] = field(default_factory=list)

    def ablated(self, c, prompts):
        return self.table[c.layer, : len(prompts), None]  # "logits" [n, 1]: score() takes their mean

    def kl(self, c) -> None:
        self.checked.append(c.layer)
        c.kl = 0.05

    def steering(self, c, _score) -> None:
        c.steering_score = 1.0


@pytest.mark.parametrize("seed", range(4))
def test_successive_halving_scores_the_best_quarter_on_every_prompt_and_checks_only_those(seed):
    """With screen=8 of 32 prompts, every candidate is scored on 8, only the best quarter on all 32 and
    only those are checked; the choice is the exhaustive one wherever the best candidate survives the
    screen (made so here: its first 8 prompts are its typical ones)."""
    from refusal_lab.ablate.arditi import SCREEN_KEEP, Candidate, Rules, select

    g = torch.Generator().manual_seed(seed)
    n = 40
    table = torch.randn(n, 32, generator=g, dtype=torch.float64) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    best = int(torch.randint(0, n, (1,), generator=g))
    table[best] = table.min() - 1.0  # the best everywhere, screen included
    prompts = [f"p{j}" for j in range(32)]

    def score(x: torch.Tensor) -> float:
        return float(x.mean())

    def run(screen: int) -> tuple[int, list, _FakeJudge]:
        judge = _FakeJudge(table, prompts)
        cands = [Candidate(i, -1, []) for i in range(n)]
        sel = select(cands, judge, score, Rules(0.1, steering=True), screen=screen)
        return sel.chosen.layer, cands, judge

    full_choice, full, _ = run(0)
    choice, cands, judge = run(8)
    assert choice == full_choice == best
    scored = [c for c in cands if c.ablation_score == c.ablation_score]
    assert len(scored) == int(SCREEN_KEEP * n) and all(c.screened == c.screened for c in cands)
    assert all(c.screened == pytest.approx(float(table[c.layer, :8].mean())) for c in cands)
    assert set(judge.checked) <= {c.layer for c in scored}  # the pruned are never checked
    assert all(c.screened != c.screened for c in full)  # screen=0: no screening pass
    assert run(32)[1][0].screened != run(32)[1][0].screened  # a screen as large as the set is no screen


def test_a_choice_with_both_checks_relaxed_still_carries_its_kl():
    """Where no candidate passes steering, no KL pass is needed to choose; the choice's drift is then
    measured alone, so every choice carries its KL (an edit's record and log need it)."""
    from refusal_lab.ablate.arditi import Candidate, Rules, select

    class NeverSteers(_FakeJudge):
        def steering(self, c, _score) -> None:
            c.steering_score = -1.0

    table = torch.arange(6, dtype=torch.float64)[:, None].expand(6, 4).contiguous()
    judge = NeverSteers(table, ["p0", "p1", "p2", "p3"])
    sel = select([Candidate(i, -1, []) for i in range(6)], judge, lambda x: float(x.mean()), Rules(0.1))
    assert sel.relaxed == ["kl", "steering"] and sel.chosen.layer == 0
    assert sel.chosen.kl == 0.05 and judge.checked == [0]  # the choice alone was KL-checked


def test_the_gentlest_relaxation_takes_the_least_kl_and_needs_no_steering_check():
    """The search's reading of the selection: no steering check; where no candidate is within the KL
    limit, the least-KL one is taken (not the best-scored one), every candidate having been KL-checked."""
    from refusal_lab.ablate.arditi import Candidate, Rules, checked_in_order

    kls = {2: 0.5, 3: 0.3, 4: 0.9}
    rows = [Candidate(layer, -1, [], ablation_score=s) for layer, s in ((2, 1.0), (3, 4.0), (4, 0.0))]
    checked: list[int] = []

    def kl(c: Candidate) -> None:
        checked.append(c.layer)
        c.kl = kls[c.layer]

    def no_steering(_c: Candidate) -> None:
        raise AssertionError("the rules ask for no steering check")

    ok, relaxed = checked_in_order(rows, kl, no_steering, Rules(0.1, steering=False), "gentlest")
    assert ([c.layer for c in ok], relaxed) == ([3], ["kl"]) and checked == [4, 2, 3]
    checked.clear()
    ok, relaxed = checked_in_order(rows, kl, no_steering, Rules(0.6, steering=False), "gentlest")
    assert ([c.layer for c in ok], relaxed) == ([2], []) and checked == [4, 2]  # stopped at the first within


def test_activation_cache_skips_capture_on_rerun(organism, sets, tmp_path, monkeypatch):
    opts = ProbeSettings(directions_per_layer=2)
    first = run_probe(organism, sets, opts, 16, tmp_path, lambda _m: None)
    assert len(list(tmp_path.glob("act-*.safetensors"))) == 3

    def boom(*_a, **_k):
        raise AssertionError("capture ran again")

    monkeypatch.setattr(activations, "capture", boom)
    again = run_probe(organism, sets, opts, 16, tmp_path, lambda _m: None)
    torch.testing.assert_close(again.fdr, first.fdr)


@pytest.mark.slow
def test_cli_probe_then_ablate_writes_loadable_folders(organism_dir, tmp_path):
    before = tree_digest(organism_dir)
    env_cache = ["--config", str(tmp_path / "c.toml")]
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    probe = run_cli([*CLI, "probe", str(organism_dir), "-o", str(tmp_path / "p"), *env_cache])
    assert probe.returncode == 0, probe.stderr
    for name in ("directions.safetensors", "scores.json", "scores.csv", "fdr.svg", "entanglement.svg", "probe.json"):
        assert (tmp_path / "p" / name).is_file()
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert {"top_direction_share", "top_layer_share", "best_layer"} <= set(scores["summary"])
    out = tmp_path / "saber"
    run = run_cli(
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
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["method"] == "saber" and manifest["source_fingerprint"] and manifest["chosen"]["passes"]
    record = AblationRecord.read(out)  # the typed record reads what export wrote, field for field
    assert record.method == "saber" and record.chosen == manifest["chosen"] and record.prompts["harmful"] > 0
    assert record.to_json() == {k: manifest[k] for k in record.to_json()}
    assert "refusal-lab ablate" in (out / "reproduce.sh").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(organism_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("o_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert tree_digest(organism_dir) == before
    again = run_cli([*CLI, "ablate", str(organism_dir), "-o", str(out), *env_cache])
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not list(tmp_path.glob(".*tmp*"))


def test_probe_folder_from_another_model_is_refused(organism, tmp_path):
    from refusal_lab.config import Settings
    from refusal_lab.probe.stage import write_probe

    sets = prompt_sets_for(organism.source)
    probe = run_probe(organism, sets, ProbeSettings(directions_per_layer=1), 16, None, lambda _m: None)
    write_probe(tmp_path / "p", probe, organism, Settings(), sets)
    with pytest.raises(UserError, match="another model"):
        read_probe(tmp_path / "p", "someone-else", probe.directions.shape[1])
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


def test_arditi_steers_where_the_direction_was_read(organism):
    """The vector is added to layer l's output, the point the difference of means was measured at."""
    from refusal_lab.ablate.arditi import steer

    a = adapt(organism.model)
    prompts = ["how do i fix the door ?", "what is 2 plus 2 ?"]
    layer = 1
    v = torch.randn(a.hidden_size) * 0.5
    before = activations.capture(organism.model, organism.tokenizer, a, prompts, keep=2).vectors
    handle = steer(a, layer, v)
    try:
        after = activations.capture(organism.model, organism.tokenizer, a, prompts, keep=2).vectors
    finally:
        handle.remove()
    torch.testing.assert_close(after[:, 0, :layer], before[:, 0, :layer])  # earlier layers untouched
    torch.testing.assert_close(after[:, 0, layer] - before[:, 0, layer], v.expand(2, -1), atol=1e-5, rtol=1e-5)


def test_arditi_selects_on_prompts_it_did_not_extract_from(organism, sets):
    from refusal_lab.ablate.arditi import split_for_selection

    ext, sel = split_for_selection(sets.texts("harmful"), 32)
    assert len(sel) == min(32, len(sets.texts("harmful")) // 2) and not set(ext) & set(sel)
    assert ext + sel == sets.texts("harmful")


def test_saber_edits_only_the_chosen_components_in_every_pass(organism, sets, monkeypatch):
    """Pass 2 is measured with the edit that is exported, not with both branches edited."""
    from refusal_lab.ablate import saber as saber_module

    seen = []
    real = saber_module.edited

    def recording(adapter, ablations, *rest):
        seen.append({ab.components for ab in ablations})
        return real(adapter, ablations, *rest)

    monkeypatch.setattr(saber_module, "edited", recording)
    res = _saber(organism, sets, SaberSettings(components="mlp", passes=2, stop_separability=0.0))
    assert len(res.passes) == 2 and all(ab.components == ("mlp",) for ab in res.ablations)
    assert seen and all(s <= {("mlp",)} for s in seen)


def test_saber_without_the_last_measurement_makes_the_same_edit_for_one_probe_less(organism, sets, monkeypatch):
    """measure_last=False (the search) skips the re-probe after the last pass and nothing else."""
    from refusal_lab.ablate import saber as saber_module

    calls = []
    real = saber_module.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(saber_module, "capture", counting)
    a = adapt(organism.model)
    texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
    cfg = SaberSettings(passes=2, stop_separability=0.0)
    full = saber(organism.model, organism.tokenizer, a, *texts, ProbeSettings(), cfg)
    n_full, calls[:] = len(calls), []
    quick = saber(organism.model, organism.tokenizer, a, *texts, ProbeSettings(), cfg, measure_last=False)
    assert len(full.passes) == len(quick.passes) == 2
    assert n_full - len(calls) == 2  # harmful and harmless captures after the last pass
    assert quick.passes[-1].separability_after is None and quick.passes[0].separability_after is not None
    assert len(full.ablations) == len(quick.ablations)
    for x, y in zip(full.ablations, quick.ablations, strict=True):
        torch.testing.assert_close(x.directions, y.directions)
        torch.testing.assert_close(x.alphas, y.alphas)


def test_post_positions_are_all_scored(organism, sets):
    """--positions post scores directions on every post-instruction token, not on the last alone."""
    post = run_probe(organism, sets, ProbeSettings(positions="post", directions_per_layer=1), 16, None, lambda _m: None)
    last = run_probe(organism, sets, ProbeSettings(positions="last", directions_per_layer=1), 16, None, lambda _m: None)
    a = adapt(organism.model)
    texts = sets.texts("harmful")
    full = activations.capture(organism.model, organism.tokenizer, a, texts, "post", keep=len(texts))
    torch.testing.assert_close(post.mu_harmful, full.vectors.double().mean((0, 1)))
    assert not torch.allclose(post.mu_harmful, last.mu_harmful)


def test_activation_cache_misses_when_the_chat_template_changes(organism):
    tok = organism.tokenizer
    prompts = ["how do i fix the door ?"]
    key = activations.cache_key("fp", tok, prompts, "last", 8)
    original = tok.chat_template
    try:
        tok.chat_template = original.replace("<|assistant|>", "<|assistant|> <|assistant|>")
        assert activations.cache_key("fp", tok, prompts, "last", 8) != key
    finally:
        tok.chat_template = original
    assert activations.cache_key("fp", tok, prompts, "last", 8) == key


def test_export_keeps_the_checkpoint_dtype_and_leaves_the_loaded_model_as_it_was(organism_dir, tmp_path):
    import json as _json
    import shutil

    from safetensors import safe_open

    from refusal_lab.ablate.stage import export
    from refusal_lab.config import Settings
    from refusal_lab.core.model import load

    bf16 = tmp_path / "bf16"
    shutil.copytree(organism_dir, bf16)
    AutoModelForCausalLM.from_pretrained(organism_dir).to(torch.bfloat16).save_pretrained(bf16)
    m = load(bf16, "float32", "cpu")  # computed in float32 on the CPU, as `auto` does
    fp = m.fingerprint
    r = torch.randn(m.adapter.hidden_size, dtype=torch.float64)
    export(m, [Ablation(r)], tmp_path / "out", AblationRecord("test", {}), Settings(), "ablate")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert _json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    from refusal_lab.core.model import fingerprint

    assert fingerprint(m.model) == fp and next(m.model.parameters()).dtype == torch.float32
    u = r / r.norm()
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[1].mlp.down_proj.weight.double()
    original = m.model.model.layers[1].mlp.down_proj.weight.double()
    assert (u @ edited).abs().max() < 0.1 * (u @ original).abs().max()  # removed, up to bfloat16 rounding
