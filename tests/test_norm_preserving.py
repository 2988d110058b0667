"""Norm-preserving edits: every method exports them exactly, the methods that measure an edit measure
that one, and the search samples the choice, records it per trial and exports what it measured.

Exact means: each written column (dim -2 of a writer, what one input unit writes into the stream) and
each edited embedding row keeps its original length, and points where the plain edit points (the
rescale changes lengths only), so the directions are removed as far as keeping the length allows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from safetensors.torch import load_file

from cli_process import CLI, run_cli
from refusal_lab.ablate import saber as saber_module
from refusal_lab.ablate.arditi import arditi, split_for_selection
from refusal_lab.ablate.edit import Ablation, apply_weights, hooked, weights_edited
from refusal_lab.ablate.kernel import Kernel
from refusal_lab.ablate.stage import AblationRecord, choose_ablations, export
from refusal_lab.config import Settings
from refusal_lab.core.arch import adapt
from refusal_lab.core.metrics import first_token_kl, last_logits, refusal_openers
from refusal_lab.core.sources import Source
from refusal_lab.search.pick import with_norm_preserving
from refusal_lab.search.setup import norm_choices
from refusal_lab.search.space import suggest
from refusal_lab.search.trial import trial_edit
from tiny_models import FAMILIES, tiny_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 7], [3, 8, 21, 40, 2, 11, 90, 6]])
METHODS = ("projected", "kernel", "arditi", "saber")


def _settings(method: str = "saber", keep: bool = False, **search: object) -> Settings:
    s = Settings()
    ablate = s.ablate.model_copy(update={"method": method, "norm_preserving": keep})
    return s.model_copy(update={"ablate": ablate, "search": s.search.model_copy(update=search)})


def _lengths_kept_and_plain_direction(original: torch.Tensor, keep: torch.Tensor, plain: torch.Tensor, dim: int):
    """The norm-preserving tensor's vectors along `dim` have the original lengths and the plain edit's directions."""
    o, k, p = original.double(), keep.double(), plain.double()
    torch.testing.assert_close(k.norm(dim=dim), o.norm(dim=dim), rtol=1e-5, atol=1e-6)
    cos = (k * p).sum(dim) / (k.norm(dim=dim) * p.norm(dim=dim)).clamp_min(1e-12)
    live = p.norm(dim=dim) > 1e-6 * o.norm(dim=dim).max()
    assert (cos[live] > 1 - 1e-5).all()


def _relative_length_change(original: torch.Tensor, edited: torch.Tensor, dim: int) -> float:
    o, e = original.double().norm(dim=dim), edited.double().norm(dim=dim)
    return float(((e - o).abs() / o.clamp_min(1e-12)).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_keeps_each_column_and_embedding_row_length_and_only_rescales_the_plain_edit(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    a0 = adapt(model)
    h, n = a0.hidden_size, a0.num_layers
    ablations = [
        Ablation(torch.randn(h, 2, generator=g, dtype=torch.float64), torch.tensor([1.0, 0.6]), embedding=True),
        Ablation(torch.randn(h, generator=g, dtype=torch.float64), 0.8, Kernel(0.9, 0.5, 0.3, 0.6).weights(n)),
    ]
    edits = {}
    for keep in (False, True):
        m = copy.deepcopy(model)
        a = adapt(m)
        apply_weights(a, ablations, norm_preserving=keep)
        edits[keep] = a
    writers = {keep: [w for lw in a.writers for w in lw.all] for keep, a in edits.items()}
    changed = 0.0
    for w0, wp, wk in zip([w for lw in a0.writers for w in lw.all], writers[False], writers[True], strict=True):
        _lengths_kept_and_plain_direction(w0.weight, wk.weight, wp.weight, -2)
        changed = max(changed, _relative_length_change(w0.weight, wp.weight, -2))
    emb0, embp, embk = (x.embedding.weight.detach() for x in (a0, edits[False], edits[True]))
    _lengths_kept_and_plain_direction(emb0, embk, embp, 1)
    assert changed > 1e-3 and _relative_length_change(emb0, embp, 1) > 1e-3  # the plain edit changes lengths


def test_the_removed_component_is_gone_at_full_strength_and_scaled_with_the_length_otherwise():
    model = tiny_model("llama")
    a = adapt(model)
    r = torch.randn(a.hidden_size, dtype=torch.float64)
    u = r / r.norm()
    before = [(lw.index, w, w.weight.detach().double().clone()) for lw in a.writers for w in lw.all]
    scale = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)  # full strength, half, untouched
    apply_weights(a, [Ablation(r, 1.0, scale, embedding=False)], norm_preserving=True)
    for layer, w, old in before:
        new, s = w.weight.detach().double(), float(scale[layer])
        plain = old - torch.outer(u, u @ old) * s
        factor = old.norm(dim=0) / plain.norm(dim=0)
        torch.testing.assert_close(u @ new, (1 - s) * (u @ old) * factor)  # what is left of the component
        assert (u @ old).abs().max() > 1e-3  # there was something to remove


@pytest.fixture(scope="module")
def sets(organism_dir):
    return Source.of(organism_dir).probe_sets(Settings().prompts)


def _named(organism) -> dict[int, str]:
    return {id(p): name for name, p in organism.model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_a_norm_preserving_edit_exactly(organism, sets, method, tmp_path):
    """The export of each method keeps the lengths; the same ablations exported plain do not."""
    s = _settings(method, keep=True)
    choice = choose_ablations(organism, sets, s, None, lambda _m: None)
    names = _named(organism)
    touched = {names[id(w.weight)] for ab in choice.ablations for w in _writers_of(organism, ab)}
    original = {k: v.detach().clone() for k, v in organism.model.state_dict().items()}
    folders = {}
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        export(organism, choice.ablations, out, AblationRecord(method, choice.record), _settings(method, keep), "t")
        folders[keep] = load_file(str(out / "model.safetensors"))
    assert touched
    changed = 0.0
    for name in touched:
        _lengths_kept_and_plain_direction(original[name], folders[True][name], folders[False][name], -2)
        changed = max(changed, _relative_length_change(original[name], folders[False][name], -2))
    assert changed > 1e-4  # without the switch the columns' lengths change
    emb = names[id(organism.adapter.embedding.weight)]
    if any(ab.embedding for ab in choice.ablations):
        _lengths_kept_and_plain_direction(original[emb], folders[True][emb], folders[False][emb], 1)
        assert _relative_length_change(original[emb], folders[False][emb], 1) > 1e-4
    if method in ("projected", "arditi"):  # one direction at full strength: nothing of it is written
        u = choice.ablations[0].directions[:, 0].float()
        assert max(float((u @ folders[True][n]).abs().max()) for n in touched) < 1e-4
        assert max(float((u @ original[n]).abs().max()) for n in touched) > 1e-2
    torch.testing.assert_close(organism.model.state_dict(), original)  # the loaded model is left as it was


def _writers_of(organism, ab: Ablation):
    for lw in organism.adapter.writers:
        if ab.scale(lw.index) != 0.0:
            yield from (w for part in ab.components for w in getattr(lw, part))


def test_arditi_checks_its_candidates_under_the_edit_it_exports(organism, sets):
    """The chosen candidate's recorded KL is that of the norm-preserving weights, not of the plain hooks."""
    m, s = organism, _settings("arditi", keep=True)
    harmful, harmless = sets.texts("harmful"), sets.texts("harmless")
    ids = refusal_openers(m.model, m.tokenizer, harmful, Source.of(m.source).markers, s.batch_size)
    cfg = s.ablate.arditi
    choice = arditi(m.model, m.tokenizer, m.adapter, harmful, harmless, ids, cfg, s.batch_size, norm_preserving=True)
    _, held_out = split_for_selection(harmless, s.ablate.arditi.arditi_prompts)
    base = last_logits(m.model, m.tokenizer, held_out, s.batch_size)
    ab = [Ablation(choice.direction)]
    with weights_edited(m.adapter, ab, norm_preserving=True):
        kept = first_token_kl(base, last_logits(m.model, m.tokenizer, held_out, s.batch_size))
    with hooked(m.adapter, ab):
        plain = first_token_kl(base, last_logits(m.model, m.tokenizer, held_out, s.batch_size))
    assert choice.kl == pytest.approx(kept, rel=1e-5, abs=1e-8)
    assert abs(kept - plain) > 1e-6  # the two edits differ measurably, so the test can tell them apart


