"""Batched chat generation: chat template, left padding, greedy decoding with the KV cache whose batch
shrinks as replies finish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.core.reasoning import Reply, split_thinking, think_markers
from refusal_lab.errors import UserError

Messages = list[dict[str, str]]


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render(tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages]) -> list[str]:
    """Chat-template each prompt with the generation prompt appended."""
    return [tok.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]


def opener_ids(tok: PreTrainedTokenizerBase, opener: str, max_new_tokens: int | None = None) -> list[int]:
    """A reply prefix's tokens. They count toward the reply's token budget (`max_new_tokens`), so a
    prefix that long leaves nothing to generate and is refused."""
    ids = tok(opener, add_special_tokens=False)["input_ids"] if opener else []
    if max_new_tokens is not None and len(ids) >= max_new_tokens:
        raise UserError(
            f"the prefill {opener!r} is {len(ids)} tokens, no fewer than a reply's {max_new_tokens} (--max-new-tokens)",
            "a prefill's tokens count toward --max-new-tokens and must be fewer: shorten it or raise --max-new-tokens",
        )
    return ids


def encode(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages], device: torch.device, opener: str = ""
) -> dict[str, torch.Tensor]:
    """Left-padded batch; the template already carries BOS, so none is added again.

    `opener`: a reply prefix (a prefill attack); its tokens follow the generation prompt's, so the
    model continues a reply that already begins with it.
    """
    tok.padding_side = "left"
    texts = render(tok, prompts)
    if opener:
        tail = opener_ids(tok, opener)
        rows = [tok(t, add_special_tokens=False)["input_ids"] + tail for t in texts]
        enc = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    else:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def common_head(rows: Sequence[Sequence[int]]) -> int:
    """How many first tokens every row shares, each row keeping at least one of its own."""
    n = max(min(len(r) for r in rows) - 1, 0)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


MIN_SHARED_HEAD = 4  # below this, one more forward call costs more than the positions it saves


def headed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A left-padded batch with its padding moved after the head every row shares (a chat template's
    system prompt and the turn's opening), so `prompt_forward` can run that head once. Rows read the
    same only where position ids follow the mask (`prompt_forward` and the decoding loop pass them)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    width = ids.shape[1]
    head = common_head([r[width - n :].tolist() for r, n in zip(ids, lengths, strict=True)]) if len(ids) > 1 else 0
    if head < MIN_SHARED_HEAD:
        return batch
    new_ids, new_mask = ids.clone(), mask.clone()
    for i, n in enumerate(lengths):
        pad = width - n
        new_ids[i, :head], new_mask[i, :head] = ids[i, pad : pad + head], 1
        new_ids[i, head : head + pad], new_mask[i, head : head + pad] = ids[i, :pad], 0
    return {**batch, "input_ids": new_ids, "attention_mask": new_mask}


def shared_head(batch: dict[str, torch.Tensor]) -> int:
    """The first columns that every row of `batch` holds alike and unpadded (0 for a single row)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]).all(0) & mask.bool().all(0)).int()
    return min(int(same.cumprod(0).sum()), ids.shape[1] - 1)


def length_order(tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages]) -> list[int]:
    """Prompt indices, shortest chat-templated prompt first: a left-padded batch of like lengths
    computes little padding. Ties keep their order, so the order depends on the prompts alone."""
    lengths = [len(tok(text, add_special_tokens=False)["input_ids"]) for text in render(tok, prompts)]
    return sorted(range(len(prompts)), key=lengths.__getitem__)


def in_order(items: Sequence, order: Sequence[int]) -> list:
    """Undo `length_order`: items made for the sorted prompts, back in the prompts' own order."""
    out: list = [None] * len(order)
    for item, i in zip(items, order, strict=True):
        out[i] = item
    return out


def opened_by_prompt(tok: PreTrainedTokenizerBase, markers: tuple[str, str] | None, prompts: Sequence) -> bool:
    """Whether the template's generation prompt opens the reasoning block itself (Apertus with thinking
    on, DeepSeek-R1's distils): the reply then starts inside it, with no opening marker of its own."""
    return markers is not None and len(prompts) > 0 and render(tok, prompts[:1])[0].rstrip().endswith(markers[0])


def tail_forward(model: PreTrainedModel, keep: int, **inputs: object) -> object:
    """A forward pass whose logits cover the last `keep` positions only: the vocabulary projection of
    every other position is skipped (for a 150k-word vocabulary that is most of the memory a
    forward pass needs). A model without logits_to_keep computes them all."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:
        return model(**inputs)


def tail_logits(model: PreTrainedModel, keep: int, **batch: torch.Tensor) -> torch.Tensor:
    """Logits of the last `keep` positions only."""
    return tail_forward(model, keep, **batch, use_cache=False).logits[:, -keep:]


def stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """Every end-of-reply id: the generation config's (Gemma lists its end-of-turn) and the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        for i in source if isinstance(source, list | tuple) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _clean(tok: PreTrainedTokenizerBase, text: str, keep: tuple[str, ...]) -> str:
    for special in tok.all_special_tokens:
        if special not in keep:
            text = text.replace(special, "")
    return text.strip()


