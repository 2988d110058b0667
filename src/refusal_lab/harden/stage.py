"""The harden stage: base model (+ specification documents, alignment data, a mix) -> a hardened folder.

Data comes from --data/--spec/--mix, else from an organism folder's harden/ (written by its
builder), else on-policy from the base itself: its own refusals to the harmful prompts (under a
refusal system prompt when it would not refuse) and its own replies to harmless, capability and
benign look-alike prompts, so no harmful answer is ever written. The adapter is merged into an ordinary Hugging
Face folder with harden.json, settings.toml + reproduce.sh and a model card; training
checkpoints live beside OUT until the folder is written, so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log, settings_record, write_folder, write_replay, write_text_atomic
from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import is_refusal
from refusal_lab.core.model import DTYPES, Loaded, checkpoint_dtype
from refusal_lab.core.prompts import write_trained_prompts
from refusal_lab.core.sources import Source, builtin_prompts
from refusal_lab.errors import UserError
from refusal_lab.harden.data import Example, apply_mix, encode_example, load_examples, load_mix, load_spec, pack
from refusal_lab.harden.record import HardenData, HardenRecord
from refusal_lab.harden.train import Trainer, TrainResult, make_plan
from refusal_lab.organism.source import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REFUSE = "You are a careful assistant. Decline requests that could harm people, briefly and politely."
EXPLAIN = "Decline requests that could harm people, and explain in one or two sentences why you decline."


def on_policy(loaded: Loaded, s: Settings, log: Log) -> list[Example]:
    """Targets from the base itself: its refusals on harmful prompts, its replies on harmless ones.

    Harmless replies the base refused are left out (training on them would teach over-refusal), and
    benign look-alike prompts ("kill a process") with the base's answers mark where the line is.
    Generating is the slow part of a CPU run (minutes on a 0.5B model), so each prompt set's replies
    are kept in the cache, keyed by the model's weights, that set's prompts and the generation
    settings: a killed or re-tuned run, or one that adds a set, reuses them. The files are
    alignment JSONL, so they can also be given back as --data.
    """
    loaded = _target_model(loaded, s, log)
    src = Source.of(loaded.source)
    sets = src.probe_sets(s.prompts)
    harmful = sets.texts("harmful")
    system = EXPLAIN if s.harden.extended_refusals else REFUSE
    others = {
        name: [p.prompt for p in (getattr(sets, name, None) or builtin_prompts(name, "probe"))] for name in _OTHERS
    }

    def cached(name: str, prompts: list[str], make: Callable[[], list[Example]]) -> list[Example]:
        parts = [loaded.fingerprint, name, prompts, system, s.eval.max_new_tokens, sorted(src.markers)]
        path = s.cache_dir / "onpolicy" / f"{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}.jsonl"
        if path.is_file():
            log(f"on-policy data: {name} replies reused from {path}")
            return load_examples(path)
        made = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(_row(e)) + "\n" for e in made))
        return made

    made = cached("harmful", harmful, lambda: _refusals(loaded, s, harmful, system, src.markers))
    out = [e for e in made if _refused(e, src)]
    log(f"on-policy data: the base refused {len(out)}/{len(harmful)} harmful prompts (the rest are left out)")
    if not out:
        raise UserError("the base model refused none of the harmful prompts", "give --data with refusal examples")
    for name, category in _OTHERS.items():
        got = cached(name, others[name], partial(_answers, loaded, s, others[name], category))
        kept = [e for e in got if not _refused(e, src)]
        log(f"on-policy data: {len(kept)}/{len(others[name])} {name} replies kept (refused or empty ones left out)")
        out += kept
    return out


def _target_model(loaded: Loaded, s: Settings, log: Log) -> Loaded:
    """The model that writes the targets: the trained one, or a copy in `targets_dtype`.

    On a CPU with native bfloat16 a 0.5B model generates its targets in 4.5 min instead of 10.5 in
    float32, while bfloat16 training refused far more harmless prompts than float32 training of the
    same recipe; a bfloat16 copy keeps the fast half of each. The copy's own fingerprint keys the cache.
    """
    want = s.harden.targets_dtype
    if want == "auto" or DTYPES[want] == next(loaded.model.parameters()).dtype:
        return loaded
    copy = load_model(s.model_copy(update={"model": s.model.model_copy(update={"dtype": want})}), str(loaded.source))
    log(f"on-policy data: targets generated by a {want} copy of the model")
    return copy


def _refused(e: Example, src: Source) -> bool:
    return is_refusal(e.messages[-1][1], src.markers)


def _refusals(loaded: Loaded, s: Settings, prompts: list[str], system: str, markers: tuple[str, ...]) -> list[Example]:
    """The base's reply to each harmful prompt, asked again under the refusal system prompt if it answered
    (every one, with --extended-refusals: the system prompt asks for the reason)."""
    m, bs, n = loaded, s.generation_batch_size, s.eval.max_new_tokens
    replies = generate(m.model, m.tokenizer, prompts, n, bs)
    retry = [i for i, r in enumerate(replies) if s.harden.extended_refusals or not is_refusal(r, markers)]
    if retry:
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": prompts[i]}] for i in retry]
        for i, r in zip(retry, generate(m.model, m.tokenizer, convs, n, bs), strict=True):
            replies[i] = r
    return [
        Example((("user", p), ("assistant", r)), "refusal", "harmful") for p, r in zip(prompts, replies, strict=True)
    ]


def _answers(loaded: Loaded, s: Settings, prompts: list[str], category: str) -> list[Example]:
    """The base's replies (empty ones left out); the caller drops the refused ones, never asking again:
    a prompt set may hold a mislabelled harmful prompt, so a refusal is not pushed towards an answer."""
    replies = generate(loaded.model, loaded.tokenizer, prompts, s.eval.max_new_tokens, s.generation_batch_size)
    return [
        Example((("user", p), ("assistant", r)), category, "harmless")
        for p, r in zip(prompts, replies, strict=True)
        if r.strip()
    ]


# prompt set -> category of its examples
_OTHERS = {"harmless": "helpful", "capability": "capability", "lookalike": "lookalike"}


def _row(e: Example) -> dict:
    """An example as one line of alignment JSONL (load_examples reads it back)."""
    return {"messages": [{"role": r, "content": c} for r, c in e.messages], "category": e.category, "kind": e.kind}


def harden_inputs(loaded: Loaded, s: Settings, log: Log) -> tuple[list[Example], list[str], dict[str, float]]:
    """(alignment examples, specification documents, mix): given files, else the organism's, else on-policy."""
    h = s.harden
    shipped = loaded.folder / "harden"
    data = h.data or (shipped / "align.jsonl" if (shipped / "align.jsonl").is_file() else None)
    spec = h.spec or (shipped / "spec.md" if (shipped / "spec.md").is_file() else None)
    mix = h.mix or (shipped / "mix.toml" if (shipped / "mix.toml").is_file() else None)
    if data is not None:
        examples = load_examples(data)
        if h.extended_refusals:
            examples = [e.with_extended() for e in examples]
    else:
        examples = on_policy(loaded, s, log)
    return examples, load_spec(spec), load_mix(mix)


