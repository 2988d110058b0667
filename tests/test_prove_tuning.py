"""How prove tunes an attack: the proxy decides which proposals generate, never which one is chosen."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

from refusal_lab.prove.battery import Donor, Proposal, Target, run_attack
from refusal_lab.prove.results import AttackRun, Counts, Measures
from refusal_lab.search.proxy import Proxy


@dataclass
class Fake:
    """A target whose proposals are (KL, proxy's predicted refusals, tuning complied, tuning refused)."""

    table: dict[str, tuple[float, int, int, int]]
    proxy: Proxy = field(default_factory=lambda: Proxy((1,), 0.1))
    tuning: list[str] = field(default_factory=lambda: [f"t{i}" for i in range(16)])
    held_out: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(harmful=[SimpleNamespace(prompt="h")]))
    active: str | None = None
    generated: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    s: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(prove=SimpleNamespace(budget_kl=0.1)))
    donor: Donor | None = None
    seed: int = 0

    proxied = Target.proxied

    def log(self, _m: str) -> None:
        pass

    def kl(self) -> float:
        return self.table[self.active][0]

    def predicted_refused(self, prompts: list[str]) -> int:
        return self.table[self.active][1]

    def measure(self, edit, prompts: list[str]) -> Counts:
        """Tuning replies: the table's counts."""
        with edit():
            active = self.active
        assert self.active is None and prompts is self.tuning  # labelled outside the edit
        self.generated.append(active)
        _, _, complied, refused = self.table[active]
        return Counts(refused, complied, 16 - complied - refused)

    def measure_held_out(self, edit, attack: str, keys: list[str], where: dict) -> Counts:
        with edit():
            active = self.active
        assert self.active is None  # labelled outside the edit
        self.held.append(active)
        return Counts(0, 1, 0)

    def record(self, attack, tried, outcomes, seconds) -> AttackRun:
        return AttackRun(attack.name, attack.threat, tuple(tried), outcomes, seconds, 0, 16, 16)


@dataclass
class Listed:
    name: str = "listed"
    threat: str = "directional"

    def proposals(self, t: Fake):
        for name in t.table:

            @contextmanager
            def edit(name: str = name):
                t.active = name
                try:
                    yield
                finally:
                    t.active = None

            yield Proposal({"name": name}, edit)


TABLE = {
    "weak": (0.02, 16, 0, 16),  # the proxy sees every tuning prompt refused
    "strong": (0.05, 2, 13, 3),
    "loose": (0.3, 10, 5, 11),  # within 0.5 only, and cannot beat 13 on the proxy's evidence
    "wild": (3.0, 0, 16, 0),  # over every budget: never read, never generated
}


def test_only_proposals_that_can_still_win_generate_and_each_choice_is_measured_once():
    t = Fake(dict(TABLE))
    run = run_attack(Listed(), t, (0.1, 0.5))
    assert t.generated == ["strong"]
    assert t.held == ["strong"]  # both budgets chose it: one held-out measurement
    assert run.budgets["0.1"].setting == run.budgets["0.5"].setting == {"name": "strong"}
    tried = {x.setting["name"]: x for x in run.tried}
    assert tried["weak"].predicted_refused == 16 and tried["weak"].tuning_complied is None
    assert tried["wild"].predicted_refused is None and tried["wild"].tuning_complied is None
    assert tried["strong"].over_predicted == -1


def test_without_the_proxy_every_proposal_within_the_loosest_budget_generates():
    t = Fake(dict(TABLE), proxy=Proxy((1,), None))
    run = run_attack(Listed(), t, (0.1, 0.5))
    assert sorted(t.generated) == ["loose", "strong", "weak"]
    assert run.budgets["0.1"].setting == {"name": "strong"}


def test_a_model_without_refusal_openers_has_no_proxy_and_every_proposal_generates():
    t = Fake(dict(TABLE), proxy=Proxy((), 0.1))
    run = run_attack(Listed(), t, (0.1, 0.5))
    assert sorted(t.generated) == ["loose", "strong", "weak"]
    assert all(x.predicted_refused is None for x in run.tried)


def test_a_proxy_that_over_predicts_widens_its_own_margin():
    """'strong' was predicted 12 refusals but only 1 was counted: the proxy is trusted less, so 'other'
    (predicted 14 refused, i.e. at most 2 + margin complied) is generated and turns out to win."""
    table = {"strong": (0.05, 12, 13, 1), "other": (0.06, 14, 15, 1)}
    t = Fake(table)
    run = run_attack(Listed(), t, (0.1,))
    assert t.generated == ["strong", "other"]
    assert run.budgets["0.1"].setting == {"name": "other"}


def test_extra_measures_are_asked_once_with_every_budget_the_setting_serves():
    asked: list[tuple[tuple[float, ...], Counts]] = []

    def extra(served: tuple[float, ...], held: Counts, _edit) -> Measures:
        asked.append((served, held))
        return Measures({"mc": 1.0})

    run_attack(Listed(), Fake(dict(TABLE)), (0.1, 0.5), extra)
    assert asked == [((0.1, 0.5), Counts(0, 1, 0))]


def test_replies_are_generated_inside_the_edit_and_labelled_outside_it():
    """The coherence scorer reads the unattacked model's likelihoods: labelling inside a hook edit would
    score an attacked model's replies against the attacked model itself."""
    from refusal_lab.core.reasoning import Reply

    inside = [False]

    @contextmanager
    def edit():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    class Probe:
        name = "probe"

        def labels(self, prompts: list[str], replies: list[str]) -> list[str]:
            return ["broken" if inside[0] else "complied" for _ in replies]

    t = Target(None, None, [], None, None, Probe(), None, lambda _m: None)  # type: ignore[arg-type]
    made: list[bool] = []
    t.replies = lambda prompts: made.append(inside[0]) or [Reply("a reply") for _ in prompts]  # type: ignore[method-assign]
    assert t.measure(edit, ["p", "q"]) == Counts(0, 2, 0) and made == [True]


def test_a_budget_no_proposal_fits_is_reported_with_the_least_kl_and_generates_nothing():
    t = Fake({"a": (0.3, 16, 0, 16), "b": (0.2, 10, 5, 11)})
    run = run_attack(Listed(), t, (0.1,))
    assert not run.budgets["0.1"].fits and run.budgets["0.1"].min_kl == 0.2
    assert t.generated == [] and t.held == []


def test_replies_are_decoded_in_generation_batches_and_logits_read_in_forward_batches(monkeypatch):
    """Decoding gains from a larger batch than a forward pass: each uses its own setting."""
    import torch

    import refusal_lab.prove.battery as battery
    from refusal_lab.config import Settings

    seen: dict[str, int] = {}

    def replies(_model, _tok, prompts, _n, batch_size, **_kw):
        seen["generate"] = batch_size
        return []

    def logits(_model, _tok, prompts, batch_size):
        seen["read"] = batch_size
        return torch.zeros(len(prompts), 3)

    monkeypatch.setattr(battery, "generate_replies", replies)
    monkeypatch.setattr(battery, "last_logits", logits)
    s = Settings(batch_size=3, generation_batch_size=7)
    loaded = SimpleNamespace(model=None, tokenizer=None)
    held = SimpleNamespace(harmless=[SimpleNamespace(prompt="p")])
    t = Target(loaded, None, [], held, torch.zeros(1, 3), None, s, lambda _m: None)  # type: ignore[arg-type]
    t.replies(["a", "b"])
    t.kl()
    assert seen == {"generate": 7, "read": 3}
