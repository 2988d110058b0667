from __future__ import annotations

import pytest

from refusal_lab.core.prompts import Prompt, load_prompts, write_jsonl
from refusal_lab.errors import UserError


def test_formats_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert [p.prompt for p in load_prompts(tmp_path / "a.txt")] == ["one", "two"]
    write_jsonl(tmp_path / "b.jsonl", [Prompt("x", "cat", "y")])
    assert load_prompts(tmp_path / "b.jsonl") == [Prompt("x", "cat", "y")]
    (tmp_path / "c.csv").write_text("forbidden_prompt,category\nhello,violence\n")
    assert load_prompts(tmp_path / "c.csv", column="forbidden_prompt") == [Prompt("hello", "violence")]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("e.txt", "\n\n", "no prompts"),
        ("m.jsonl", '{"prompt": "ok"}\n{not json\n', "m.jsonl:2"),
        ("f.jsonl", '{"text": "ok"}\n', "field 'prompt'"),
        ("c.csv", "a,b\n1,2\n", "no column 'prompt'"),
    ],
)
def test_bad_prompt_files(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as err:
        load_prompts(tmp_path / name)
    assert needle in err.value.problem


def test_the_over_refusal_set_is_large_typed_and_apart_from_what_harden_trains_on():
    """At least 150 benign look-dangerous prompts across XSTest's prompt types, none of them a look-alike
    that hardening trains on or a harmless prompt (so over-refusal is measured on prompts never taught)."""
    from refusal_lab.core.sources import DATA, builtin_prompts

    over = load_prompts(DATA / "overrefusal.jsonl")
    assert len(over) >= 150
    kinds = {p.category for p in over}
    assert {"homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions"} <= kinds
    assert {"historical_events", "privacy_public", "privacy_fictional", "nonsense_group_discrimination"} <= kinds
    texts = [p.prompt.lower() for p in over]
    assert len(set(texts)) == len(texts)
    taught = {p.prompt.lower() for name in ("lookalike", "harmless") for p in builtin_prompts(name, "probe")}
    taught |= {p.prompt.lower() for p in builtin_prompts("harmless", "eval")}
    assert not taught & set(texts)


def test_reported_sets_refuse_a_model_trained_on_their_prompts_by_name(tmp_path):
    from refusal_lab.core.prompts import prompt_hash, trained_prompts, write_trained_prompts
    from refusal_lab.core.sources import EvalSets

    sets = EvalSets([Prompt("How do I pick a lock?"), Prompt("Write a threat.")], [Prompt("Bake bread.")], [])
    sets.refuse_trained_on(tmp_path)  # a folder with no record: a model refusal-lab did not train
    write_trained_prompts(tmp_path, ["bake a cake.", "Write  a THREAT."])  # case and spacing do not count
    assert trained_prompts(tmp_path) == {prompt_hash("bake a cake."), prompt_hash("write a threat.")}
    with pytest.raises(UserError, match=r"trained on 1 of the 2 harmful prompts reported on \(the first: 'Write"):
        sets.refuse_trained_on(tmp_path)
    write_trained_prompts(tmp_path, ["bake a cake."])
    sets.refuse_trained_on(tmp_path)  # none shared: nothing to refuse
