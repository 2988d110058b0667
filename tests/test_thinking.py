"""Thinking models: a reply still thinking when its budget ran out, or thinking in a loop, is broken (not
refused, as its empty answer alone would read); refusal words inside reasoning are never read; a
template that opens a reasoning block and never closes it is refused up front.

Replies come from tiny real models (Llama with a `<think>` template, Apertus with its inner-section
markers) whose greedy choices are steered token by token, through the same generation and labelling
path that eval, prove and search take.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refusal_lab.config import EvalSettings
from refusal_lab.core.generate import Reply, generate_replies, split_thinking, think_markers
from refusal_lab.core.metrics import KeywordScorer, is_refusal
from refusal_lab.core.model import Loaded
from refusal_lab.core.prompts import Prompt
from refusal_lab.core.scoring import label_replies, unfinished
from refusal_lab.errors import UserError
from tiny_models import tiny_model

SENTENCE = "user assistant : the asks for x i cannot help sure here it is say that"
WORDS = (*SENTENCE.split(" "), *"abcdefgh")
THINK = ("<think>", "</think>")
APERTUS = ("<|inner_prefix|>", "<|inner_suffix|>")
CASES = [("llama", THINK), ("apertus", APERTUS)]
PROMPTS = ["the user asks for x", "say that"]


def template(markers: tuple[str, str], opened: bool = False) -> str:
    """A chat template that drops past reasoning from history (so it names the closing marker) and,
    when `opened`, opens the reasoning block in the generation prompt (as Apertus with thinking on does)."""
    close = markers[1]
    turns = f"{{% for m in messages %}}{{{{ m['role'] }}}} : {{{{ m['content'].split('{close}')[-1] }}}} {{% endfor %}}"
    start = "assistant : " + (markers[0] if opened else "")
    return turns + f"{{% if add_generation_prompt %}}{start}{{% endif %}}"


def tokenizer(markers: tuple[str, str], chat_template: str):
    """A word-per-token tokenizer whose reasoning markers are special tokens (as real ones are)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", *markers, *dict.fromkeys(WORDS)]
    backend = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=list(markers), **specials)
    tok.chat_template = chat_template
    return tok


