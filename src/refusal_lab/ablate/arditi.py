"""Arditi et al.: one difference-of-means direction, chosen over layers and positions.

Directions are extracted from one part of the prompts and candidates are judged on a held-out
part, as in the paper: ablating the direction should lower the log-odds of the model's own
refusal openers on harmful prompts, adding it (at the layer it was read from) must not lower
them on harmless prompts, first-token KL on harmless prompts stays under a limit, and the layer
is not in the last share of the model. Every candidate is scored; the two harmless-prompt checks
run in order of score and stop at the first candidate that passes them (the same choice as
checking every candidate, relaxations included).

`select` is that selection over any candidate edits and any refusal score: the search reads it
through its generation-free proxy (search.proxy) instead of the log-odds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.ablate.edit import Ablation, edited
from refusal_lab.config import ArditiSettings
from refusal_lab.core.activations import capture
from refusal_lab.core.arch import Adapter
from refusal_lab.core.metrics import first_token_kl, last_logits, refusal_score
from refusal_lab.errors import UserError
from refusal_lab.probe.directions import unit

Log = Callable[[str], None]
SCREEN_KEEP = 0.25  # successive halving: the share of screened candidates scored on every prompt
SCREEN_MIN = 4  # ... and never fewer than this many
RefusalScore = Callable[[torch.Tensor], float]  # first-token logits [n, V] -> refusal left (lower: less)
Relax = Literal["score", "gentlest"]


@dataclass(frozen=True)
class ArditiChoice:
    layer: int
    position: int  # negative offset from the end of the prompt
    direction: torch.Tensor  # unit [H]
    ablation_score: float
    steering_score: float
    kl: float
    table: list[dict] = field(default_factory=list)
    relaxed: list[str] = field(default_factory=list)  # constraints that no candidate could meet
    extraction_prompts: int = 0
    selection_prompts: int = 0


@dataclass
class Candidate:
    """One direction under selection, with the edit that removes it; the checks fill in what they
    measure (None: not measured), so a candidate is mutable until the selection returns."""

    layer: int
    position: int  # negative offset from the end of the prompt
    ablations: list[Ablation]
    direction: torch.Tensor | None = None  # unit [H], where the edit is one direction
    raw: torch.Tensor | None = None  # the unnormalised difference of means: what the steering check adds
    ablation_score: float = math.nan  # refusal left on harmful prompts with the edit: lower is better
    screened: float = math.nan  # the same on the screening prompts only (successive halving), where screened
    kl: float | None = None
    steering_score: float | None = None

    def row(self) -> dict:
        """The candidate as a table row (what a record or study stores)."""
        return {
            "layer": self.layer,
            "position": self.position,
            "ablation_score": self.ablation_score,
            "screened": self.screened,
            "kl": self.kl,
            "steering_score": self.steering_score,
        }


@dataclass(frozen=True)
class Rules:
    """Arditi et al.'s constraints on a checked candidate."""

    max_kl: float
    depth_limit: int | None = None  # layers from here on are never chosen; None: any layer
    steering: bool = True  # adding the direction must not lower refusal on harmless prompts

    def passes(self, c: Candidate, drop: Sequence[str] = ()) -> bool:
        """Whether `c` meets the constraints, less those in `drop`. A value a kept rule reads fails it
        unmeasured; a measured value that is not finite fails every rule set (a broken edit)."""
        steering = c.steering_score if self.steering else 0.0
        if not math.isfinite(c.ablation_score) or any(v is not None and not math.isfinite(v) for v in (c.kl, steering)):
            return False
        rules = {
            "depth": self.depth_limit is None or c.layer < self.depth_limit,
            "steering": not self.steering or (c.steering_score is not None and c.steering_score >= 0),
            "kl": c.kl is not None and c.kl <= self.max_kl,
        }
        return all(ok for name, ok in rules.items() if name not in drop)