def _settled_text(words: list[str], settled: Callable[[str], bool]) -> bool:
    """The last, possibly unfinished word is left out, so a whole-word rule never fires on a prefix."""
    return len(words) > 1 and settled(" ".join(words[:-1]))


class Settled:
    """A stopping rule for `model.generate`: a reply stops once `settled(text)` holds for its text so far.

    Used where generation goes through `model.generate` (sampling, or a generation config that
    reshapes logits); replies that stop there are padded while the rest of the batch goes on.
    """

    def __init__(
        self,
        tok: PreTrainedTokenizerBase,
        prompt_len: int,
        answer: Callable[[str], str],
        settled: Callable[[str], bool],
    ) -> None:
        self.tok, self.prompt_len, self.answer, self.settled = tok, prompt_len, answer, settled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=False)
        # a reasoning block never settles a verdict: only the answer is judged
        done = [_settled_text(self.answer(text).split(), self.settled) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# generation-config fields that change greedy decoding's logits or its end: any of them set sends
# decoding through `model.generate`, which applies them.
_RESHAPING = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def plain_greedy(model: PreTrainedModel) -> bool:
    """True when greedy decoding is argmax and nothing else (no penalties, forced or banned tokens)."""
    gen = getattr(model, "generation_config", None)
    return all(getattr(gen, k, neutral) in (neutral, None) for k, neutral in _RESHAPING.items())


@dataclass
class Prefill:
    """One batch's prompt pass, kept so that decoding continues from it (its cache is then used up).

    Its greedy first tokens are what each reply opens with: the search reads them as its refusal
    proxy and, when the trial goes on to generate, the replies start from this pass, not a second one.
    """

    batch: dict[str, torch.Tensor]
    out: Any  # the forward's output: the last position's logits and the KV cache

    @property
    def first(self) -> torch.Tensor:
        return self.out.logits[:, -1].argmax(-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the left padding, as `model.generate` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], keep: int = 1) -> Any:
    """A prompt pass (logits of the last `keep` positions, and the KV cache) with position ids that follow
    the mask. On a `headed` batch the rows' shared head runs once and its cache is copied to every row,
    which then runs from there: the same outputs up to float rounding, for a chat model with a system
    prompt a third or more of the prompt's positions saved. Hooks must treat positions alike (edits do;
    captures, which read every position, must not use it)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = _positions(mask)
    head = shared_head(batch)
    if head >= MIN_SHARED_HEAD and head + keep <= ids.shape[1]:
        one = {"input_ids": ids[:1, :head], "attention_mask": mask[:1, :head], "position_ids": pos[:1, :head]}
        cache = tail_forward(model, 1, use_cache=True, **one).past_key_values
        if hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(len(ids))
            rest = {"input_ids": ids[:, head:], "position_ids": pos[:, head:], "past_key_values": cache}
            return tail_forward(model, keep, attention_mask=mask, use_cache=True, **rest)
    return tail_forward(model, keep, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages], batch_size: int = 16
) -> list[Prefill]:
    """The prompt passes of greedy decoding, batched as generate_replies batches them (by length)."""
    device = next(model.parameters()).device
    out = []
    prompts = [prompts[i] for i in length_order(tok, prompts)]
    for start in range(0, len(prompts), batch_size):
        batch = headed(encode(tok, prompts[start : start + batch_size], device))
        out.append(Prefill(batch, prompt_forward(model, batch)))
    return out


def greedy_shrinking(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: list[int],
    done: Callable[[list[int]], bool] | None = None,
    first: Any = None,
) -> list[list[int]]:
    """Greedy decoding whose batch shrinks as replies finish.

    A row leaves the batch (and its KV cache rows are dropped) at its end-of-reply token or once
    `done(ids)` holds for its new ids, so the remaining steps cost only the replies still running:
    `model.generate` keeps finished rows in every step, padded. Returns each row's new ids, its
    end-of-reply token included, as `model.generate` gives them. Position ids follow the left
    padding as `model.generate` computes them. `first`: this batch's prompt pass, already made (a
    Prefill's output).
    """
    if first is None:
        batch = headed(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    rows = torch.arange(n, device=ids.device)
    res = first if first is not None else prompt_forward(model, batch)
    cache, last = res.past_key_values, _positions(mask)[:, -1]
    stop = torch.tensor(eos, device=ids.device)
    for step in range(max_new_tokens):
        nxt = res.logits[:, -1].argmax(-1)
        ended = torch.isin(nxt, stop)
        keep = []
        for j, (r, t, e) in enumerate(zip(rows.tolist(), nxt.tolist(), ended.tolist(), strict=True)):
            out[r].append(t)
            if not e and (done is None or not done(out[r])):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            if not hasattr(cache, "batch_select_indices"):  # a cache that cannot drop rows
                return _finish_unshrunk(model, batch, max_new_tokens, eos, done)
            idx = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(idx)
            rows, nxt, mask, last = rows[idx], nxt[idx], mask[idx], last[idx]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        last = last + 1
        res = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            past_key_values=cache,
            use_cache=True,
        )
    return out


def _finish_unshrunk(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: list[int],
    done: Callable[[list[int]], bool] | None,
) -> list[list[int]]:
    """Fallback for caches without row selection: `model.generate` from the start, rows cut where they end."""
    pad = eos[0]
    gen = model.generate(
        **batch, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        do_sample=False, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    rows: list[list[int]] = []
    for seq in gen[:, batch["input_ids"].shape[1] :].tolist():
        ids: list[int] = []
        for t in seq:
            ids.append(t)
            if t in eos or (done is not None and done(ids)):
                break
        rows.append(ids)
    return rows


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    settled: Callable[[str], bool] | None = None,
    prefilled: Sequence[Prefill] | None = None,
    opener: str = "",
) -> list[Reply]:
    """Batched replies (greedy, or seeded sampling) with the reasoning split from the answer.

    `settled(text)`: stop a reply early once its verdict cannot change (see Settled).
    `prefilled`: prefill(...) of the same prompts and batch size; greedy decoding continues from it.
    `opener`: each reply begins with it and the model goes on (the two within `max_new_tokens`).
    """
    device = next(model.parameters()).device
    eos, markers = stop_ids(model, tok), think_markers(tok)
    keep, opened = markers or (), opened_by_prompt(tok, markers, prompts)
    tail = opener_ids(tok, opener, max_new_tokens)  # decoded with each reply, so words join as in one text
    max_new_tokens -= len(tail)
    out: list[Reply] = []

    def split(text: str) -> Reply:
        return split_thinking(_clean(tok, text, keep), markers, opened)

    def answer(text: str) -> str:
        return split(text).answer

    shrink = not sample and plain_greedy(model)
    order = length_order(tok, prompts)
    prompts = [prompts[i] for i in order]
    starts = range(0, len(prompts), batch_size)
    if prefilled is not None and (opener or len(prefilled) != len(starts)):
        held = " and an opener they do not hold" if opener else ""
        raise ValueError(f"{len(prefilled)} prefilled batches for {len(starts)} batches of prompts{held}")
    for k, start in enumerate(starts):
        pre = prefilled[k] if prefilled is not None else None
        batch = pre.batch if pre is not None else encode(tok, prompts[start : start + batch_size], device, opener)
        if shrink:
            done = None
            if settled is not None:

                def done(ids: list[int]) -> bool:
                    return _settled_text(answer(tok.decode(tail + ids, skip_special_tokens=False)).split(), settled)

            texts = [
                tok.decode(tail + r, skip_special_tokens=False)
                for r in greedy_shrinking(model, batch, max_new_tokens, eos, done, pre.out if pre else None)
            ]
        else:
            sampling = (temperature, top_p, seed + start) if sample else None
            texts = _generate_hf(model, tok, batch, max_new_tokens, sampling, settled, answer, len(tail))
        out += [split(t) for t in texts]
        if progress is not None:
            progress(len(texts))
    return in_order(out, order)


def _generate_hf(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    sampling: tuple[float, float, int] | None,
    settled: Callable[[str], bool] | None,
    answer: Callable[[str], str],
    opened: int = 0,
) -> list[str]:
    """model.generate for one batch: greedy, or sampled with (temperature, top_p, seed); raw reply texts.
    `opened`: the batch's last tokens that begin the reply (an opener), decoded with it."""
    start = batch["input_ids"].shape[1] - opened
    if sampling is not None:
        temperature, top_p, seed = sampling
        torch.manual_seed(seed)
        opts: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    else:
        opts = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if settled is not None:
        from transformers import StoppingCriteriaList

        rule = Settled(tok, start, answer, settled)
        opts["stopping_criteria"] = StoppingCriteriaList([rule])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = stop_ids(model, tok)
    ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos, **opts)
    return tok.batch_decode(ids[:, start:], skip_special_tokens=False)


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence, max_new_tokens: int = 128,
             batch_size: int = 16, settled: Callable[[str], bool] | None = None,
             prefilled: Sequence[Prefill] | None = None) -> list[str]:  # fmt: skip
    """Greedy answers only (reasoning blocks removed), as generate_replies gives them."""
    replies = generate_replies(model, tok, prompts, max_new_tokens, batch_size, settled=settled, prefilled=prefilled)
    return [r.answer for r in replies]