class Steered:
    """A tiny model whose greedy choices follow a script: its output layer's logits are made one-hot on
    the next scripted token, forward pass after forward pass (the last one repeats)."""

    def __init__(self, family: str, markers: tuple[str, str], opened: bool = False) -> None:
        self.tok = tokenizer(markers, template(markers, opened))
        self.model = tiny_model(family, vocab_size=len(self.tok))
        self.model.lm_head.register_forward_hook(self._steer)
        self.open, self.close = markers
        self.ids: list[int] = []
        self.step = 0

    def _steer(self, _module: torch.nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        steered = torch.full_like(out, -1e4)
        steered[..., self.ids[min(self.step, len(self.ids) - 1)]] = 0.0
        self.step += 1
        return steered

    def replies(self, script: str, budget: int | None = None, **opts: object) -> list[Reply]:
        """Greedy replies to PROMPTS that say `script` ('OPEN'/'CLOSE' stand for the markers)."""
        words = script.replace("OPEN", self.open).replace("CLOSE", self.close).split()
        self.ids, self.step = self.tok.convert_tokens_to_ids(words), 0
        assert self.tok.unk_token_id not in self.ids, script
        return generate_replies(self.model, self.tok, PROMPTS, budget or len(words), 4, **opts)

    def labels(self, script: str, budget: int | None = None) -> list[str]:
        return label_replies(KeywordScorer(), PROMPTS, self.replies(script, budget))


@pytest.mark.parametrize(("family", "markers"), CASES)
def test_reasoning_that_never_closes_within_the_budget_is_broken_not_refused(family, markers):
    m = Steered(family, markers)
    replies = m.replies("OPEN the user asks for x i cannot say that")  # the budget ends mid-thought
    assert [(r.answer, r.reasoning_open) for r in replies] == [("", True)] * 2
    assert replies[0].reasoning == "the user asks for x i cannot say that"
    empty = KeywordScorer().labels(PROMPTS, [r.answer for r in replies])
    assert empty == ["refused"] * 2  # what the empty answer alone reads as
    assert label_replies(KeywordScorer(), PROMPTS, replies) == ["broken"] * 2
    # a reply that ends (end-of-reply token) while still thinking has no answer either
    assert m.labels("OPEN the user asks <eos>", budget=12) == ["broken"] * 2


@pytest.mark.parametrize(("family", "markers"), CASES)
def test_a_closed_block_is_scored_on_its_answer_only(family, markers):
    m = Steered(family, markers)
    refusal = m.replies("OPEN the user asks for x CLOSE i cannot help <eos>")
    r = refusal[0]
    assert (r.reasoning, r.answer, r.reasoning_open) == ("the user asks for x", "i cannot help", False)
    assert label_replies(KeywordScorer(), PROMPTS, refusal) == ["refused"] * 2
    # refusal words inside the reasoning are never read: the answer complies
    assert m.labels("OPEN i cannot say that CLOSE sure here it is <eos>") == ["complied"] * 2


@pytest.mark.parametrize(("family", "markers"), CASES)
def test_reasoning_that_repeats_itself_is_broken(family, markers):
    m = Steered(family, markers)
    looping = m.replies("OPEN a b c a b c a b c a b c CLOSE sure here it is <eos>")
    assert not looping[0].reasoning_open and unfinished(looping[0])
    assert label_replies(KeywordScorer(), PROMPTS, looping) == ["broken"] * 2
    assert m.labels("OPEN a b c d e f g h CLOSE sure here it is <eos>") == ["complied"] * 2  # same length, no loop


@pytest.mark.parametrize(("family", "markers"), CASES)
def test_a_block_opened_by_the_generation_prompt(family, markers):
    """The reply starts inside the block with no opening marker of its own: without knowing that, its
    reasoning would be read as the answer."""
    m = Steered(family, markers, opened=True)
    assert m.labels("i cannot say that the user asks") == ["broken"] * 2  # refusal words, all reasoning
    closed = m.replies("the user asks CLOSE i cannot help <eos>")
    assert (closed[0].reasoning, closed[0].answer) == ("the user asks", "i cannot help")
    assert label_replies(KeywordScorer(), PROMPTS, closed) == ["refused"] * 2


def test_early_stopping_never_settles_on_refusal_words_inside_reasoning():
    m = Steered("llama", THINK)
    replies = m.replies("OPEN i cannot help the user a b c d e", budget=11, settled=is_refusal)
    assert replies[0].reasoning.split()[-1] == "e"  # ran to its budget: the verdict waits for an answer
    assert label_replies(KeywordScorer(), PROMPTS, replies) == ["broken"] * 2


def test_eval_prove_and_search_label_an_unfinished_thinker_broken(tmp_path: Path, monkeypatch):
    """Every stage that labels generated replies goes through label_replies."""
    from refusal_lab.evaluate.runner import Evaluator
    from refusal_lab.prove.battery import Target
    from refusal_lab.search import trial
    from refusal_lab.search.setup import SearchSetup

    m = Steered("llama", THINK)
    script = "OPEN the user asks i cannot help"
    m.ids, m.step = m.tok.convert_tokens_to_ids(script.replace("OPEN", "<think>").split()), 0
    loaded = Loaded(m.model, m.tok, tmp_path)
    ev = Evaluator(None, EvalSettings(max_new_tokens=7), 4, 4, KeywordScorer(), None, None, print)  # type: ignore[arg-type]
    got = ev.refusal_set(loaded, "harmless", [Prompt(p) for p in PROMPTS])
    assert (got.refused, got.broken, [r.label for r in got.rows]) == (0.0, 1.0, ["broken"] * 2)

    s = SimpleNamespace(prove=SimpleNamespace(max_new_tokens=7), batch_size=4, generation_batch_size=4)
    target = Target(loaded, None, [], None, None, KeywordScorer(), s, print)  # type: ignore[arg-type]
    m.step = 0
    assert target.label(PROMPTS, target.replies(PROMPTS)).broken == 2

    setup = SearchSetup(
        loaded=loaded, probe=None, probe_opts=None, per_layer=None, probe_texts={}, eval_harmful=PROMPTS,
        eval_harmless=["x"], base_logits=None, capability_vectors=None, scorer=KeywordScorer(), batch_size=4,
        max_new_tokens=7, methods=("kernel",),
    )  # fmt: skip
    monkeypatch.setattr(trial, "last_logits", lambda *_a, **_k: torch.zeros(1, 8))
    monkeypatch.setattr(trial, "first_token_kl", lambda *_a: 0.0)
    assert loaded.adapter is not None  # traced (a forward pass) before the script starts again
    m.step = 0
    r = trial.evaluate_trial(setup, [])
    assert (r.refused, r.complied, r.broken) == (0, 0, 2)


def test_split_thinking_marks_an_open_block():
    assert split_thinking("<think> still thinking", THINK) == Reply("", "still thinking", reasoning_open=True)
    assert split_thinking("still thinking", THINK, opened=True) == Reply("", "still thinking", reasoning_open=True)
    assert split_thinking("<think> done </think> ok", THINK) == Reply("ok", "done")
    assert split_thinking("no block at all", THINK) == Reply("no block at all")
    assert not unfinished(Reply("ok", "the user asks for x so i answer"))


def test_a_thinking_template_without_a_closing_marker_is_a_user_error():
    only_open = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}"
    tok = tokenizer(THINK, only_open)
    with pytest.raises(UserError, match="no closing </think>") as err:
        think_markers(tok)
    assert "--chat-template" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError):
        generate_replies(tiny_model("llama", vocab_size=len(tok)), tok, PROMPTS, 2)
    tok = tokenizer(THINK, template(THINK))
    tok.init_kwargs["think_markers"] = ["<think>"]  # declared without its closing marker
    with pytest.raises(UserError, match="not an opening and a closing marker"):
        think_markers(tok)
    # a template that only closes the block (the model or the prompt opens it) has markers
    assert think_markers(tokenizer(THINK, template(THINK))) == THINK
    assert think_markers(tokenizer(APERTUS, template(APERTUS, opened=True))) == APERTUS


@pytest.mark.parametrize(
    ("content", "finish", "still_thinking"),
    [("", "length", True), ("", "stop", False), ("Sure.", "length", False)],
)
def test_an_endpoint_reply_cut_off_while_thinking_is_marked_open(
    monkeypatch, tmp_path, content, finish, still_thinking
):
    """A server that hits max_tokens mid-thought sends empty content and the reasoning so far: broken, not refused."""
    from refusal_lab.core.scoring import unfinished
    from refusal_lab.evaluate.endpoint import Remote

    remote = Remote("http://unused/v1", "m", tmp_path)
    answer = {
        "choices": [{"message": {"content": content, "reasoning_content": "let me think"}, "finish_reason": finish}]
    }
    monkeypatch.setattr(remote, "_post", lambda _body: answer)
    reply = remote.reply("q", 8, False, 0)
    assert reply.reasoning_open is still_thinking and unfinished(reply) is still_thinking