@dataclass(frozen=True)
class Judge:
    """The held-out prompts a selection measures candidates on, and the unedited model's harmless logits."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    adapter: Adapter
    harmful: Sequence[str]
    harmless: Sequence[str]
    base_harmless: torch.Tensor
    batch_size: int
    norm_preserving: bool = False  # candidates are measured as a norm-preserving export holds them

    def ablated(self, c: Candidate, prompts: Sequence[str]) -> torch.Tensor:
        """First-token logits with the candidate's edit in place (one prompt pass)."""
        with edited(self.adapter, c.ablations, self.norm_preserving):
            return last_logits(self.model, self.tok, list(prompts), self.batch_size)

    def kl(self, c: Candidate) -> None:
        c.kl = first_token_kl(self.base_harmless, self.ablated(c, self.harmless))

    def steering(self, c: Candidate, score: RefusalScore) -> None:
        """Refusal on harmless prompts with the candidate added where it was read (one pass)."""
        handle = steer(self.adapter, c.layer, c.raw)
        try:
            c.steering_score = score(last_logits(self.model, self.tok, list(self.harmless), self.batch_size))
        finally:
            handle.remove()


@dataclass(frozen=True)
class Selection:
    chosen: Candidate
    relaxed: list[str]  # constraints that no candidate could meet
    candidates: list[Candidate]  # every candidate, in the order given, as far as it was measured


def select(
    candidates: list[Candidate],
    judge: Judge,
    score: RefusalScore,
    rules: Rules,
    relax: Relax = "score",
    progress: str | None = None,
    screen: int = 0,
) -> Selection:
    """Arditi et al.'s direction selection: score every candidate's ablation on the harmful prompts by
    `score`, then check KL (and steering, if the rules ask) lazily in order of score.

    relax: where no candidate is within the KL limit, "score" takes the best-scored candidate meeting
    the other rules (as Arditi et al. relax), "gentlest" the least-KL one.
    screen: where > 0 and fewer than the harmful prompts, successive halving: every candidate is first
    scored on the first `screen` harmful prompts and only the best SCREEN_KEEP of them on all, so the
    checks (KL, steering) see only those; the others keep their screening score in `screened`.
    """
    survivors = candidates
    if 0 < screen < len(judge.harmful):
        for c in tqdm(candidates, desc=progress, unit="cand", disable=None if progress else True, leave=False):
            c.screened = score(judge.ablated(c, judge.harmful[:screen]))
        ranked = sorted((c for c in candidates if math.isfinite(c.screened)), key=lambda c: c.screened)
        survivors = ranked[: max(SCREEN_MIN, math.ceil(SCREEN_KEEP * len(candidates)))]
    for c in tqdm(survivors, desc=progress, unit="cand", disable=None if progress else True, leave=False):
        c.ablation_score = score(judge.ablated(c, judge.harmful))
    ok, relaxed = checked_in_order(candidates, judge.kl, lambda c: judge.steering(c, score), rules, relax)
    chosen = min(ok, key=lambda c: c.ablation_score)
    if chosen.kl is None:  # chosen with both checks relaxed: its drift is still recorded (one pass)
        judge.kl(chosen)
    return Selection(chosen, relaxed, candidates)


def log_odds(refusal_ids: Sequence[int]) -> RefusalScore:
    """Arditi et al.'s score: mean log-odds that the reply opens with one of the model's refusal tokens."""
    return lambda logits: float(refusal_score(logits, refusal_ids).mean())


