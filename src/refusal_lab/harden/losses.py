"""The stage-2 objective: SFT on the replies plus the terms switched on in the settings.

- sft: next-token loss on the assistant tokens;
- retain: KL(frozen base || model) over the harmless rows' reply tokens (the adapter switched off
  gives the base);
- aware: the SFT loss again with the refusal subspace removed as an attacker would (robust.py),
  on the harmful rows or on every row (--aware-harmless);
- invariance: the first reply token's distribution kept equal with and without that removal on the
  harmful rows, with a hinge that keeps the refusal likely.

Each term is a mean over its own rows or tokens. A process that trains on a share of a batch
weighs each term by its share of the batch's count (`Counts`), so the processes' averaged
gradients are the gradient of the whole batch, however unevenly its tokens split. A partial
ablation's random positions stay per share.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refusal_lab.config import HardenSettings
from refusal_lab.core.arch import Adapter
from refusal_lab.core.batches import right_padded
from refusal_lab.core.generate import tail_forward
from refusal_lab.harden.data import Encoded
from refusal_lab.harden.robust import (
    RefusalSubspace,
    ablating,
    first_reply_logits,
    invariance_loss,
)


def first_predicting(labels: torch.Tensor) -> int:
    """The first position whose logits predict a labelled token, over the batch (0 when none is labelled).

    Prompt tokens carry no loss, so the vocabulary projection before this position is skipped: for
    a 150k-word vocabulary that is about a quarter of a small model's compute and most of a step's
    memory.
    """
    rows = (labels != -100).any(1)
    if not rows.any():
        return 0
    return max(int((labels[rows] != -100).int().argmax(1).min()) - 1, 0)


def tail_pass(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], start: int, **kw: Any
) -> tuple[Any, torch.Tensor]:
    """A forward pass and its logits from position `start` on ([batch, T - start, vocab])."""
    keep = batch["input_ids"].shape[1] - start
    out = tail_forward(model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    return out, out.logits[:, -keep:]


def reply_loss(logits: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens from logits that begin at `start` (what the
    model's own causal-LM loss gives from logits at every position)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, start + 1 :].flatten(), ignore_index=-100
    )


def replies_survive(rows: Sequence[Encoded]) -> list[bool]:
    """Whether each row's last reply kept its first token after truncation (the invariance term reads it)."""
    return [r.prompt_end < len(r.labels) and r.labels[r.prompt_end] != -100 for r in rows]


@dataclass(frozen=True)
class Counts:
    """What each term averages over in a batch: labelled tokens (all, harmless, harmful rows') and rows."""

    tokens: int
    harmless_tokens: int
    harmful_tokens: int
    harmful_rows: int
    invariance_rows: int  # harmful rows whose first reply token survived truncation

    @classmethod
    def of(cls, rows: Sequence[Encoded]) -> Counts:
        def labelled(r: Encoded) -> int:  # positions 1.. (no logits predict position 0)
            return sum(x != -100 for x in r.labels[1:])

        harmful = [r.kind == "harmful" for r in rows]
        return cls(
            tokens=sum(labelled(r) for r in rows),
            harmless_tokens=sum(labelled(r) for r, h in zip(rows, harmful, strict=True) if not h),
            harmful_tokens=sum(labelled(r) for r, h in zip(rows, harmful, strict=True) if h),
            harmful_rows=sum(harmful),
            invariance_rows=sum(h and ok for h, ok in zip(harmful, replies_survive(rows), strict=True)),
        )


def share(part: int, whole: int, processes: int) -> float:
    """The weight of a mean over `part` items of a batch of `whole`, when `processes` gradients are averaged."""
    return part / whole * processes if whole else 0.0


def scaled(term: torch.Tensor, weight: float) -> torch.Tensor:
    return term if weight == 1.0 else term * weight


