"""Greedy decoding whose batch shrinks as replies finish: the same ids as `model.generate`, fewer rows."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.core.generate import (
    _finish_unshrunk,
    encode,
    greedy_shrinking,
    headed,
    plain_greedy,
    prompt_forward,
    shared_head,
)
from tiny_models import FAMILIES, tiny_model


def _batch(lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded random prompts of different lengths (pad id 0), as `encode` gives them."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, 96, (n,), generator=g)
        mask[i, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _reference(model, batch, n: int, eos: list[int]) -> list[list[int]]:
    with torch.no_grad():
        return _finish_unshrunk(model, batch, n, eos, None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shrinking_greedy_gives_model_generates_ids(family):
    model = tiny_model(family)
    batch = _batch([5, 9, 3, 7])
    ref = _reference(model, batch, 12, [2])
    # an end-of-reply id the model does emit, so rows really leave the batch mid-way
    eos = [ref[1][3]]
    ref = _reference(model, batch, 12, eos)
    with torch.no_grad():
        got = greedy_shrinking(model, batch, 12, eos)
    assert got == ref
    assert len({len(r) for r in got}) > 1  # rows ended at different steps


def test_rows_leave_the_batch_when_done_and_the_rest_are_unchanged():
    model = tiny_model("llama")
    batch = _batch([5, 9, 3, 7])
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        full = greedy_shrinking(model, batch, 10, [-1])  # an id never generated: no row ends
        sizes.clear()
        short = greedy_shrinking(model, batch, 10, [-1], done=lambda ids: len(ids) >= 2 and ids[0] == full[0][0])
    assert sizes[0] == 4 and sizes[-1] < 4  # the batch shrank
    assert short[0] == full[0][:2]  # the finished row stopped where its rule held
    for a, b in zip(short[1:], full[1:], strict=True):
        assert b[: len(a)] == a  # every row is a prefix of its full reply
    # the fallback (model.generate, rows cut afterwards) agrees with the shrinking loop
    rule = lambda ids: len(ids) >= 3  # noqa: E731
    with torch.no_grad():
        assert greedy_shrinking(model, batch, 10, [-1], rule) == _finish_unshrunk(model, batch, 10, [-1], rule)


def test_a_generation_config_that_reshapes_logits_is_not_plain_greedy():
    model = tiny_model("qwen2")
    assert plain_greedy(model)
    model.generation_config.repetition_penalty = 1.1  # as some released instruct models ship
    assert not plain_greedy(model)


def test_prompts_are_batched_by_length_and_returned_in_their_own_order(organism):
    from refusal_lab.core.generate import generate, length_order
    from refusal_lab.core.metrics import last_logits

    prompts = ["how do i make a cake , please , today ?", "hello", "tell me a joke .", "hi"]
    m, tok = organism.model, organism.tokenizer
    order = length_order(tok, prompts)
    assert {prompts[i] for i in order[:2]} == {"hello", "hi"} and order[-1] == 0
    alone = [generate(m, tok, [p], 6, 1)[0] for p in prompts]
    assert generate(m, tok, prompts, 6, 2) == alone  # each reply is its own prompt's
    one = torch.cat([last_logits(m, tok, [p], 1) for p in prompts])
    assert torch.allclose(last_logits(m, tok, prompts, 2), one, atol=1e-4)


def test_replies_continued_from_a_kept_prompt_pass_are_the_replies(organism, monkeypatch):
    """prefill + generate(prefilled=...) gives the same replies as generate alone, in batches of 3,
    and each batch's first tokens are the replies' first tokens (what the search's proxy reads);
    both batch the prompts shortest first and give replies back in the prompts' order."""
    from refusal_lab.core.generate import encode, generate, prefill

    prompts = ["how do i make a cake ?", "tell me a joke .", "what is two plus two ?", "hello", "name a colour ."]
    m, tok = organism.model, organism.tokenizer
    plain = generate(m, tok, prompts, 8, 3)
    passes = prefill(m, tok, prompts, 3)
    assert [len(p.batch["input_ids"]) for p in passes] == [3, 2]
    firsts = [int(t) for p in passes for t in p.first]
    from refusal_lab.core import generate as G

    repeated = []
    real = G.prompt_forward
    monkeypatch.setattr(G, "prompt_forward", lambda *a: repeated.append(1) or real(*a))
    again = generate(m, tok, prompts, 8, 3, prefilled=passes)
    assert again == plain and not repeated  # the kept passes were used, not made again
    with torch.no_grad():
        want = [greedy_shrinking(m, encode(tok, [q], m.device), 1, [-1])[0][0] for q in prompts]
    assert firsts == [want[i] for i in G.length_order(tok, prompts)]  # batched shortest first
    with pytest.raises(ValueError, match="prefilled batches"):
        generate(m, tok, prompts, 8, 2, prefilled=passes)


def _batch_with_head(head: int, lengths: list[int], seed: int = 2) -> dict[str, torch.Tensor]:
    """Left-padded rows that begin with the same `head` ids (a system prompt) and go on apart."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 96, (head,), generator=g)
    width = head + max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n - head :] = torch.cat([shared, torch.randint(3, 96, (n,), generator=g)])
        mask[i, width - n - head :] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shared_head_runs_once_and_each_row_reads_as_it_would_alone(family):
    model = tiny_model(family)
    batch = headed(_batch_with_head(6, [3, 7, 5, 1]))
    assert batch["attention_mask"][:, :6].all() and not batch["attention_mask"].all()  # padded after the head
    widths: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    rows = [ids[mask.bool()][None] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    with torch.no_grad():
        shared = prompt_forward(model, batch).logits[:, -1]
        assert widths == [(1, 6), (4, 7)]  # the head once, then every row from there
        hook.remove()
        alone = torch.cat([model(input_ids=r).logits[:, -1] for r in rows])
        torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
        # greedy replies from the shared pass: each row's own greedy continuation
        got = greedy_shrinking(model, batch, 6, [-1])
        for r, ids in zip(rows, got, strict=True):
            assert _reference(model, {"input_ids": r, "attention_mask": torch.ones_like(r)}, 6, [-1])[0] == ids


def test_a_batch_without_a_long_shared_head_is_left_as_it_is():
    batch = _batch_with_head(2, [3, 7, 5])
    assert headed(batch) is batch


def test_a_chat_batch_keeps_each_prompt_when_its_padding_moves_after_the_shared_head(organism):
    tok = organism.tokenizer
    prompts = ["how do i paint the fence ?", "how do i fix my car ?", "how do i wash the car today ?"]
    batch = encode(tok, prompts, torch.device("cpu"))
    moved = headed(batch)
    assert moved is not batch and shared_head(moved) >= 4  # BOS, the user turn, "how do i"
    for ids, mask, p in zip(moved["input_ids"], moved["attention_mask"], prompts, strict=True):
        assert ids[mask.bool()].tolist() == encode(tok, [p], torch.device("cpu"))["input_ids"][0].tolist()
