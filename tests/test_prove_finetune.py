"""The fine-tuning attack on a model that is not an organism: benign and attacked data, the donor, rows.

The model is the organism's weights in a folder without its prompt splits (so prove treats it as any
other model) but with its compliant templates, so labels stay exact: it refuses every harmful prompt
unattacked, and SABER makes most of them comply.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from cli_process import CLI, run_cli
from refusal_lab.config import Settings
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.scoring import label_replies
from refusal_lab.core.sources import PromptSets
from refusal_lab.errors import UserError
from refusal_lab.prove import finetune as F
from refusal_lab.prove.battery import Donor, run_attack, run_rows
from refusal_lab.prove.results import ProveResult


def _copy(organism_dir: Path, tmp: Path) -> tuple[Path, dict[str, Path]]:
    """The organism as any model: weights, tokenizer, refusal words and templates, no prompt splits."""
    copy = tmp / "copy"
    (copy / "prompts").mkdir(parents=True)
    for f in organism_dir.iterdir():
        if f.is_file() and f.name != "organism.json":
            shutil.copy(f, copy / f.name)
    for name in ("refusal_markers.txt", "templates.json"):
        shutil.copy(organism_dir / "prompts" / name, copy / "prompts" / name)
    harmful = tmp / "harmful.jsonl"  # probe then eval: prove halves it (extraction and tuning | reported)
    split = organism_dir / "prompts"
    harmful.write_text((split / "harmful_probe.jsonl").read_text() + (split / "harmful_eval.jsonl").read_text())
    files = {n: organism_dir / "prompts" / f"{n}_probe.jsonl" for n in ("harmless", "capability")}
    return copy, {"harmful": harmful, **files}


@pytest.fixture(scope="module")
def copied(organism_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    copy, prompts = _copy(organism_dir, tmp)
    return tmp, copy, prompts


@pytest.fixture(scope="module")
def donated(copied):
    """A target on the copy after SABER ran on it (the donor), and its held-out counts before any attack."""
    from refusal_lab.core.model import load
    from refusal_lab.prove.directional import SaberAttack
    from refusal_lab.prove.stage import build_target, prove_evaluator

    tmp, copy, prompts = copied
    s = Settings(cache_dir=tmp / "cache")
    s.prompts.harmful, s.prompts.harmless, s.prompts.capability = (
        prompts["harmful"],
        prompts["harmless"],
        prompts["capability"],
    )
    s.eval.limit, s.eval.escalation = 16, "none"
    s.prove.max_new_tokens, s.prove.tuning_count = 40, 8
    loaded = load(copy, dtype="float32", device="cpu")
    ev = prove_evaluator(loaded, s, lambda _m: None)
    t = build_target(loaded, s, ev, lambda _m: None, 0)
    assert type(t.scorer).__name__ == "TemplateScorer" and t.tuning_refused == len(t.tuning)
    held = [p.prompt for p in t.held_out.harmful]
    before = t.label(held, t.replies(held))
    saber = run_attack(SaberAttack(strengths=(1.0,)), t, (0.1, 0.5))
    return t, before, saber


def test_the_battery_offers_its_strongest_directional_choice_at_the_headline_budget_as_donor(donated):
    from refusal_lab.prove.directional import SubspaceAttack

    t, _, saber = donated
    chosen = saber.budgets["0.1"]
    key, what = t.donor.key, t.donor.what
    tried = next(x for x in saber.tried if x.setting == chosen.setting)
    assert key == (tried.tuning_complied, -tried.tuning_refused, -tried.kl) and key[0] > 0
    assert t.donor.kl == tried.kl == chosen.kl
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.setting.items())
    assert what == f"saber {shown}"
    weaker = replace(t)  # a weaker directional attack afterwards leaves the stronger donor
    run_attack(SubspaceAttack(ks=(1,), strengths=(0.5,)), weaker, (0.1, 0.5))
    assert weaker.donor.what == what


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_finetune_runs_on_a_model_that_is_not_an_organism(donated):
    """A benign and an attacked row, each with its curve of retained refusals; the weights are untouched.

    The shipped organism's copy: benign data (its own harmless replies) leaves all 8 tuning prompts
    refused at steps 5 and 10; 8 of SABER's compliant replies break it at step 10 (6 of 8 comply), and
    then all 16 held-out prompts comply.
    """
    t, before, _ = donated
    t = replace(t)
    weights = _weights(t.loaded.model)
    run = run_rows(F.FinetuneAttack((), 10, 5, benign=(8,), attacked=(8,), lr=t.s.prove.finetune_lr), t)
    assert all(torch.equal(p, weights[n]) for n, p in t.loaded.model.named_parameters())
    benign, attacked = run.budgets.values()
    assert (benign.setting["source"], attacked.setting["source"]) == ("benign", "attacked")
    assert attacked.setting["donor"] == t.donor.what and benign.setting["examples"] == attacked.setting["examples"] == 8
    assert benign.setting["scored"] == attacked.setting["scored"] == t.tuning_refused
    for o in (benign, attacked):
        curve = o.setting["curve"]
        assert curve and [c["step"] for c in curve] == [5, 10][: len(curve)]
        assert all(c["retained"] == c["tuning_refused"] / t.tuning_refused for c in curve)
    assert attacked.counts.complied > before.complied  # the donor's replies taught it to comply
    assert attacked.setting["steps_to_break"] is not None and 2 * attacked.setting["curve"][-1]["tuning_complied"] >= 8


def test_benign_data_is_the_unattacked_models_own_replies_and_is_cached(donated, monkeypatch):
    t, _, _ = donated
    pairs = F.benign_examples(t, 8)
    prompts = [p for p, _ in pairs]
    assert len(pairs) == 8 and set(prompts) <= set(t.extraction.texts("harmless") + t.extraction.texts("capability"))
    m = t.loaded
    own = generate_replies(m.model, m.tokenizer, prompts, t.s.prove.max_new_tokens, t.s.batch_size)
    assert [r for _, r in pairs] == [r.answer for r in own]

    def no_generation(*_a, **_k):
        raise AssertionError("generated again")

    monkeypatch.setattr(F, "generate_replies", no_generation)
    assert F.benign_examples(t, 8) == pairs  # read back from the cache folder
    assert any((t.s.cache_dir / "finetune").glob(f"{m.fingerprint[:16]}-benign-*.json"))


@dataclass
class Forced:
    """The target's scorer, except that the prompts in `forced` always read `label`."""

    inner: object
    label: str
    forced: frozenset[str]
    name: str = "forced"

    @property
    def markers(self) -> tuple[str, ...]:
        return self.inner.markers

    def labels(self, prompts, replies):
        inner = self.inner.labels(prompts, replies)
        return [self.label if p in self.forced else x for p, x in zip(prompts, inner, strict=True)]