@dataclass(frozen=True)
class Stage2Batch:
    """A right-padded stage-2 batch on the device, with where each prompt ends and which rows are harmful."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: what the model reads
    prompt_end: torch.Tensor
    harmful: torch.Tensor  # bool, one per row
    survives: torch.Tensor  # bool: the row's first reply token survived truncation

    @classmethod
    def of(cls, rows: Sequence[Encoded], pad: int, device: torch.device) -> Stage2Batch:
        padded = right_padded([(r.ids, r.labels) for r in rows], pad)
        return cls(
            {k: v.to(device) for k, v in padded.items()},
            torch.tensor([r.prompt_end for r in rows], device=device),
            torch.tensor([r.kind == "harmful" for r in rows], device=device),
            torch.tensor(replies_survive(rows), device=device),
        )

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def rows(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[keep] for k, v in self.tensors.items()}


def ablation(
    adapter: Adapter,
    sub: RefusalSubspace,
    ids: torch.Tensor,
    rng: random.Random | None,
    resolve: Callable[[torch.nn.Module], torch.nn.Module],
) -> Any:
    """The subspace removed as an attacker would from the rows `ids`: everywhere (no `rng`), or at layers
    and positions drawn from `rng`."""
    if rng is None:
        return ablating(adapter, sub, None, None, use_global=True, resolve=resolve)
    n = adapter.num_layers
    layers = {i for i in range(n) if rng.random() < 0.5} or {rng.randrange(n)}
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    positions = (torch.rand(ids.shape, generator=g) < 0.5).to(ids.device)
    return ablating(adapter, sub, layers, positions, use_global=rng.random() < 0.5, resolve=resolve)


class Stage2Loss:
    """The stage-2 loss of a peft model (`model`, whose base `adapter` describes) for these settings."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, cfg: HardenSettings, pad: int) -> None:
        self.model, self.adapter, self.cfg, self.pad = model, adapter, cfg, pad
        self.wrappers = {id(m.base_layer): m for m in model.modules() if hasattr(m, "base_layer")}

    def needs_subspace(self) -> bool:
        return self.cfg.ablation_aware or self.cfg.invariance > 0

    def writer_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """The LoRA layer that wraps a writer, so the adapter's own contribution is ablated too."""
        return self.wrappers.get(id(module), module)

    def __call__(
        self,
        rows: Sequence[Encoded],
        subspace: RefusalSubspace | None,
        rng: random.Random,
        whole: Counts | None = None,
        processes: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, each term's value) on `rows`, a share of a batch whose counts are `whole` (default: all of it)."""
        cfg = self.cfg
        b = Stage2Batch.of(rows, self.pad, next(self.model.parameters()).device)
        mine = Counts.of(rows)
        whole = whole or mine
        start = first_predicting(b.labels)
        _, logits = tail_pass(self.model, b.tensors, start)
        sft = reply_loss(logits, b.labels, start)
        loss, parts = scaled(sft, share(mine.tokens, whole.tokens, processes)), {"sft": sft.item()}
        if cfg.retain > 0 and (~b.harmful).any():
            kl = self.retain_kl(b, logits, start)
            weight = share(mine.harmless_tokens, whole.harmless_tokens, processes)
            loss, parts["retain"] = loss + cfg.retain * scaled(kl, weight), kl.item()
        if whole.harmful_rows and self.needs_subspace():  # a batch with refusals: every share takes part
            assert subspace is not None, "the trainer estimates the subspace before a step that needs it"
            if cfg.ablation_aware and (cfg.aware_harmless or b.harmful.any()):
                aware, rows_aware = self.aware(b, subspace, rng)
                part = mine.tokens if cfg.aware_harmless else mine.harmful_tokens
                total = whole.tokens if cfg.aware_harmless else whole.harmful_tokens
                loss, parts["aware"] = loss + scaled(aware, share(part, total, processes)), aware.item()
                parts["aware_rows"], parts["harmful_rows"] = rows_aware, int(b.harmful.sum())
            if cfg.invariance > 0 and (b.harmful & b.survives).any():
                inv = self.invariance(b, logits, start, subspace)
                weight = share(mine.invariance_rows, whole.invariance_rows, processes)
                loss, parts["invariance"] = loss + cfg.invariance * scaled(inv, weight), inv.item()
        return loss, parts

    def retain_kl(self, b: Stage2Batch, logits: torch.Tensor, start: int) -> torch.Tensor:
        """KL(frozen base || model) over the harmless rows' labelled positions; `logits` begin at `start`."""
        with torch.no_grad(), self.model.disable_adapter():
            base = tail_pass(self.model, b.tensors, start)[1]
        mask = ((b.labels != -100) & ~b.harmful[:, None])[:, start:]
        if not mask.any():
            return logits.new_zeros(())
        p, q = torch.log_softmax(base[mask].float(), -1), torch.log_softmax(logits[mask].float(), -1)
        return (p.exp() * (p - q)).sum(-1).mean()

    def aware(self, b: Stage2Batch, subspace: RefusalSubspace, rng: random.Random) -> tuple[torch.Tensor, int]:
        """The SFT loss under the ablation, on every row (--aware-harmless) or the harmful ones; and their number."""
        rows = b.tensors if self.cfg.aware_harmless else b.rows(b.harmful)
        full = rng.random() < self.cfg.full_ablation
        with ablation(self.adapter, subspace, rows["input_ids"], None if full else rng, self.writer_module):
            begin = first_predicting(rows["labels"])
            loss = reply_loss(tail_pass(self.model, rows, begin)[1], rows["labels"], begin)
        return loss, len(rows["input_ids"])

    def invariance(self, b: Stage2Batch, logits: torch.Tensor, start: int, subspace: RefusalSubspace) -> torch.Tensor:
        """Invariance of the first reply token to the full ablation, over the harmful rows whose reply survived."""
        keep = b.harmful & b.survives
        sub, pe = b.rows(keep), b.prompt_end[keep]
        begin = max(int(pe.min()) - 1, start)  # only the first reply token is compared
        with ablation(self.adapter, subspace, sub["input_ids"], None, self.writer_module):
            ablated = tail_pass(self.model, sub, begin)[1]
        target = sub["labels"][torch.arange(len(pe)), pe]
        return invariance_loss(
            first_reply_logits(logits[keep], pe - start),
            first_reply_logits(ablated, pe - begin),
            target,
            self.cfg.invariance_margin,
        )