def steer(adapter: Adapter, layer: int, vector: torch.Tensor):  # noqa: ANN201 - a hook handle
    """Add a vector to the residual stream where layer `layer` writes it (the point it was read from)."""

    def hook(_m: torch.nn.Module, _args: tuple, out: object) -> object:
        h = out[0] if isinstance(out, tuple) else out
        h = h + vector.to(h.device, h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return adapter.layers[layer].register_forward_hook(hook)


def split_for_selection(prompts: Sequence[str], n_select: int) -> tuple[list[str], list[str]]:
    """(extraction, selection): the last n_select prompts are held out, at most half of them."""
    n = min(n_select, len(prompts) // 2)
    if n < 1:
        raise UserError(f"Arditi selection needs at least 2 prompts per set, got {len(prompts)}", "add prompts")
    return list(prompts[:-n]), list(prompts[-n:])


def arditi(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    cfg: ArditiSettings,
    batch_size: int = 16,
    log: Log = lambda _m: None,
    norm_preserving: bool = False,
) -> ArditiChoice:
    """Pick the (layer, position) whose difference-of-means direction best removes refusal when ablated.

    norm_preserving: every candidate is scored and checked with the norm-preserving edit (on the weights).
    """
    if not refusal_ids:
        raise UserError("the model refused none of the harmful probe prompts", "check the prompts or the model")
    ext_h, val_h = split_for_selection(harmful, cfg.arditi_prompts)
    ext_b, val_b = split_for_selection(harmless, cfg.arditi_prompts)
    sh = capture(model, tok, adapter, ext_h, cfg.arditi_positions, batch_size, keep=0)
    sb = capture(model, tok, adapter, ext_b, cfg.arditi_positions, batch_size, keep=0)
    diffs = sh.mean - sb.mean  # [P, L, H]
    base = last_logits(model, tok, val_b, batch_size)
    judge = Judge(model, tok, adapter, val_h, val_b, base, batch_size, norm_preserving)
    n_pos, limit = diffs.shape[0], int(diffs.shape[1] * (1 - cfg.prune_last))
    candidates = []
    for pos in range(n_pos):
        for layer in range(limit):  # the last layers are never chosen: not scored either
            d = unit(diffs[pos, layer])
            candidates.append(Candidate(layer, pos - n_pos, [Ablation(d)], d, diffs[pos, layer]))
    rules = Rules(cfg.arditi_max_kl, limit)
    sel = select(candidates, judge, log_odds(refusal_ids), rules, "score", "arditi candidates", cfg.arditi_screen)
    r = sel.chosen
    choice = ArditiChoice(
        r.layer,
        r.position,
        r.direction,
        r.ablation_score,
        r.steering_score,
        r.kl,
        [c.row() for c in candidates],
        sel.relaxed,
        len(ext_h),
        len(val_h),
    )
    log(
        f"  arditi: layer {choice.layer}, position {choice.position}, refusal score {choice.ablation_score:.2f}, "
        f"KL {choice.kl:.4f}"
        + (f" (relaxed: {', '.join(sel.relaxed)})" if sel.relaxed else "")
        + f"; candidate passes: {passes(candidates)}"
    )
    return choice


def passes(candidates: list[Candidate]) -> str:
    """How many candidates each kind of prompt pass measured: what successive halving saves."""
    n = {
        "screen": sum(math.isfinite(c.screened) for c in candidates),
        "score": sum(math.isfinite(c.ablation_score) for c in candidates),
        "KL": sum(c.kl is not None for c in candidates),
        "steering": sum(c.steering_score is not None for c in candidates),
    }
    return ", ".join(f"{v} {k}" for k, v in n.items() if v)


def checked_in_order(
    candidates: list[Candidate],
    kl: Callable[[Candidate], None],
    steering: Callable[[Candidate], None],
    rules: Rules,
    relax: Relax = "score",
) -> tuple[list[Candidate], list[str]]:
    """The admissible candidates, running the harmless-prompt checks only as far as needed.

    The choice is the lowest ablation score among the candidates that pass every check, so the
    checks (one prompt pass each) run in order of score, the KL check only where the steering check
    passed (if the rules ask for one), and stop at the first candidate that passes both: the choice
    checking every candidate would make. Where none does, the KL limit is relaxed: with "score" the
    best-scored candidate that passed steering is taken (every one was steering-checked by then, so
    this needs no further pass; where none passed, `admissible` relaxes steering too); with
    "gentlest" the least-KL one meeting the other rules. Unchecked candidates keep None.
    """
    scored = [c for c in candidates if math.isfinite(c.ablation_score)]
    order = sorted(scored, key=lambda c: c.ablation_score)  # sorted() is stable: ties keep their given order
    for c in order:
        if rules.steering:
            steering(c)
            if not rules.passes(c, ("kl",)):
                continue
        kl(c)
        if rules.passes(c):
            return [c], []
    if relax == "gentlest":  # the least KL; ties go to the earlier candidate as given
        ok = [c for c in scored if rules.passes(c, ("kl",))]  # each one KL-checked above
        return ([min(ok, key=lambda c: c.kl)], ["kl"]) if ok else admissible(order, rules)
    ok = [c for c in order if rules.passes(c, ("kl",))]
    if ok:
        return [ok[0]], ["kl"]
    return admissible(order, rules)


def admissible(candidates: list[Candidate], rules: Rules) -> tuple[list[Candidate], list[str]]:
    """Candidates meeting the constraints in Arditi et al.'s order; where none does, the KL limit,
    then the steering check, is relaxed and the relaxation returned, so a method that falls
    short still returns its best candidate."""
    for drop in ([], ["kl"], ["kl", "steering"]):
        ok = [c for c in candidates if rules.passes(c, drop)]
        if ok:
            return ok, drop
    raise UserError("no (layer, position) candidate is usable", "check the prompt sets and the model")
