"""Reasoning blocks in replies: which markers a chat template uses, and how a reply splits into its
reasoning and its answer (refusal is scored on the answer only)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from refusal_lab.errors import UserError


@dataclass(frozen=True)
class Reply:
    """A generated reply: the answer (what refusal is scored on) and any reasoning block.

    `reasoning_open`: the block never closed (the token budget ran out, or the reply ended, while the
    model was still thinking), so there is no answer to score: such a reply is broken, not refused.
    """

    answer: str
    reasoning: str = ""
    reasoning_open: bool = False


# (open, close) reasoning markers found in chat templates: <think> (Qwen3, DeepSeek-R1), Apertus's inner section
KNOWN_MARKERS = (("<think>", "</think>"), ("<|inner_prefix|>", "<|inner_suffix|>"), ("<thinking>", "</thinking>"))


def think_markers(tok: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """Reasoning-block markers: declared in the tokenizer config, or found in the chat template.

    A template that only closes the block (the model opens it, or the generation prompt does) has
    markers; one that opens it and never closes it cannot be split, so it is refused up front.
    """
    declared = tok.init_kwargs.get("think_markers")
    if declared:
        if len(declared) != 2 or not all(isinstance(m, str) and m for m in declared):
            raise UserError(
                f"the tokenizer's think_markers {declared!r} are not an opening and a closing marker",
                'declare both markers in tokenizer_config.json, e.g. "think_markers": ["<think>", "</think>"]',
            )
        return declared[0], declared[1]
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    for open_, close in KNOWN_MARKERS:
        if close in template:
            return open_, close
        if open_ in template:
            raise UserError(
                f"the chat template opens reasoning with {open_} but has no closing {close}",
                f"pass --chat-template FILE with a template that closes the block with {close}",
            )
    return None


def split_thinking(text: str, markers: tuple[str, str] | None, opened: bool = False) -> Reply:
    """Separate '<think> ... </think> answer'. A block that opens and never closes is all reasoning and
    marked open. `opened`: the generation prompt already opened the block, so the text starts inside it."""
    if markers is None:
        return Reply(text.strip())
    open_, close = markers
    text = open_ + text if opened else text
    if close in text:
        head, _, answer = text.partition(close)
        return Reply(answer.strip(), head.replace(open_, "").strip())
    if open_ in text:
        before, _, reasoning = text.partition(open_)
        return Reply(before.strip(), reasoning.replace(open_, "").strip(), reasoning_open=True)
    return Reply(text.strip())
