"""A reference model's passes over prompts it is asked about again and again, kept.

The coherence scorer reads each reply's likelihood under the unedited base, and prove labels every
attack's replies to the same held-out and tuning prompts: teacher forcing ran each prompt again
for every labelling. Kept, a prompt's KV cache and last logits let the reply's tokens run alone
(bench/kept_prompts.py measures a read both ways).

A kept pass stands for the model as it was when the pass ran, so it must only serve a model whose
weights have not changed since: the scorer's base, read outside every edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.core.generate import encode, headed, length_order, prompt_forward, render


@dataclass(frozen=True)
class Pass:
    """One prompt's pass: keys and values [layers, kv heads, length, head dim] and the last position's logits."""

    keys: torch.Tensor
    values: torch.Tensor
    last: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.last))


def plain_kv(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (keys, values) of a cache of full-attention layers only; None for any other (sliding
    windows, recurrent states), whose state a per-prompt copy would not capture."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@dataclass
class KeptPrompts:
    """Prompt passes of one reference model, by rendered prompt, on the host, up to `budget` bytes (a
    prompt beyond it is run with its reply, as without keeping)."""

    budget: int = 2 << 30
    passes: dict[str, Pass] = field(default_factory=dict)
    used: int = 0
    usable: bool = True  # False once the model's cache turned out not to be plain keys and values

    def keep(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int
    ) -> None:
        """Run and keep the passes of the prompts not kept yet (by their rendered text), while the budget lasts."""
        todo = [
            (t, p) for t, p in dict(zip(render(tok, prompts), prompts, strict=True)).items() if t not in self.passes
        ]
        todo = [todo[i] for i in length_order(tok, [p for _, p in todo])]  # like lengths together: little padding
        device = next(model.parameters()).device
        for start in range(0, len(todo), batch_size):
            if not self.usable or self.used >= self.budget:
                return
            chunk = todo[start : start + batch_size]
            batch = headed(encode(tok, [p for _, p in chunk], device))
            with torch.inference_mode():
                out = prompt_forward(model, batch, 1)
            kv = plain_kv(out.past_key_values)
            if kv is None:
                self.usable = False
                return
            for row, (text, _) in enumerate(chunk):
                at = batch["attention_mask"][row].nonzero()[:, 0]
                keys = torch.stack([k[row][:, at] for k, _ in kv]).cpu()
                values = torch.stack([v[row][:, at] for _, v in kv]).cpu()
                got = Pass(keys, values, out.logits[row, -1].cpu())
                if self.used + got.nbytes > self.budget:
                    return
                self.passes[text] = got
                self.used += got.nbytes


def kept_logprobs(
    model: PreTrainedModel,
    passes: Sequence[Pass],
    bodies: Sequence[list[int]],
    pad: int,
) -> list[torch.Tensor]:
    """Log-probability of every body token given its prompt's kept pass (float64, one tensor per row):
    the prompts' keys and values left-padded into one cache, the bodies right-padded after them."""
    device = next(model.parameters()).device
    n, width = len(passes), max(p.length for p in passes)
    fed = max(len(b) - 1 for b in bodies)  # the last body token predicts nothing that is asked for
    logits = None
    if fed > 0:
        ref = passes[0].keys
        keys = ref.new_zeros((ref.shape[0], n, ref.shape[1], width, ref.shape[3]))
        values = torch.zeros_like(keys)
        mask = torch.zeros((n, width + fed), dtype=torch.long)
        ids = torch.full((n, fed), pad, dtype=torch.long)
        pos = torch.zeros((n, fed), dtype=torch.long)
        for r, (p, body) in enumerate(zip(passes, bodies, strict=True)):
            keys[:, r, :, width - p.length :] = p.keys
            values[:, r, :, width - p.length :] = p.values
            ahead = max(len(body) - 1, 0)
            mask[r, width - p.length : width + ahead] = 1
            ids[r, :ahead] = torch.tensor(body[:ahead], dtype=torch.long)
            pos[r] = p.length + torch.arange(fed)
        from transformers import DynamicCache

        cache = DynamicCache([(k.to(device), v.to(device)) for k, v in zip(keys, values, strict=True)], model.config)
        with torch.inference_mode():
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                past_key_values=cache,
                use_cache=True,
            )
        logits = out.logits
    got = []
    for r, (p, body) in enumerate(zip(passes, bodies, strict=True)):
        if not body:
            got.append(torch.empty(0, dtype=torch.float64))
            continue
        rest = [] if logits is None else [logits[r, : len(body) - 1].float().cpu()]
        z = torch.cat([p.last.float()[None], *rest])  # the chosen logit less the log-normaliser
        targets = torch.tensor(body, dtype=torch.long)[:, None]
        got.append((z.gather(-1, targets)[:, 0] - torch.logsumexp(z, -1)).double())
    return got


def from_kept(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int,
    kept: KeptPrompts,
) -> dict[int, torch.Tensor]:
    """Each continuation's token log-probabilities (tokenised apart from its prompt, as teacher forcing
    does) for the rows whose prompt pass is kept or could be kept now; the other rows are left out."""
    texts = render(tok, prompts)
    kept.keep(model, tok, prompts, batch_size)
    rows = [i for i, t in enumerate(texts) if t in kept.passes]
    bodies = {i: tok(continuations[i], add_special_tokens=False)["input_ids"] for i in rows}
    rows.sort(key=lambda i: len(bodies[i]))  # like lengths together: little padding
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    got: dict[int, torch.Tensor] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        lps = kept_logprobs(model, [kept.passes[texts[i]] for i in chunk], [bodies[i] for i in chunk], pad)
        got.update(zip(chunk, lps, strict=True))
    return got