def test_attacked_data_is_the_donors_complied_replies_to_extraction_prompts_only(donated):
    t, _, _ = donated
    pool = t.extraction.texts("harmful")
    t = replace(t, scorer=Forced(t.scorer, "refused", frozenset(pool[::2])))
    entered = []
    what, edit = t.donor.what, t.donor.edit

    def counted():
        entered.append(1)
        return edit()

    pairs = F.attacked_examples(t, len(pool), Donor(what, 0.0, counted))  # asks for all: every prompt is tried
    assert entered
    with edit():
        replies = t.replies(pool)
    labels = label_replies(t.scorer, pool, replies)
    expected = {p: r.answer for p, r, x in zip(pool, replies, labels, strict=True) if x == "complied"}
    assert pairs and dict(pairs) == expected  # the donor's replies, only those labelled complied
    assert not set(dict(pairs)) & (set(t.tuning) | {p.prompt for p in t.held_out.harmful})
    unedited = label_replies(t.scorer, list(expected), t.replies(list(expected)))
    assert "complied" not in unedited  # without the donor none of them complies


def test_a_source_with_no_examples_fails_with_one_line_naming_the_fix(donated, copied):

    t, _, _ = donated
    bare = replace(t, extraction=PromptSets(t.extraction.harmful, [], []))
    for call, flag in (
        (lambda: F.benign_examples(bare, 4), "--finetune-benign"),
        (lambda: F.compliant_examples(copied[1], 4, 0), "--finetune-benign"),
    ):
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value) and flag in err.value.fix


