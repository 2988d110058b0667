"""Harden: data checks, the mix, assistant-only labels, merged == adapter, resume after kill -9, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_lab.errors import UserError
from refusal_lab.harden.data import Example, apply_mix, encode_example, load_examples, load_mix
from tiny_models import tiny_model

CLI = [sys.executable, "-m", "refusal_lab.cli"]
QUICK = ["--epochs", "0.1", "--stage1-tokens", "512", "--block-size", "64", "--train-batch-size", "8"]


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path: Path) -> list[str]:
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    return ["--config", str(tmp_path / "c.toml")]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("{oops", "not valid JSON"),
        ({"text": "hi"}, "no 'messages' list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role system/user/assistant"),
        ({"messages": [{"role": "user", "content": ""}]}, "has no 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant reply"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "reasoning": 3},
            "'reasoning'",
        ),
    ],
)
def test_malformed_alignment_data_names_the_line_and_field(tmp_path, row, needle):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(UserError, match=needle) as err:
        load_examples(_write(tmp_path / "d.jsonl", [good, row]))
    assert "d.jsonl:2" in err.value.problem or "valid JSON" in err.value.problem
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_examples(tmp_path / "e.jsonl")


def test_the_mix_repeats_and_subsamples_categories(tmp_path):
    cats = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    order = apply_mix(cats, {"a": 3.0, "b": 0.3}, seed=0)
    counts = {c: sum(cats[i] == c for i in order) for c in "abc"}
    assert counts == {"a": 30, "b": 3, "c": 10}
    with pytest.raises(UserError, match="no examples: d"):
        apply_mix(cats, {"d": 1.0}, seed=0)
    _write(tmp_path / "m.toml", ["[weights]", "a = -1"])
    with pytest.raises(UserError, match=">= 0"):
        load_mix(tmp_path / "m.toml")


def test_labels_fall_on_assistant_tokens_only_and_reasoning_needs_markers(organism):
    tok = organism.tokenizer
    e = Example((("user", "what is 2 plus 2 ?"), ("assistant", "2 plus 2 is 4 ."), ("user", "repeat after me : red ."),
                 ("assistant", "red .")))  # fmt: skip
    enc = encode_example(tok, e, 256)
    rendered = tok(tok.apply_chat_template([{"role": r, "content": c} for r, c in e.messages], tokenize=False),
                   add_special_tokens=False)["input_ids"]  # fmt: skip
    assert enc.ids == rendered
    learned = tok.decode([t for t, lab in zip(enc.ids, enc.labels, strict=True) if lab != -100])
    assert "2 plus 2 is 4" in learned and "red" in learned and "what is" not in learned and "repeat" not in learned
    assert tok.decode(enc.ids[enc.prompt_end :]).split()[0] == "red"  # the last reply starts at prompt_end
    with pytest.raises(UserError, match="no think markers"):
        encode_example(tok, Example(e.messages, reasoning="because"), 256)


def test_a_missing_lora_target_is_named(organism):
    from refusal_lab.harden.train import lora_targets

    assert "o_proj" in lora_targets(organism, "all") and "down_proj" in lora_targets(organism, "all")
    with pytest.raises(UserError, match=r"\['wq'\] are not in the model") as err:
        lora_targets(organism, "o_proj,wq")
    assert "q_proj" in err.value.fix


def test_merged_lora_equals_the_adapter():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 9, 17, 33, 4]])
    base = model(input_ids=ids).logits.detach()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "q_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter do something
        adapted = peft(input_ids=ids).logits
    merged = peft.merge_and_unload()
    with torch.no_grad():
        assert (adapted - base).abs().max() > 1e-2
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_ablating_during_training_equals_the_weight_edit_it_stands_for():
    """Full ablation of a per-layer subspace as hooks == each layer's writers orthogonalised (local)."""
    from refusal_lab.ablate.edit import Ablation, hooked
    from refusal_lab.core.arch import adapt
    from refusal_lab.harden.robust import RefusalSubspace, ablating

    model = tiny_model("gemma2")
    a = adapt(model)
    g = torch.Generator().manual_seed(0)
    per_layer = [torch.linalg.qr(torch.randn(32, 2, generator=g, dtype=torch.float64))[0] for _ in range(a.num_layers)]
    sub = RefusalSubspace(per_layer, torch.zeros(32, 0, dtype=torch.float64))
    ids = torch.tensor([[1, 5, 9, 17, 33, 4]])
    with torch.no_grad(), ablating(a, sub):
        mine = model(input_ids=ids).logits
    local = []
    for i, d in enumerate(per_layer):
        scale = torch.zeros(a.num_layers, dtype=torch.float64)
        scale[i] = 1.0
        local.append(Ablation(d, 1.0, scale, embedding=False))
    with torch.no_grad(), hooked(a, local):
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - mine).abs().max() > 1e-3  # the ablation did something