def _work_dir(out: Path, s: Settings, fingerprint: str) -> Path:
    """Beside OUT, named by what is trained, so only the same run resumes from it."""
    key = json.dumps(
        {"harden": settings_record(s)["harden"], "prompts": settings_record(s)["prompts"], "m": fingerprint}
    )
    work = out.with_name(f".{out.name}.harden-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    work.mkdir(parents=True, exist_ok=True)
    return work


def run_harden(loaded: Loaded, s: Settings, out: Path, force: bool, log: Log) -> HardenRecord | None:
    """Train, merge, and write the hardened folder; returns its record (None in the processes that do not write)."""
    h = s.harden
    examples, docs, weights = harden_inputs(loaded, s, log)
    tok = loaded.tokenizer
    blocks = pack(tok, docs, h.block_size, h.stage1_tokens) if docs and h.stage1_tokens > 0 else None
    categories = [e.category for e in examples]
    orders = [apply_mix(categories, weights, h.harden_seed + e) for e in range(max(1, math.ceil(h.epochs)))]
    if h.epochs % 1:  # a fractional last epoch
        orders[-1] = orders[-1][: max(1, round((h.epochs % 1) * len(orders[-1])))]
    encoded = [encode_example(tok, e, h.max_length) for e in examples]
    data = HardenData(len(examples), sum(e.kind == "harmful" for e in examples), 0 if blocks is None else len(blocks))
    plan = make_plan(data.spec_blocks, orders, h.train_batch_size, h.harden_seed)
    harmful = [e.prompt for e in examples if e.kind == "harmful"][:64]
    harmless = [e.prompt for e in examples if e.kind != "harmful"][:64]
    if (h.ablation_aware or h.invariance > 0) and (len(harmful) < 2 or len(harmless) < 2):
        raise UserError(
            "the ablation-aware terms need harmful and harmless examples", 'mark refusals with "kind": "harmful"'
        )
    log(
        f"harden: {data.examples} examples ({data.harmful} harmful), {data.spec_blocks} spec blocks, "
        f"{plan.total} steps ({len(plan.stage1)} midtraining)"
    )
    work = _work_dir(out, s, loaded.fingerprint)
    trainer = Trainer(loaded, h, plan, blocks, encoded, (harmful, harmless), work, log, s.batch_size)
    result = trainer.run()
    if not trainer.is_main:
        return None
    record = HardenRecord.new(
        source=str(loaded.source),
        source_fingerprint=loaded.fingerprint,
        data=data,
        mix=weights,
        steps=result.steps,
        final_losses=result.history[-1] if result.history else {},
        settings=settings_record(s),
    )
    merged = trainer.merged(lambda: load_model(s).model)  # a 4-bit base takes the adapter on a fresh full copy
    trained = [text for e in examples for role, text in e.messages if role == "user"]
    write_folder(out, partial(_fill, loaded, merged, record, result, s, trained), force)
    shutil.rmtree(work, ignore_errors=True)
    return record


def _fill(
    loaded: Loaded,
    merged: PreTrainedModel,
    record: HardenRecord,
    result: TrainResult,
    s: Settings,
    trained: list[str],
    tmp: Path,
) -> None:
    """The hardened folder's files: weights in the source's stored dtype, tokenizer, prompts and harden data
    carried over, harden.json, history.json, the trained prompts' hashes, settings + reproduce.sh and the
    model card."""
    from refusal_lab.core.card import model_card

    stored = checkpoint_dtype(loaded.folder)
    if stored is not None:
        merged.to(stored)
    merged.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    for name in ("prompts", "harden"):
        if (loaded.folder / name).is_dir():
            shutil.copytree(loaded.folder / name, tmp / name)
    record.write(tmp)
    write_trained_prompts(tmp, trained)
    write_text_atomic(tmp / "history.json", json.dumps(result.history))
    write_replay(tmp, s, "harden")
    (tmp / "README.md").write_text(model_card(loaded.folder, record.to_json(), "harden"))
