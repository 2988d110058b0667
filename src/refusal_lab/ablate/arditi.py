"""Arditi et al.: one difference-of-means direction, chosen over layers and positions.

Directions are extracted from one part of the prompts and candidates are judged on a held-out
part, as in the paper: ablating the direction should lower the log-odds of the model's own
refusal openers on harmful prompts, adding it (at the layer it was read from) must not lower
them on harmless prompts, first-token KL on harmless prompts stays under a limit, and the layer
is not in the last share of the model. Every candidate is scored; the two harmless-prompt checks
run in order of score and stop at the first candidate that passes them (the same choice as
checking every candidate, relaxations included).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.config import ArditiSettings
from refusal_lab.core.activations import capture
from refusal_lab.core.arch import Adapter
from refusal_lab.errors import UserError
from refusal_lab.evaluate.metrics import first_token_kl, last_logits, refusal_score
from refusal_lab.probe.directions import unit

Log = Callable[[str], None]


@dataclass
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
) -> ArditiChoice:
    """Pick the (layer, position) whose difference-of-means direction best removes refusal when ablated."""
    if not refusal_ids:
        raise UserError("the model refused none of the harmful probe prompts", "check the prompts or the model")
    ext_h, val_h = split_for_selection(harmful, cfg.arditi_prompts)
    ext_b, val_b = split_for_selection(harmless, cfg.arditi_prompts)
    sh = capture(model, tok, adapter, ext_h, cfg.arditi_positions, batch_size, keep=0)
    sb = capture(model, tok, adapter, ext_b, cfg.arditi_positions, batch_size, keep=0)
    diffs = sh.mean - sb.mean  # [P, L, H]
    base_b = last_logits(model, tok, val_b, batch_size)
    n_pos, n_layers = diffs.shape[0], diffs.shape[1]
    limit = int(n_layers * (1 - cfg.prune_last))
    rows = []
    with tqdm(total=n_pos * limit, desc="arditi candidates", unit="cand", disable=None, leave=False) as bar:
        for pos in range(n_pos):
            for layer in range(limit):  # the last layers are never chosen: not scored either
                d = unit(diffs[pos, layer])
                with hooked(adapter, [Ablation(d)]):
                    abl = float(refusal_score(last_logits(model, tok, val_h, batch_size), refusal_ids).mean())
                rows.append(
                    {
                        "layer": layer,
                        "position": pos - n_pos,
                        "ablation_score": abl,
                        "kl": None,
                        "steering_score": None,
                        "direction": d,
                        "raw": diffs[pos, layer],
                    }
                )
                bar.update()
    ok, relaxed = _checked_in_order(
        rows,
        lambda r: _kl_check(model, tok, r, val_b, base_b, adapter, batch_size),
        lambda r: _steering_check(model, tok, adapter, r, val_b, refusal_ids, batch_size),
        limit,
        cfg.arditi_max_kl,
    )
    r = min(ok, key=lambda r: r["ablation_score"])
    table = [{k: v for k, v in row.items() if k not in ("direction", "raw")} for row in rows]
    choice = ArditiChoice(
        r["layer"],
        r["position"],
        r["direction"],
        r["ablation_score"],
        r["steering_score"],
        r["kl"],
        table,
        relaxed,
        len(ext_h),
        len(val_h),
    )
    log(
        f"  arditi: layer {choice.layer}, position {choice.position}, refusal score {choice.ablation_score:.2f}, "
        f"KL {choice.kl:.4f}" + (f" (relaxed: {', '.join(relaxed)})" if relaxed else "")
    )
    return choice


def _kl_check(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    row: dict,
    val_b: Sequence[str],
    base_b: torch.Tensor,
    adapter: Adapter,
    batch_size: int,
) -> None:
    """First-token KL on harmless prompts with the candidate ablated (one prompt pass)."""
    with hooked(adapter, [Ablation(row["direction"])]):
        row["kl"] = first_token_kl(base_b, last_logits(model, tok, val_b, batch_size))


def _steering_check(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    row: dict,
    val_b: Sequence[str],
    refusal_ids: Sequence[int],
    batch_size: int,
) -> None:
    """Refusal score on harmless prompts with the candidate added where it was read (one pass)."""
    handle = steer(adapter, row["layer"], row["raw"])
    try:
        row["steering_score"] = float(refusal_score(last_logits(model, tok, val_b, batch_size), refusal_ids).mean())
    finally:
        handle.remove()


def _checked_in_order(
    rows: list[dict],
    kl: Callable[[dict], None],
    steering: Callable[[dict], None],
    depth_limit: int,
    max_kl: float,
) -> tuple[list[dict], list[str]]:
    """The admissible candidates, running the harmless-prompt checks only as far as needed.

    The choice is the lowest ablation score among the candidates that pass every check, so the
    checks (one prompt pass each) run in order of score, the steering check only where KL passed,
    and stop at the first candidate that passes both: the choice checking every candidate would
    make. Where none passes the KL limit, it is relaxed as in _admissible: the steering checks
    continue in order of score to the first pass, and only where none passes are all of them run.
    Unchecked rows keep None.
    """
    order = [r for r in sorted(rows, key=lambda r: r["ablation_score"]) if math.isfinite(r["ablation_score"])]
    for r in order:  # sorted() is stable: ties keep their scan order
        kl(r)
        if math.isfinite(r["kl"]) and r["kl"] <= max_kl:
            steering(r)
            if _passes(r, depth_limit, max_kl, ()):
                return [r], []
    for r in order:
        if r["steering_score"] is None:
            steering(r)
        if _passes(r, depth_limit, max_kl, ("kl",)):
            return [r], ["kl"]
    return _admissible(order, depth_limit, max_kl)


def _passes(r: dict, depth_limit: int, max_kl: float, drop: Sequence[str]) -> bool:
    """Whether a checked candidate meets Arditi et al.'s constraints, less those in `drop`."""
    if not all(v is not None and math.isfinite(v) for v in (r["ablation_score"], r["kl"], r["steering_score"])):
        return False
    rules = {"depth": r["layer"] < depth_limit, "steering": r["steering_score"] >= 0, "kl": r["kl"] <= max_kl}
    return all(ok for name, ok in rules.items() if name not in drop)


def _admissible(rows: list[dict], depth_limit: int, max_kl: float) -> tuple[list[dict], list[str]]:
    """Candidates meeting the constraints in Arditi et al.'s order; where none does, the KL limit,
    then the steering check, is relaxed and the relaxation returned, so a method that falls
    short still returns its best candidate."""
    for drop in ([], ["kl"], ["kl", "steering"]):
        ok = [r for r in rows if _passes(r, depth_limit, max_kl, drop)]
        if ok:
            return ok, drop
    raise UserError("no (layer, position) candidate is usable", "check the prompt sets and the model")