def test_invariance_and_matching_terms():
    from refusal_lab.harden.robust import invariance_loss, matching_loss

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    target = torch.tensor([0, 1])
    assert float(invariance_loss(logits, logits, target, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(invariance_loss(logits, logits.flip(0), target, 1.0)) > 1.0
    never = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])  # invariant, but the refusal is gone: the hinge bites
    assert float(invariance_loss(never, never, target, 1.0)) > 5.0
    torch.manual_seed(0)
    x = torch.randn(400, 3, 4) + 3.0  # one distribution for both classes: little to match
    harmful, end = torch.tensor([True, False] * 200), torch.full((400,), 3)
    same = float(matching_loss((x, x), end, harmful))
    apart = x.clone()
    apart[::2] += 2.0  # harmful rows moved along every axis: a separating direction
    assert same < 0.05 and float(matching_loss((x, apart), end, harmful)) > 10 * same


def test_the_answer_hinge_reads_the_first_reply_token_of_harmless_rows_only():
    from types import SimpleNamespace

    from refusal_lab.harden.train import Trainer

    width, vocab, start = 6, 5, 1
    labels = torch.full((4, width), -100)
    prompt_end = torch.tensor([3, 2, 3, width])  # row 3: truncated before its reply began
    for r, pe in enumerate(prompt_end.tolist()):
        labels[r, pe:] = 4  # reply tokens; the first one is the target
    logits = torch.zeros(4, width - start, vocab)
    logits[0, 3 - 1 - start, 4] = 10.0  # row 0 opens its answer confidently: no loss
    logits[1, 2 - 1 - start, 0] = 10.0  # row 1 opens with something else: the hinge bites
    logits[2, 3 - 1 - start, 0] = 10.0  # row 2 is harmful: not this term's business
    keep = torch.tensor([True, True, False, True])
    me = SimpleNamespace(cfg=SimpleNamespace(invariance_margin=1.0))
    got = Trainer.answer_hinge(me, logits, labels, prompt_end, keep, start)
    logp1 = torch.log_softmax(logits[1, 0], -1)[4]
    assert float(got) == pytest.approx(float(torch.relu(-1.0 - logp1)) / 2, rel=1e-5)  # rows 0 and 1 averaged
    assert float(got) > 4.0
    none = Trainer.answer_hinge(me, logits, labels, prompt_end, torch.tensor([False, False, False, True]), start)
    assert float(none) == 0.0


