"""The battery's common ground: a target, an attack's proposals, and how a proposal is measured.

An attack proposes settings (weakest to strongest, or phase after phase); each proposal is an edit
that is active inside a `with` block, so the model under attack is never copied. Every proposal's
drift is measured first: first-token KL(model || attacked) on held-out harmless prompts. Proposals
within the loosest budget are then read by a generation-free proxy on the *tuning* prompts (a slice
of the probe split): the prompts whose greedy first reply token is one of the model's own refusal
openers. Only proposals that can still win a budget on that evidence (allowing the proxy its margin)
generate replies to the tuning prompts; for each budget, the measured proposal that made the most
tuning prompts comply is measured once on the held-out harmful prompts, and that is the attack's
result at that budget. So settings are chosen on data the result is not reported on, and never on
the proxy alone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log, write_text_atomic
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.metrics import Scorer, first_token_kl, last_logits, settled_by
from refusal_lab.core.model import Loaded
from refusal_lab.core.reasoning import Reply
from refusal_lab.core.scoring import label_replies
from refusal_lab.core.sources import EvalSets, PromptSets
from refusal_lab.prove.results import AttackRun, Counts, Measures, Outcome, Tried
from refusal_lab.search.proxy import Proxy

Edit = Callable[[], AbstractContextManager[Any]]
Extra = Callable[[tuple[float, ...], Counts, Edit], Measures]  # what else a setting chosen for these budgets costs


@dataclass(frozen=True)
class Donor:
    """An edit whose compliant replies are the fine-tuning attack's attacked data, and how it was chosen.

    `key` is what the battery's choice maximised (tuning complied, -refused, -KL), so a later directional
    attack replaces the donor only with a stronger choice; None where no battery choice made it (a fallback).
    """

    what: str
    kl: float
    edit: Edit
    key: tuple[int, int, float] | None = None


def held_out_replies(loaded: Loaded, scorer: Scorer, s: Settings, prompts: list[str], opener: str = "") -> list[Reply]:
    """Greedy replies of the model as it is now (inside an edit: the attacked model), as every count of a
    proof is made of them; where refusal words decide the label, a reply stops once one appears."""
    n, bs, settled = s.prove.max_new_tokens, s.generation_batch_size, settled_by(scorer)
    return generate_replies(loaded.model, loaded.tokenizer, prompts, n, bs, settled=settled, opener=opener)


def write_replies(
    path: Path, prompts: list[str], replies: list[Reply], labels: list[str], where: dict[str, Any]
) -> None:
    """Replies as they were counted, one JSON row each (prompt, response, label and where they came from):
    the form `refusal-lab label` reads, to read them or to relabel them with another scorer."""
    rows = [
        {"prompt": p, "response": r.answer, **({"reasoning": r.reasoning} if r.reasoning else {}), "label": x, **where}
        for p, r, x in zip(prompts, replies, labels, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def replies_file(folder: Path, attack: str, seed: int, key: str) -> Path:
    """Where one held-out measurement's replies are kept: `key` is the budget ("kl0.1") or the row ("row2")."""
    return folder / f"{attack}-seed{seed}-{key}.jsonl"


