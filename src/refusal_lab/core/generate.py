"""Batched chat generation: chat template, left padding, greedy decoding with the KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render(tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages]) -> list[str]:
    """Chat-template each prompt with the generation prompt appended."""
    return [tok.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]


def encode(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str | Messages], device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-padded batch; the template already carries BOS, so none is added again."""
    tok.padding_side = "left"
    enc = tok(render(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


@dataclass(frozen=True)
class Reply:
    """A generated reply: the answer (what refusal is scored on) and any reasoning block."""

    answer: str
    reasoning: str = ""


def think_markers(tok: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """Reasoning-block markers: declared in the tokenizer config, or found in the chat template."""
    declared = tok.init_kwargs.get("think_markers")
    if declared and len(declared) == 2:
        return declared[0], declared[1]
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    for open_, close in (
        ("<think>", "</think>"),
        ("<|inner_prefix|>", "<|inner_suffix|>"),
        ("<thinking>", "</thinking>"),
    ):
        if open_ in template and close in template:
            return open_, close
    return None


def split_thinking(text: str, markers: tuple[str, str] | None) -> Reply:
    """Separate '<think> ... </think> answer'; an unclosed block is all reasoning, no answer."""
    if markers is None:
        return Reply(text.strip())
    open_, close = markers
    if close in text:
        head, _, answer = text.partition(close)
        return Reply(answer.strip(), head.replace(open_, "").strip())
    if text.lstrip().startswith(open_):
        return Reply("", text.replace(open_, "").strip())
    return Reply(text.strip())


def tail_logits(model: PreTrainedModel, keep: int, **batch: torch.Tensor) -> torch.Tensor:
    """Logits of the last `keep` positions only: the vocabulary projection of every other position
    is skipped (for a 150k-word vocabulary that is most of the memory a forward pass needs)."""
    try:
        return model(**batch, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: compute them all, keep the tail
        return model(**batch, use_cache=False).logits[:, -keep:]


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


class Settled:
    """A stopping rule: a reply stops once `settled(text)` holds for its text so far.

    The last, possibly unfinished word is left out of the text it judges, so a rule that matches
    whole words never fires on a word's prefix. Replies that stop early are padded while the rest
    of the batch goes on, and the batch ends as soon as every reply has stopped.
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
        done = []
        for text in texts:
            words = self.answer(text).split()  # a reasoning block never settles a verdict
            done.append(len(words) > 1 and self.settled(" ".join(words[:-1])))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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
) -> list[Reply]:
    """Batched replies (greedy, or seeded sampling) with the reasoning split from the answer.

    `settled(text)`: stop a reply early once its verdict cannot change (see Settled).
    """
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = stop_ids(model, tok)
    markers = think_markers(tok)
    keep = markers or ()
    out: list[Reply] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode(tok, prompts[start : start + batch_size], device)
        if sample:
            torch.manual_seed(seed + start)
        opts = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if sample
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if settled is not None:
            from transformers import StoppingCriteriaList

            def answer(text: str) -> str:
                return split_thinking(_clean(tok, text, keep), markers).answer

            rule = Settled(tok, batch["input_ids"].shape[1], answer, settled)
            opts["stopping_criteria"] = StoppingCriteriaList([rule])
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos, **opts)
        new = ids[:, batch["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=False)
        out += [split_thinking(_clean(tok, t, keep), markers) for t in texts]
        if progress is not None:
            progress(len(new))
    return out


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence, max_new_tokens: int = 128,
             batch_size: int = 16, settled: Callable[[str], bool] | None = None) -> list[str]:  # fmt: skip
    """Greedy answers only (reasoning blocks removed), as generate_replies gives them."""
    replies = generate_replies(model, tok, prompts, max_new_tokens, batch_size, settled=settled)
    return [r.answer for r in replies]