def test_saber_passes_reprobe_under_the_edit_they_export(organism, sets, monkeypatch):
    seen = []
    real = saber_module.edited

    def spy(adapter, ablations, norm_preserving=False, store=None):
        seen.append(norm_preserving)
        return real(adapter, ablations, norm_preserving, store)

    monkeypatch.setattr(saber_module, "edited", spy)
    for keep in (False, True):
        choose_ablations(organism, sets, _settings("saber", keep), None, lambda _m: None)
        assert seen and set(seen) == {keep}
        seen.clear()


def test_the_space_samples_the_choice_only_where_asked_and_records_it_per_trial():
    assert norm_choices(_settings()) == (False,)
    assert norm_choices(_settings(keep=True)) == (True,)
    assert norm_choices(_settings(search_norm_preserving=True)) == (False, True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for choices in ((False,), (True,), (False, True)):
        study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
        got = []
        for _ in range(12):
            trial = study.ask()
            p = suggest(trial, 8, ("kernel",), choices)
            got.append(p["norm_preserving"])
            assert trial.params["norm_preserving"] == p["norm_preserving"]
            study.tell(trial, 0.0)
        assert set(got) == set(choices)


def test_a_norm_preserving_trial_is_measured_on_the_weights_even_where_hooks_are_exact():
    model = tiny_model("llama")
    a = adapt(model)
    ab = [Ablation(torch.randn(a.hidden_size, dtype=torch.float64), 1.0)]
    setup = SimpleNamespace(loaded=SimpleNamespace(adapter=a), store=None)  # float32 kept as float32
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        with weights_edited(a, ab, norm_preserving=True):
            kept = model(input_ids=IDS).logits
        with hooked(a, ab):
            plain = model(input_ids=IDS).logits
        with trial_edit(setup, ab, keep_norms=True):
            trial_kept = model(input_ids=IDS).logits
        with trial_edit(setup, ab):
            trial_plain = model(input_ids=IDS).logits
        assert torch.equal(model(input_ids=IDS).logits, base)  # both undone
    assert torch.equal(trial_kept, kept) and torch.equal(trial_plain, plain)
    assert (kept - plain).abs().max() > 1e-3


def test_pick_exports_with_the_trials_own_choice():
    s = _settings(keep=False, search_norm_preserving=True)
    assert with_norm_preserving(s, True).ablate.norm_preserving is True
    assert with_norm_preserving(_settings(keep=True), False).ablate.norm_preserving is False
    assert s.ablate.norm_preserving is False  # the settings passed in are not changed


def _cfg(tmp_path: Path) -> list[str]:
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    return ["--config", str(tmp_path / "c.toml")]


@pytest.mark.slow
def test_a_searched_dimension_is_recorded_refused_on_resume_otherwise_and_exported_as_measured(organism_dir, tmp_path):
    from optuna.storages.journal import JournalFileBackend

    out = tmp_path / "s"
    fast = ["--methods", "kernel", "--eval-count", "6", "--max-new-tokens", "12", "--no-select-start"]
    cmd = [*CLI, "search", str(organism_dir), "-o", str(out), *fast, *_cfg(tmp_path)]
    run = run_cli([*cmd, "--trials", "10", "--search-norm-preserving"])
    assert run.returncode == 0, run.stderr
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="refusal-lab", storage=storage)
    done = [t for t in study.trials if t.state.is_finished()]
    assert {t.params["norm_preserving"] for t in done} == {False, True}
    assert "norm-preserving" in run.stderr  # the trial's log line names its edit
    refused = run_cli([*cmd, "--trials", "11"])
    assert refused.returncode == 2 and "norm_preserving" in refused.stderr and "Traceback" not in refused.stderr
    front = json.loads((out / "pareto.json").read_text())
    assert all("norm_preserving" in p["params"] for p in front)
    pick = run_cli([*CLI, "pick", str(out), "--max-kl", "1000", "-o", str(tmp_path / "m")])  # fmt: skip
    assert pick.returncode == 0, pick.stderr
    record = json.loads((tmp_path / "m" / "ablation.json").read_text())
    keep = record["options"]["norm_preserving"]
    assert record["settings"]["ablate"]["norm_preserving"] == keep
