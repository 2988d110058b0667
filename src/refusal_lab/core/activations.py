"""Residual-stream activations: forward hooks on each decoder layer's output.

Means and per-coordinate variances are accumulated in float64 while streaming over batches,
so the statistics cost O(positions x layers x hidden) memory whatever the number of prompts.
Per-prompt vectors (needed by SVD, LDA and separability scores) are kept up to a cap.
Results can be cached on disk, keyed by a fingerprint of the weights, the prompts and positions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.config import POSITIONS
from refusal_lab.core.arch import Adapter
from refusal_lab.core.generate import Messages, as_messages, encode, render, tail_logits
from refusal_lab.errors import UserError

if TYPE_CHECKING:
    from refusal_lab.core.model import Loaded

CACHE_FORMAT = 2  # 2: the key holds the rendered token ids, so a changed chat template or tokenizer misses


@dataclass
class Stats:
    """Activations of one prompt set: mean/var [P, L, H] (float64), kept vectors [n, P, L, H]."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int
    vectors: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return self.mean.shape[0]


def post_instruction_length(tok: PreTrainedTokenizerBase) -> int:
    """Tokens the chat template puts after the user's message (end-of-turn, assistant header...).

    Found as the longest token suffix shared by renders of messages that end differently
    (digits: in every vocabulary, even a word-level one).
    """
    renders = [
        tok(
            tok.apply_chat_template(as_messages(t), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for t in ("1", "2", "3 4")
    ]
    n = 0
    while all(n < len(r) for r in renders) and len({r[-1 - n] for r in renders}) == 1:
        n += 1
    return max(1, n)


def _select(hidden: torch.Tensor, mask: torch.Tensor, positions: str, n_post: int) -> torch.Tensor:
    """[batch, seq, H] -> [batch, P, H] for the chosen positions (left padding assumed)."""
    if positions == "last":
        return hidden[:, -1:, :]
    if positions == "post":
        return hidden[:, -n_post:, :]
    m = mask[:, :, None].to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp_min(1))[:, None, :]


def cache_key(
    model_fp: str, tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages], positions: str, keep: int
) -> str:
    """Weights, the exact token ids the model reads (template and tokenizer included), positions, cap."""
    ids = tok(render(tok, prompts), add_special_tokens=False)["input_ids"]
    blob = json.dumps({"v": CACHE_FORMAT, "m": model_fp, "ids": ids, "pos": positions, "keep": keep})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.inference_mode()
def capture(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    prompts: Sequence[str | Messages],
    positions: str = "last",
    batch_size: int = 16,
    keep: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """Residual stream after every layer at the chosen positions, for every prompt."""
    if positions not in POSITIONS:
        raise UserError(f"unknown position {positions!r}", f"use one of {', '.join(POSITIONS)}")
    if not prompts:
        raise UserError("no prompts to capture activations from", "give a non-empty prompt set")
    device = next(model.parameters()).device
    n_post = post_instruction_length(tok)
    grabbed: dict[int, torch.Tensor] = {}
    mask_box: dict[str, torch.Tensor] = {}

    def hook_for(i: int):  # noqa: ANN202
        def hook(_mod: torch.nn.Module, _args: tuple, out: object) -> None:
            h = out[0] if isinstance(out, tuple) else out
            grabbed[i] = _select(h, mask_box["m"].to(h.device), positions, n_post).to("cpu", torch.float64)

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(adapter.layers)]
    total = total_sq = None
    kept: list[torch.Tensor] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode(tok, prompts[start : start + batch_size], device)
            mask_box["m"] = batch["attention_mask"]
            tail_logits(model, 1, **batch)  # the hooks read the residual stream; logits are not needed
            x = torch.stack([grabbed[i] for i in range(adapter.num_layers)], dim=2)  # [b, P, L, H]
            if not torch.isfinite(x).all():
                raise UserError(
                    "activations contain NaN or inf",
                    "load the model in float32 (--dtype float32) or check the weights",
                )
            total = x.sum(0) if total is None else total + x.sum(0)
            total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
            room = keep - sum(len(k) for k in kept)
            if room > 0:
                kept.append(x[:room].float())
            if progress is not None:
                progress(len(x))
    finally:
        for h in handles:
            h.remove()
    n = len(prompts)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0) * (n / max(1, n - 1))
    return Stats(mean, var, n, torch.cat(kept) if kept else None)


def save_stats(path: Path, stats: Stats) -> None:
    from safetensors.torch import save_file

    tensors = {"mean": stats.mean.contiguous(), "var": stats.var.contiguous()}
    if stats.vectors is not None:
        tensors["vectors"] = stats.vectors.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"count": str(stats.count)})
    tmp.replace(path)


def load_stats(path: Path) -> Stats:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        vectors = f.get_tensor("vectors") if "vectors" in f.keys() else None  # noqa: SIM118
        return Stats(f.get_tensor("mean"), f.get_tensor("var"), int(meta["count"]), vectors)


def cached_capture(
    loaded: Loaded,
    prompts: Sequence[str | Messages],
    positions: str = "last",
    batch_size: int = 16,
    keep: int = 1024,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """capture(), skipped when the same weights read the same tokens at the same positions before."""
    args = (loaded.model, loaded.tokenizer, loaded.adapter, prompts, positions, batch_size, keep, progress)
    if cache_dir is None:
        return capture(*args)
    path = cache_dir / f"act-{cache_key(loaded.fingerprint, loaded.tokenizer, prompts, positions, keep)}.safetensors"
    if path.is_file():
        return load_stats(path)
    stats = capture(*args)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_stats(path, stats)
    return stats


def residual_at_position(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    prompts: Sequence[str | Messages],
    batch_size: int = 32,
    keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last-token means [L, H] and optionally per-prompt vectors [n, L, H] (a convenience)."""
    s = capture(model, tok, adapter, prompts, "last", batch_size, keep=len(prompts) if keep else 0)
    return s.mean[0], (s.vectors[:, 0].double() if keep else None)