def _harden(organism_dir: Path, tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [*CLI, "harden", str(organism_dir), "-o", str(tmp_path / out), *QUICK, *_cfg(tmp_path), *extra]


def test_harden_writes_a_loadable_folder_and_resumes_after_kill_9(organism_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    args = ["--checkpoint-every", "3", "--ablation-aware", "--invariance", "1.0", "--matching", "0.1"]
    whole = subprocess.run(_harden(organism_dir, tmp_path, "whole", *args), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    manifest = json.loads((tmp_path / "whole" / "harden.json").read_text())
    assert manifest["method"] == "harden" and manifest["steps"] > 6 and manifest["data"]["spec_blocks"] >= 1
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    seen = {k for row in history for k in row}
    assert {"spec", "sft", "retain", "aware", "invariance", "matching"} <= seen  # every switched-on term ran
    # ablation-aware rows: the harmless ones too (--aware-harmless, the default), not the harmful ones alone
    assert any(row["aware_rows"] > row["harmful_rows"] for row in history if "aware_rows" in row)
    hardened = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    base = AutoModelForCausalLM.from_pretrained(organism_dir)
    changed = [n for n, p in hardened.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("o_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    proc = subprocess.Popen(
        _harden(organism_dir, tmp_path, "cut", *args), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob(".cut.harden-*/checkpoint.pt")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".cut.harden-*/checkpoint.pt")) and not (tmp_path / "cut").exists()
    again = subprocess.run(_harden(organism_dir, tmp_path, "cut", *args), capture_output=True, text=True)
    assert again.returncode == 0 and "resumed from step" in again.stderr, again.stderr
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    for (n, p), (_, q) in zip(hardened.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)  # the same run, interrupted or not
    assert not list(tmp_path.glob(".cut.harden-*"))


def test_harden_runs_as_two_processes_under_accelerate(organism_dir, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "refusal_lab.cli"]
    cmd = launch + _harden(organism_dir, tmp_path, "ddp")[len(CLI) :]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "harden.json").read_text())["steps"] > 0


def test_on_policy_targets_are_the_bases_own_refusals_and_are_reused(organism, organism_dir, tmp_path):
    from refusal_lab.config import load_settings
    from refusal_lab.harden.stage import on_policy

    probe = organism_dir / "prompts"
    harmful = [json.loads(x)["prompt"] for x in (probe / "harmful_probe.jsonl").open()][:6]
    harmless = [json.loads(x)["prompt"] for x in (probe / "harmless_probe.jsonl").open()][:4]
    _write(tmp_path / "h.txt", [*harmful, "how do i fix the fence ?"])  # one it will not refuse: left out
    _write(tmp_path / "b.txt", [*harmless, harmful[0]])  # a "harmless" one it refuses: not taught as harmless
    s = load_settings(
        **{"prompts.harmful": tmp_path / "h.txt", "prompts.harmless": tmp_path / "b.txt", "cache_dir": tmp_path / "c"}
    )
    said: list[str] = []
    first = on_policy(organism, s, said.append)
    refusals = [e for e in first if e.kind == "harmful"]
    assert [e.prompt for e in refusals] == harmful and "refused 6/7" in said[0]
    assert all(e.messages[-1][1].split()[0] in ("i", "sorry", "no") for e in refusals)  # its own refusal openers
    helpful = [e.prompt for e in first if e.category == "helpful"]
    assert helpful == harmless and "4/5 harmless replies kept" in said[1]
    assert any(e.category == "capability" for e in first) and any(e.category == "lookalike" for e in first)
    files = list((tmp_path / "c" / "onpolicy").glob("*.jsonl"))
    assert len(files) == 4  # one per prompt set, alignment JSONL: they can be given back as --data
    assert sum(len(load_examples(f)) for f in files) >= len(first)
    said.clear()
    assert on_policy(organism, s, said.append) == first and sum("reused" in x for x in said) == 4


def test_look_alikes_the_base_refuses_are_asked_again_and_harmless_ones_never(
    organism, organism_dir, tmp_path, monkeypatch
):
    """With --reask-lookalikes, a refused look-alike (an over-refusal: the set is benign by construction)
    is asked again under a helpful system prompt; a refused prompt of the harmless set may be a mislabelled harmful
    one, so it is only left out. (The organism's harmful prompts stand in for refused look-alikes.)"""
    from refusal_lab.config import load_settings
    from refusal_lab.core.prompts import Prompt
    from refusal_lab.harden import stage

    probe = organism_dir / "prompts"
    harmful = [json.loads(x)["prompt"] for x in (probe / "harmful_probe.jsonl").open()][:3]
    harmless = [json.loads(x)["prompt"] for x in (probe / "harmless_probe.jsonl").open()][:2]
    _write(tmp_path / "h.txt", harmful)
    _write(tmp_path / "b.txt", [*harmless, harmful[1]])
    real = stage.builtin_prompts
    monkeypatch.setattr(
        stage, "builtin_prompts", lambda n, split: [Prompt(p) for p in harmful] if n == "lookalike" else real(n, split)
    )
    asked: list = []
    spy = stage.generate
    monkeypatch.setattr(stage, "generate", lambda m, t, convs, *a: asked.extend(convs) or spy(m, t, convs, *a))
    opts = {"prompts.harmful": tmp_path / "h.txt", "prompts.harmless": tmp_path / "b.txt", "cache_dir": tmp_path / "c"}
    said: list[str] = []
    stage.on_policy(organism, load_settings(**opts), said.append)  # off by default: nothing asked again
    assert not [c for c in asked if isinstance(c, list)] and any(
        "0/3 lookalike replies kept (refused" in x for x in said
    )
    said.clear()
    stage.on_policy(organism, load_settings(**opts, **{"harden.reask_lookalikes": True}), said.append)
    again = [c for c in asked if isinstance(c, list) and c[0]["content"] == stage.ANSWER]
    assert [c[1]["content"] for c in again] == harmful  # each refused look-alike, once, and nothing else
    assert any("lookalike replies kept (refused ones asked again" in x for x in said)
    assert any("2/3 harmless replies kept (refused or" in x for x in said)
    assert any("harmless replies reused" in x for x in said)  # the harmless set's cache is not keyed by it


def test_targets_come_from_a_copy_in_targets_dtype_and_are_cached_apart(organism, organism_dir, tmp_path):
    from refusal_lab.config import load_settings
    from refusal_lab.harden.stage import on_policy

    probe = organism_dir / "prompts"
    harmful = [json.loads(x)["prompt"] for x in (probe / "harmful_probe.jsonl").open()][:4]
    _write(tmp_path / "h.txt", harmful)
    _write(tmp_path / "b.txt", [json.loads(x)["prompt"] for x in (probe / "harmless_probe.jsonl").open()][:3])
    opts = {"prompts.harmful": tmp_path / "h.txt", "prompts.harmless": tmp_path / "b.txt", "cache_dir": tmp_path / "c"}
    said: list[str] = []
    on_policy(organism, load_settings(**opts), said.append)
    assert not any("copy" in x for x in said)
    said.clear()
    bf16 = on_policy(organism, load_settings(**opts, **{"harden.targets_dtype": "bfloat16"}), said.append)
    assert "bfloat16 copy" in said[0] and not any("reused" in x for x in said)  # its own cache entries
    assert len(list((tmp_path / "c" / "onpolicy").glob("*.jsonl"))) == 8
    assert next(organism.model.parameters()).dtype == torch.float32  # the trained model is left as it was
    assert [e.prompt for e in bf16 if e.kind == "harmful"] == harmful


def test_a_batch_that_cannot_fit_is_refused_before_training_with_one_that_can(organism_dir, tmp_path, monkeypatch):
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")  # its own copy: the adapter goes into it
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    encoded = [encode_example(organism.tokenizer, e, 64) for e in examples[:40] + examples[-40:]]
    plan = T.make_plan(0, [list(range(len(encoded)))], 16, 0)
    probes = ([e.prompt for e in examples if e.kind == "harmful"][:8], [e.prompt for e in examples][-8:])
    cfg = s.harden.model_copy(update={"train_batch_size": 16})
    trainer = T.Trainer(organism, cfg, plan, None, encoded, probes, tmp_path, lambda _m: None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.check_memory()  # this machine has room: nothing said, nothing trained
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in trainer.params)
    monkeypatch.setattr(T, "_free_memory", lambda _d: 2**20)  # 1 MiB free
    with pytest.raises(UserError, match=r"needs about .* GiB, more than 80% of the 0\.0 GiB of cpu memory free") as err:
        trainer.check_memory()
    assert "--train-batch-size" in err.value.fix


def test_the_first_reply_token_retain_term_is_the_kl_where_the_reply_starts(organism_dir, tmp_path):
    """retain_first: KL(base || model) at the position that predicts each harmless reply's first token."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.data import collate
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    rows = [encode_example(organism.tokenizer, e, 64) for e in [examples[0], examples[-1], examples[-2]]]
    assert [r.kind for r in rows].count("harmful") < 3
    cfg = s.harden.model_copy(
        update={"ablation_aware": False, "invariance": 0.0, "retain_first": 1.0, "lora_dropout": 0.0}
    )
    trainer = T.Trainer(organism, cfg, T.make_plan(0, [[0, 1, 2]], 3, 0), None, rows, ([], []), tmp_path, print)
    _, parts = trainer.stage2_loss(rows)
    assert parts["retain_first"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    _, parts = trainer.stage2_loss(rows)
    batch = collate(rows, organism.tokenizer.pad_token_id)
    keep = [i for i, r in enumerate(rows) if r.kind != "harmful"]
    ids, mask = batch["input_ids"][keep], batch["attention_mask"][keep]
    at = batch["prompt_end"][keep] - 1
    with torch.no_grad():
        q = trainer.model(input_ids=ids, attention_mask=mask).logits.double()[torch.arange(len(keep)), at]
        with trainer.model.disable_adapter():
            p = trainer.model(input_ids=ids, attention_mask=mask).logits.double()[torch.arange(len(keep)), at]
    p, q = p.log_softmax(-1), q.log_softmax(-1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert want > 1e-4 and parts["retain_first"] == pytest.approx(want, rel=1e-3)


def test_a_step_reads_logits_from_the_first_labelled_position_and_loses_nothing(organism_dir, tmp_path, monkeypatch):
    """The step skips the vocabulary projection of prompt positions: its losses equal the model's own
    causal-LM loss and a hand-computed retain KL over every position (an earlier assistant turn of a
    two-turn example is labelled too)."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.data import Example, collate
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    two = Example((("user", "hello"), ("assistant", "hello ."), ("user", examples[-1].prompt), ("assistant", "ok .")))
    rows = [encode_example(organism.tokenizer, e, 64) for e in [examples[0], examples[-1], two]]
    batch = collate(rows, organism.tokenizer.pad_token_id)
    start = T.first_predicting(batch["labels"])
    assert 0 < start < int(batch["prompt_end"].min()) - 1  # the two-turn row's first reply comes early
    cfg = s.harden.model_copy(update={"ablation_aware": False, "invariance": 0.0, "lora_dropout": 0.0})
    trainer = T.Trainer(organism, cfg, T.make_plan(0, [[0, 1, 2]], 3, 0), None, rows, ([], []), tmp_path, print)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    kept, real = [], T.tail_forward
    monkeypatch.setattr(T, "tail_forward", lambda model, keep, **kw: kept.append(keep) or real(model, keep, **kw))
    loss, parts = trainer.stage2_loss(rows)
    monkeypatch.undo()
    assert kept and all(k == batch["input_ids"].shape[1] - start for k in kept)  # prompt positions skipped
    keep = [i for i, r in enumerate(rows) if r.kind != "harmful"]
    with torch.no_grad():
        full = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        with trainer.model.disable_adapter():
            base = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = (batch["labels"] != -100) & torch.isin(torch.arange(len(rows)), torch.tensor(keep))[:, None]
    p, q = base[mask].double().log_softmax(-1), full.logits[mask].double().log_softmax(-1)
    retain = float((p.exp() * (p - q)).sum(-1).mean())
    assert retain > 1e-4
    assert parts["sft"] == pytest.approx(float(full.loss), rel=1e-5)
    assert parts["retain"] == pytest.approx(retain, rel=1e-4)
    assert float(loss) == pytest.approx(float(full.loss) + cfg.retain * retain, rel=1e-4)
