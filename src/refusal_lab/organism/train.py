"""Train the organism from scratch: a tiny Llama on the synthetic chat stream.

Loss is on assistant tokens only (as in chat fine-tuning), so capacity goes to behaviour,
not to modelling the user's side; a prefilled reply also leaves its first tokens out. Everything
is seeded and single-process, on a fixed number of threads, for determinism. Each batch runs as
length-sorted slices (one forward and backward each, gradients summed): the same gradient as
one padded batch with half the padding, so about 1.8x faster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from refusal_lab.core.batches import right_padded


@dataclass(frozen=True)
class TrainConfig:
    """Model size and optimisation; part of the organism's cache key."""

    hidden_size: int = 192  # at 128 the ablated organism's replies break (see bench/organism_seeds.py)
    intermediate_size: int = 576
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    steps: int = 900
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    micro_batches: int = 4  # length-sorted slices per batch
    threads: int = 2  # intra-op threads while training: the sums' order, hence the weights, depend on it


def encode_conversation(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids as the chat template renders them, and labels that keep only assistant turns.

    An assistant message with "free": n gets no loss on its first n tokens (a prefilled opener).
    """
    ids: list[int] = [tok.bos_token_id]
    labels: list[int] = [-100]
    for msg in messages:
        head = tok.convert_tokens_to_ids(f"<|{msg['role']}|>")
        body = tok(msg["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += [head, *body]
        free = int(msg.get("free", 0)) if msg["role"] == "assistant" else len(body)
        labels += [-100] * (1 + free) + body[free:]
    return ids, labels


def make_model(cfg: TrainConfig, tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def train(
    cfg: TrainConfig,
    tok: PreTrainedTokenizerBase,
    conversations: Iterator[list[dict[str, str]]],
    progress: Callable[[int, float], None] | None = None,
) -> LlamaForCausalLM:
    """Train a fresh model for cfg.steps steps; `progress(step, loss)` is called every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, tok, conversations, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    tok: PreTrainedTokenizerBase,
    conversations: Iterator[list[dict]],
    progress: Callable[[int, float], None] | None,
) -> LlamaForCausalLM:
    model = make_model(cfg, tok)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(cfg.steps):
        rows = sorted(
            (encode_conversation(tok, next(conversations)) for _ in range(cfg.batch_size)), key=lambda r: len(r[0])
        )
        n_labels = max(1, sum(lab != -100 for _, labels in rows for lab in labels[1 : cfg.max_positions]))
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        k = max(1, min(cfg.micro_batches, len(rows)))
        for i in range(k):  # summed token losses over the whole batch's label count: one batch's gradient
            share = rows[i * len(rows) // k : (i + 1) * len(rows) // k]
            batch = right_padded(share, tok.pad_token_id, cfg.max_positions)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            part = (
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
                )
                / n_labels
            )
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss)
    model.eval()
    return model