@dataclass
class Target:
    """One model under attack and what every attack is measured against."""

    loaded: Loaded
    extraction: PromptSets  # directions and training data come from here
    tuning: list[str]  # harmful prompts that choose an attack's setting (never reported on)
    held_out: EvalSets  # what results are reported on: harmful, harmless (KL), over-refusal, capability
    reference_logits: torch.Tensor  # the unattacked model's first-token logits on held_out.harmless
    scorer: Scorer
    s: Settings
    log: Log
    seed: int = 0
    capability_vectors: torch.Tensor | None = None  # the unattacked model's, for SABER's entanglement
    tuning_refused: int = 0  # refusals of the unattacked model on the tuning prompts
    opener: str = ""  # what every reply begins with (the prefill attack sets it inside its proposals)
    proxy: Proxy = field(default_factory=Proxy)  # the model's refusal openers and the margin (None: no proxy)
    donor: Donor | None = None  # the strongest directional choice at budget_kl
    base_vectors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # filled on first use
    saved: Path | None = None  # with --save-replies: every held-out measurement's replies are written here

    def replies(self, prompts: list[str]) -> list[Reply]:
        return held_out_replies(self.loaded, self.scorer, self.s, prompts, self.opener)

    def label(self, prompts: list[str], replies: list[Reply]) -> Counts:
        """Replies labelled outside any edit: the coherence scorer reads the unattacked model's likelihoods."""
        return Counts.of(label_replies(self.scorer, prompts, replies))

    def measure(self, edit: Edit, prompts: list[str]) -> Counts:
        """Replies generated inside the edit, labelled after it."""
        with edit():
            replies = self.replies(prompts)
        return self.label(prompts, replies)

    def measure_held_out(self, edit: Edit, attack: str, keys: list[str], where: dict[str, Any]) -> Counts:
        """The held-out harmful prompts measured inside the edit, labelled after it (`counted`)."""
        prompts = [p.prompt for p in self.held_out.harmful]
        with edit():
            replies = self.replies(prompts)
        return self.counted(prompts, replies, attack, keys, where)

    def counted(
        self, prompts: list[str], replies: list[Reply], attack: str, keys: list[str], where: dict[str, Any]
    ) -> Counts:
        """Held-out replies labelled; with `saved`, written once per key (the budgets the setting serves, or
        its row), so every count of a proof can be read back or relabelled."""
        labels = label_replies(self.scorer, prompts, replies)
        for key in keys if self.saved is not None else []:
            write_replies(replies_file(self.saved, attack, self.seed, key), prompts, replies, labels, where)
        return Counts.of(labels)

    def kl(self) -> float:
        m = self.loaded
        logits = last_logits(m.model, m.tokenizer, [p.prompt for p in self.held_out.harmless], self.s.batch_size)
        return first_token_kl(self.reference_logits, logits)

    @property
    def refusal_ids(self) -> tuple[int, ...]:
        return self.proxy.refusal_ids

    @property
    def proxied(self) -> bool:
        """Whether proposals are read by the proxy before they generate."""
        return self.proxy.margin is not None and bool(self.proxy.refusal_ids)

    def predicted_refused(self, prompts: list[str]) -> int | None:
        """Prompts whose greedy first reply token is one of the model's refusal openers (one prompt pass)."""
        m = self.loaded
        return self.proxy.refusals(last_logits(m.model, m.tokenizer, prompts, self.s.batch_size).argmax(-1))

    def record(self, attack: Attack, tried: list[Tried], outcomes: dict[str, Outcome], seconds: float) -> AttackRun:
        """An attack's finished record on this target."""
        n, refused = len(self.tuning), self.tuning_refused
        return AttackRun(attack.name, attack.threat, tuple(tried), outcomes, seconds, self.seed, n, refused)


@dataclass(frozen=True)
class Measured:
    """What a proposal's maker already measured on the target's KL and tuning prompts, the battery's
    way (the search's trials): it is not measured again."""

    kl: float
    predicted: int | None  # the proxy's refused tuning prompts (None: read without one)
    counts: Counts  # its tuning replies' labels


@dataclass
class Proposal:
    """One setting of an attack: what was tried (JSON) and the edit that applies it (re-enterable)."""

    setting: dict[str, Any]
    edit: Edit
    measured: Measured | None = None


class Attack(Protocol):
    """An attack of the battery. `threat`: 'directional' attacks count for the worst case."""

    name: str
    threat: str

    def proposals(self, t: Target) -> Iterator[Proposal]: ...


@dataclass
class _Seen:
    """A proposal during tuning: its drift, the proxy's prediction and, once generated, its tuning counts."""

    prop: Proposal
    kl: float
    predicted: int | None = None
    counts: Counts | None = None

    def tried(self) -> Tried:
        c = self.counts
        return Tried(self.prop.setting, self.kl, c and c.complied, c and c.refused, self.predicted)

    def key(self) -> tuple[int, int, float]:
        """What a budget's choice maximises: tuning compliance, then fewer refusals, then less drift."""
        assert self.counts is not None
        return self.counts.complied, -self.counts.refused, -self.kl


def _slack(seen: list[_Seen], n: int, proxy: Proxy) -> int:
    """Prompts the proxy may over-predict refusals by: its fixed margin, or more where it was seen to.

    Unlike the search's learned margin it never narrows: one proposal per budget is chosen, and a
    wrongly pruned one would change the attack's result, not one point of a front."""
    over = [s.predicted - s.counts.refused for s in seen if s.counts is not None and s.predicted is not None]
    return max(math.ceil(proxy.fixed_slack(n)), *over, 0)


def _tune(seen: list[_Seen], t: Target, budgets: tuple[float, ...], name: str) -> None:
    """Generate tuning replies for the proposals that can still win a budget, tightest budget first.

    With the proxy, a proposal can still win when the compliance it allows (tuning prompts it does not
    predict refused, plus the slack) reaches the best measured so far; without it, every proposal
    within the loosest budget generates. Measured counts are shared by every budget."""
    n = len(t.tuning)

    def measure(s: _Seen) -> None:
        s.counts = t.measure(s.prop.edit, t.tuning)
        left = "" if s.predicted is None else f" (proxy: {n - s.predicted} not refused)"
        t.log(f"  {name} {_brief(s.prop.setting)}: tuning complied {s.counts.complied}/{n}{left}")

    for budget in sorted(budgets):
        fits = [s for s in seen if s.kl <= budget]
        while True:
            done = [s for s in fits if s.counts is not None]
            best = max((s.key() for s in done), default=None)
            left = [s for s in fits if s.counts is None]
            if t.proxied and best is not None:
                slack = _slack(seen, n, t.proxy)
                left = [s for s in left if n - (s.predicted or 0) + slack >= best[0]]
            if not left:
                break
            measure(max(left, key=lambda s: (n - (s.predicted or 0), -s.kl)) if t.proxied else left[0])