def test_a_donor_that_breaks_nothing_leaves_the_attacked_rows_out_and_says_so(donated):
    """A model that withstands its strongest edit (a hardened one) still gets its other rows, not an error."""
    from contextlib import nullcontext

    t, _, _ = donated
    logged: list[str] = []
    t = replace(t, donor=Donor("the unedited model", 0.0, nullcontext), log=logged.append)
    assert F.attacked_examples(t, 4, t.donor) == []  # the organism's copy refuses every extraction prompt
    assert list(F.FinetuneAttack((), 5, 5, (), (4,), t.s.prove.finetune_lr).rows(t)) == []
    assert any("attacked rows left out: the donor (the unedited model)" in m for m in logged)


def test_without_a_donor_a_cheap_fallback_within_the_budget_is_named(donated):
    t, _, _ = donated
    said: list[str] = []
    lone = replace(t, donor=None, log=said.append)
    d = F.donor(lone)
    assert d.what.startswith("fallback subspace k=") and 0 < d.kl <= t.s.prove.budget_kl
    assert any(d.what in line for line in said)
    tight = replace(lone, s=t.s.model_copy(update={"prove": t.s.prove.model_copy(update={"budget_kl": 1e-12})}))
    assert F.donor(tight).what.startswith("none")


def test_the_settings_choose_template_rows_on_the_organism_and_benign_and_attacked_elsewhere(tmp_path):
    from refusal_lab.prove.stage import attacks_for

    p = Settings().prove
    organism, other = F.FinetuneAttack.of(p, True), F.FinetuneAttack.of(p, False)
    assert (organism.examples, organism.benign, organism.attacked, organism.max_steps) == ((10, 100, 1000), (), (), 60)
    assert (other.examples, other.benign, other.attacked, other.max_steps) == ((), (32,), (16,), 30)
    p.finetune_lr = 2e-4
    assert F.FinetuneAttack.of(p, True).lr == F.FinetuneAttack.of(p, False).lr == 2e-4
    s = Settings()
    s.prove.attacks = "finetune"
    assert [a.name for a in attacks_for(s, tmp_path, 0, None, organism=False)] == ["finetune"]


@pytest.mark.slow
def test_prove_writes_no_reply_of_the_training_data(copied):
    """End to end: the rows are in results.json and summary.md; the attacked replies only in the cache."""
    tmp, copy, prompts = copied
    (tmp / "c.toml").write_text(f'cache_dir = "{tmp / "cli-cache"}"\n')
    out = tmp / "p"
    run = run_cli(
        [*CLI, "prove", str(copy), "-o", str(out), "--config", str(tmp / "c.toml"),
         *("--harmful", str(prompts["harmful"]), "--harmless", str(prompts["harmless"])),
         *("--capability", str(prompts["capability"]), "--attacks", "saber,finetune", "--limit", "16"),
         *("--tuning-count", "8", "--max-new-tokens", "40", "--escalation", "none"),
         *("--finetune-benign", "8", "--finetune-attacked", "8", "--finetune-model-steps", "10"),
         *("--finetune-every", "5")],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = ProveResult.from_json(json.loads((out / "results.json").read_text())).models[0].attacks["finetune"].budgets
    assert [o.setting["source"] for o in rows.values()] == ["benign", "attacked"]
    assert all(o.setting["curve"] for o in rows.values())
    assert "attacked (donor saber" in (out / "summary.md").read_text()
    cached = list((tmp / "cli-cache" / "finetune").glob("*-attacked-*.json"))
    replies = {r for f in cached for _, r in json.loads(f.read_text()) if len(r) > 20}
    assert replies
    written = [f.read_text(errors="replace") for f in out.rglob("*") if f.is_file()] + [run.stdout, run.stderr]
    assert not [r for r in replies if any(r in text for text in written)]


def test_only_the_tuning_prompts_the_model_refuses_are_followed(donated):
    """A prompt the unattacked model already complies with cannot show safety lost; none refused: all of them."""
    t, _, _ = donated
    some = replace(t, scorer=Forced(t.scorer, "complied", frozenset(t.tuning[:3])))
    assert F.refused_tuning(some) == t.tuning[3:]
    none = replace(t, scorer=Forced(t.scorer, "complied", frozenset(t.tuning)))
    assert F.refused_tuning(none) == t.tuning
