"""Harden: data checks, the mix, assistant-only labels, merged == adapter, resume after a fault, two processes
equal one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_process import CLI, run_cli
from refusal_lab.errors import UserError
from refusal_lab.harden.data import Example, apply_mix, encode_example, load_examples, load_mix
from tiny_models import tiny_model

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
    from refusal_lab.harden.lora import lora_targets

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


def test_invariance_term():
    from refusal_lab.harden.robust import invariance_loss

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    target = torch.tensor([0, 1])
    assert float(invariance_loss(logits, logits, target, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(invariance_loss(logits, logits.flip(0), target, 1.0)) > 1.0
    never = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])  # invariant, but the refusal is gone: the hinge bites
    assert float(invariance_loss(never, never, target, 1.0)) > 5.0


def _harden(organism_dir: Path, tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [*CLI, "harden", str(organism_dir), "-o", str(tmp_path / out), *QUICK, *_cfg(tmp_path), *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())


@pytest.mark.slow
def test_harden_writes_a_loadable_folder_and_resumes_after_a_fault_at_step_3(organism_dir, tmp_path):
    """A run ended by fault injection right after step 3's checkpoint resumes there and ends where an
    uninterrupted run ends; harden.json reads back as the typed record."""
    from refusal_lab.core.faults import FAULT_ENV, FAULT_EXIT_CODE
    from refusal_lab.core.prompts import prompt_hash, trained_prompts
    from refusal_lab.harden.record import HardenRecord

    args = ["--checkpoint-every", "3", "--ablation-aware", "--invariance", "1.0"]
    clean = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    whole = run_cli(_harden(organism_dir, tmp_path, "whole", *args), env=clean)
    assert whole.returncode == 0, whole.stderr
    raw = json.loads((tmp_path / "whole" / "harden.json").read_text())
    record = HardenRecord.read(tmp_path / "whole")
    assert record.to_json() == raw  # every field of the file, and no other, in the typed record
    align = [json.loads(line) for line in (organism_dir / "harden" / "align.jsonl").read_text().splitlines()]
    asked = {prompt_hash(m["content"]) for r in align for m in r["messages"] if m["role"] == "user"}
    assert trained_prompts(tmp_path / "whole") == asked  # what prove and eval will not report on
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert record.steps == len(history) > 6 and record.data.spec_blocks >= 1 and record.final_losses == history[-1]
    seen = {k for row in history for k in row}
    assert {"spec", "sft", "retain", "aware", "invariance"} <= seen  # every switched-on term ran
    # ablation-aware rows: the harmless ones too (--aware-harmless, the default), not the harmful ones alone
    assert any(row["aware_rows"] > row["harmful_rows"] for row in history if "aware_rows" in row)
    hardened, base = _weights(tmp_path / "whole"), _weights(organism_dir)
    changed = [n for n, p in hardened.items() if not torch.equal(p, base[n])]
    assert any("o_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    cmd = _harden(organism_dir, tmp_path, "cut", *args)
    cut = run_cli(cmd, env={**clean, FAULT_ENV: "3"})
    assert cut.returncode == FAULT_EXIT_CODE, cut.stderr
    assert list(tmp_path.glob(".cut.harden-*/checkpoint.pt")) and not (tmp_path / "cut").exists()
    again = run_cli(cmd, env=clean)
    assert again.returncode == 0 and "resumed from step 3 of" in again.stderr, again.stderr
    resumed = _weights(tmp_path / "cut")
    for n, p in hardened.items():
        torch.testing.assert_close(p, resumed[n], atol=1e-6, rtol=1e-5, msg=n)  # the same run, interrupted or not
    assert not list(tmp_path.glob(".cut.harden-*"))


@pytest.mark.slow
def test_two_processes_on_halves_take_the_step_one_process_takes_on_the_batch(organism_dir, tmp_path):
    """Two processes (each on every other example, weighing its loss by its share of the batch's tokens
    and rows, gradients averaged) write the weights one process writes. Dropout off and every ablation
    full: the terms that draw at random per row draw differently in a share. torchrun starts the two
    processes (`accelerate launch --cpu` starts one, whatever --num_processes says)."""
    same = ["--lora-dropout", "0", "--full-ablation", "1"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launch, *_harden(organism_dir, tmp_path, "ddp", *same)[1:]]  # -m refusal_lab.cli harden ...
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "training in 2 processes" in two.stderr, two.stderr[-3000:]
    one = run_cli(_harden(organism_dir, tmp_path, "one", *same))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp, single, base = _weights(tmp_path / "ddp"), _weights(tmp_path / "one"), _weights(organism_dir)
    moved = max(float((single[n] - base[n]).abs().max()) for n in base)
    gap = max(float((single[n] - ddp[n]).abs().max()) for n in base)
    assert moved > 1e-3 and gap < 1e-3 * moved, (moved, gap)


def test_two_shards_averaged_give_the_gradient_of_the_whole_batch(organism_dir, tmp_path):
    """In one process: the gradients of two shares of a batch, each weighed by its share and averaged as
    the processes average them, equal the whole batch's gradient, with sft, retain, ablation-aware and
    invariance on. Unweighted (each share's own means), they do not: the shares' tokens and harmful rows differ."""
    import random

    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.losses import Counts
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    harmful = [e for e in examples if e.kind == "harmful"]
    harmless = [e for e in examples if e.kind != "harmful"]
    picked = [harmful[0], harmless[0], harmful[5], harmless[7], harmless[-2], harmless[-1]]
    rows = [encode_example(organism.tokenizer, e, 96) for e in picked]
    halves = [T.shard(rows, i, 2) for i in range(2)]
    a, b = Counts.of(halves[0]), Counts.of(halves[1])
    assert a.tokens != b.tokens and a.harmful_rows == 2 and b.harmful_rows == 0  # uneven shares, one without refusals
    cfg = s.harden.model_copy(update={"lora_dropout": 0.0, "full_ablation": 1.0, "reestimate_every": 1000})
    probes = ([e.prompt for e in harmful][:8], [e.prompt for e in harmless][:8])
    trainer = T.Trainer(organism, cfg, T.make_plan(0, [[0]], 6, 0), None, rows, probes, tmp_path, print)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero: give every LoRA weight a gradient

    def grads(rows: list, whole: Counts | None, processes: int) -> list[torch.Tensor]:
        trainer.opt.zero_grad(set_to_none=True)
        loss, parts = trainer.loss(rows, trainer.subspace, random.Random(0), whole, processes)
        assert whole is None or "aware" in parts  # a share of a batch with refusals: all rows take the aware term
        loss.backward()
        return [p.grad.clone() for p in trainer.params]

    assert {"sft", "retain", "aware", "invariance"} <= set(trainer.stage2_loss(rows)[1])  # (estimates the subspace)
    want = grads(rows, None, 1)
    other = grads(halves[1], Counts.of(rows), 2)
    grads(halves[0], Counts.of(rows), 2)
    rest = iter(other)
    T.average_gradients(trainer.params, lambda g: (g + next(rest)) / 2)  # what reduce(mean) does over two processes
    for w, p in zip(want, trainer.params, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7)
    naive = [(x + y) / 2 for x, y in zip(grads(halves[0], None, 1), grads(halves[1], None, 1), strict=True)]
    worst = max(float((x - w).abs().max() / w.abs().max()) for x, w in zip(naive, want, strict=True))
    assert worst > 1e-2  # the test can tell weighed shares from plain ones


def test_right_padded_batches_pad_ids_mask_and_labels():
    from refusal_lab.core.batches import right_padded

    b = right_padded([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cut = right_padded([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0, max_len=2)
    assert cut["input_ids"].tolist() == [[5, 6], [8, 0]] and cut["labels"].tolist() == [[-100, 6], [8, -100]]


def test_a_harmful_reply_cut_away_by_max_length_is_left_out_of_invariance(organism_dir, tmp_path):
    """A harmful example whose reply the length limit cut away has no first reply token to compare: the
    invariance term reads the other harmful rows (it once indexed past the row's end)."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    harmful = [e for e in examples if e.kind == "harmful"][:2]
    whole = [encode_example(organism.tokenizer, e, 96) for e in [*harmful, examples[-1]]]
    short = encode_example(organism.tokenizer, harmful[0], whole[0].prompt_end)  # the reply cut away
    assert short.prompt_end == len(short.ids)
    rows = [short, *whole[1:]]
    cfg = s.harden.model_copy(update={"lora_dropout": 0.0, "full_ablation": 1.0})
    probes = ([e.prompt for e in examples if e.kind == "harmful"][:8], [examples[-1].prompt] * 8)
    trainer = T.Trainer(organism, cfg, T.make_plan(0, [[0, 1, 2]], 3, 0), None, rows, probes, tmp_path, print)
    _, parts = trainer.stage2_loss(rows)
    _, alone = trainer.stage2_loss(whole[1:])  # the same term on the surviving harmful row alone
    assert parts["invariance"] == pytest.approx(alone["invariance"], rel=1e-4)


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
    from refusal_lab.harden import memory
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
    monkeypatch.setattr(memory, "free_memory", lambda _d: 2**20)  # 1 MiB free
    with pytest.raises(UserError, match=r"needs about .* GiB, more than 80% of the 0\.0 GiB of cpu memory free") as err:
        trainer.check_memory()
    assert "--train-batch-size" in err.value.fix


def test_a_step_reads_logits_from_the_first_labelled_position_and_loses_nothing(organism_dir, tmp_path, monkeypatch):
    """The step skips the vocabulary projection of prompt positions: its losses equal the model's own
    causal-LM loss and a hand-computed retain KL over every position (an earlier assistant turn of a
    two-turn example is labelled too)."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import losses as L
    from refusal_lab.harden import train as T
    from refusal_lab.harden.data import Example
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    two = Example((("user", "hello"), ("assistant", "hello ."), ("user", examples[-1].prompt), ("assistant", "ok .")))
    rows = [encode_example(organism.tokenizer, e, 64) for e in [examples[0], examples[-1], two]]
    b = L.Stage2Batch.of(rows, organism.tokenizer.pad_token_id, torch.device("cpu"))
    batch = b.tensors
    start = L.first_predicting(batch["labels"])
    assert 0 < start < int(b.prompt_end.min()) - 1  # the two-turn row's first reply comes early
    cfg = s.harden.model_copy(update={"ablation_aware": False, "invariance": 0.0, "lora_dropout": 0.0})
    trainer = T.Trainer(organism, cfg, T.make_plan(0, [[0, 1, 2]], 3, 0), None, rows, ([], []), tmp_path, print)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    kept, real = [], L.tail_forward
    monkeypatch.setattr(L, "tail_forward", lambda model, keep, **kw: kept.append(keep) or real(model, keep, **kw))
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


def test_help_shows_the_ablation_study_options_apart_and_not_the_removed_ones():
    from typer.testing import CliRunner

    from refusal_lab.cli import commands  # noqa: F401  (registers the commands)
    from refusal_lab.cli.app import app

    shown = CliRunner().invoke(app, ["harden", "--help"], env={"COLUMNS": "200"}, terminal_width=200).output
    assert "Experimental" in shown
    panel = shown[shown.index("Experimental") :]
    assert "--extended-refusals" in panel and "--invariance " not in panel
    assert not any(f in shown for f in ("--retain-first", "--answer-hinge", "--reask-lookalikes", "--matching"))


def test_a_second_estimation_pass_adds_directions_found_with_the_first_removed(organism_dir, tmp_path):
    """--aware-passes 2 (SABER's passes, adaptive re-extraction): the first pass's subspace and more."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    harmful = [e.prompt for e in examples if e.kind == "harmful"][:16]
    probes = (harmful, [e.prompt for e in examples if e.kind != "harmful"][:16])
    rows = [encode_example(organism.tokenizer, examples[0], 96)]
    subs = []
    for passes in (1, 2):
        cfg = s.harden.model_copy(update={"aware_passes": passes, "aware_directions": 2})
        plan = T.make_plan(0, [[0]], 1, 0)
        trainer = T.Trainer(organism, cfg, plan, None, rows, probes, tmp_path / str(passes), print)
        trainer.reestimate()
        subs.append(trainer.subspace)
        organism.model = trainer.model.unload()  # the next trainer wraps the plain model again
    one, two = subs
    assert two.global_dirs.shape[1] == 2 * one.global_dirs.shape[1]
    for a, b in zip(one.per_layer, two.per_layer, strict=True):
        assert b.shape[1] > a.shape[1]  # new directions, not the first pass's again
        torch.testing.assert_close(b @ (b.T @ a), a, atol=1e-6, rtol=0)  # and the first pass's kept


def test_a_small_batch_still_estimates_the_subspace_once_per_reestimate_every_steps(organism_dir, tmp_path):
    """At batch 1 most steps hold no harmful example. An estimate is due at the first step since each
    multiple of reestimate_every whose batch holds one (not only at the multiples themselves, which
    would skip every window whose first step is harmless), and exactly once per window."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.model import load
    from refusal_lab.harden import train as T
    from refusal_lab.harden.stage import harden_inputs

    organism = load(organism_dir, dtype="float32", device="cpu")
    s = load_settings(**{"cache_dir": tmp_path / "cache"})
    examples, _, _ = harden_inputs(organism, s, print)
    harmful = next(e for e in examples if e.kind == "harmful")
    harmless = next(e for e in examples if e.kind != "harmful")
    rows = [encode_example(organism.tokenizer, e, 96) for e in (harmless, harmful)]
    order = [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]  # harmful at steps 2, 7 and 8 (of 2 spec steps, then these)
    cfg = s.harden.model_copy(update={"reestimate_every": 4})
    trainer = T.Trainer(organism, cfg, T.make_plan(2, [order], 1, 0), None, rows, ([], []), tmp_path, print)
    due = [step for step in range(trainer.plan.total) if trainer.estimates_at(step)]
    # windows [0, 4), [4, 8), [8, 12), [12, 14): the first harmful step in each (the spec steps 0-1 never);
    # estimating only at multiples of 4 that hold a harmful example would give [4], skipping [8, 12)
    assert due == [4, 9]