def run_attack(attack: Attack, t: Target, budgets: tuple[float, ...], extra: Extra | None = None) -> AttackRun:
    """Try every proposal (KL first, then the proxy and, where it can still win, tuning replies); measure
    each budget's best on held-out prompts, once per distinct proposal.

    `extra(budgets, held, edit)` measures what else a setting chosen for those budgets costs (capability,
    ...), given its held-out counts; it enters the edit itself, to label outside it.
    """
    start = time.perf_counter()
    loosest = max(budgets)
    seen: list[_Seen] = []
    for prop in attack.proposals(t):
        if (known := prop.measured) is not None:
            s = _Seen(prop, known.kl, known.predicted if t.proxied else None, known.counts)
            seen.append(s)
            n = len(t.tuning)
            t.log(f"  {attack.name} {_brief(prop.setting)}: KL {s.kl:.4f}, tuning complied {known.counts.complied}/{n}")
            continue
        with prop.edit():
            s = _Seen(prop, t.kl())
            if s.kl <= loosest and t.proxied:
                s.predicted = t.predicted_refused(t.tuning)
        seen.append(s)
        got = " (over every budget)" if s.kl > loosest else ""
        if s.predicted is not None:
            got = f", proxy: {len(t.tuning) - s.predicted}/{len(t.tuning)} tuning prompts not refused"
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {s.kl:.4f}{got}")
    _tune(seen, t, budgets, attack.name)
    chosen: dict[float, _Seen | None] = {}
    for budget in budgets:
        fits = [s for s in seen if s.counts is not None and s.kl <= budget]
        chosen[budget] = max(fits, key=_Seen.key) if fits else None
    held_by: dict[int, tuple[Counts, Measures]] = {}
    for s in {id(s): s for s in chosen.values() if s is not None}.values():  # one measurement per proposal
        served = tuple(b for b, c in chosen.items() if c is s)
        began = time.perf_counter()
        where = {"attack": attack.name, "seed": t.seed, "setting": s.prop.setting, "kl": s.kl}
        held = t.measure_held_out(s.prop.edit, attack.name, [f"kl{b}" for b in served], where)
        more = extra(served, held, s.prop.edit) if extra else Measures()
        held_by[id(s)] = held, more
        within = ", ".join(map(str, served))
        t.log(
            f"  {attack.name} within KL {within}: {_brief(s.prop.setting)}, held-out complied "
            f"{held.complied}/{held.n} ({time.perf_counter() - began:.0f} s)"
        )
    top = chosen.get(t.s.prove.budget_kl)  # the fine-tuning attack's donor: the strongest headline choice
    if attack.threat == "directional" and top is not None and _stronger(top.key(), t.donor):
        t.donor = Donor(f"{attack.name} {_brief(top.prop.setting)}", top.kl, top.prop.edit, top.key())
    outcomes: dict[str, Outcome] = {}
    for budget, s in chosen.items():
        if s is None:
            outcomes[str(budget)] = Outcome(False, min_kl=min((x.kl for x in seen), default=None))
        else:
            outcomes[str(budget)] = Outcome(True, s.prop.setting, s.kl, *held_by[id(s)])
    return t.record(attack, [s.tried() for s in seen], outcomes, time.perf_counter() - start)


def _stronger(key: tuple[int, int, float], donor: Donor | None) -> bool:
    """Whether a choice of this key should replace the donor (one no battery choice made always is)."""
    return donor is None or donor.key is None or key > donor.key


def _brief(setting: dict[str, Any]) -> str:
    shown = {k: v for k, v in setting.items() if not isinstance(v, list | dict)}
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def run_rows(attack: Attack, t: Target, extra: Extra | None = None, weights: bool = True) -> AttackRun:
    """Every proposal measured on the held-out prompts, no budget: for threat models reported row by row.

    `weights=False`: the proposals leave the weights alone (a prefill), so the drift is 0 without measuring.
    """
    start = time.perf_counter()
    tried: list[Tried] = []
    outcomes: dict[str, Outcome] = {}
    for i, prop in enumerate(attack.proposals(t)):
        prompts = [p.prompt for p in t.held_out.harmful]
        with prop.edit():  # drift and replies under one edit, labels after it
            kl = t.kl() if weights else 0.0
            replies = t.replies(prompts)
        where = {"attack": attack.name, "seed": t.seed, "setting": prop.setting, "kl": kl}
        held = t.counted(prompts, replies, attack.name, [f"row{i}"], where)
        more = extra((), held, prop.edit) if extra else Measures()
        tried.append(Tried(prop.setting, kl, None, None))
        outcomes[f"row{i}"] = Outcome(True, prop.setting, kl, held, more)
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {kl:.4f}, complied {held.complied}/{held.n}")
    return t.record(attack, tried, outcomes, time.perf_counter() - start)
