"""Escalation tiers read by a person, and how far each tier scorer agrees with the reading.

bench/reference/escalation.jsonl keeps, for each reply of refusal-lab's default escalation set (10
scenarios x 5 levels, stateful conversations): the model tag, scenario, level, the SHA-256 of the
reply and the tier a person gave it by reading (refusal / hesitant / compliant / proactive, as the
judge's tier question defines them), with a note on hard cases. No reply text is kept. `check`
regenerates the conversations greedily from the model folder, and scores the replies whose hash
matches with the keyword tiers and, with `--judge-local`, the judge's; the per-level DCS of each
beside the reading's.

    python bench/escalation_reference.py dump --model TAG=DIR -o esc-replies.jsonl   # keep it outside the repo
    python bench/escalation_reference.py record esc-read.jsonl     # each row given `reading` (and `note`), added
    python bench/escalation_reference.py check --model TAG=DIR [--judge-local JUDGE_DIR]

A conversation is stateful, so one reply generated differently (another dtype, CPU kind or library
version) changes every later level of its scenario; those rows are counted and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from reference import models, read_rows, record_readings, reference_commands, sha  # noqa: E402

REFERENCE = ROOT / "reference" / "escalation.jsonl"
SETTINGS = {"dtype": "bfloat16", "max_new_tokens": 96, "batch_size": 16, "set": "default", "stateful": True}
TIERS = ("refusal", "hesitant", "compliant", "proactive")


def turns(folder: Path) -> list:
    """The default set's stateful conversations, greedy, with the reference's settings."""
    from refusal_lab.core.generate import generate
    from refusal_lab.core.model import load
    from refusal_lab.evaluate.escalation import builtin_scenarios, load_scenarios, run_escalation

    m = load(folder, SETTINGS["dtype"], "cpu")
    scenarios = load_scenarios(builtin_scenarios(SETTINGS["set"]))

    def reply(convs: list) -> list[str]:
        return generate(m.model, m.tokenizer, convs, SETTINGS["max_new_tokens"], SETTINGS["batch_size"])

    return run_escalation(scenarios, reply, SETTINGS["stateful"])


def dump(args: argparse.Namespace) -> None:
    """Replies with their text, for reading: written only where the user says (keep it out of the repo)."""
    with args.out.open("w", encoding="utf-8") as f:
        for tag, folder in models(args.model).items():
            start = time.perf_counter()
            got = turns(folder)
            print(f"{tag}: {len(got)} replies in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for t in got:
                row = {"model": tag, "scenario": t.scenario, "level": t.level, "prompt": t.prompt}
                f.write(json.dumps(row | {"response": t.response, "reply_sha": sha(t.response)}) + "\n")


def record(args: argparse.Namespace) -> None:
    """A read dump -> the reference, one reading per (model, scenario, level, reply hash)."""
    keep = ("model", "scenario", "level", "reply_sha", "reading", "note")
    key = lambda r: (r["model"], r["scenario"], r["level"], r["reply_sha"])  # noqa: E731
    record_readings(read_rows(args.read), args.read, REFERENCE, TIERS, keep, key)


def scored(name: str, tiers: list[str | None], readings: list[str], levels: list[int]) -> None:
    """Agreement, refusal-or-not, the confusion (reading -> tier) and the DCS per level beside the reading's."""
    from refusal_lab.evaluate.judge import TIERS as DCS

    n = len(readings)
    agree = sum(t == r for t, r in zip(tiers, readings, strict=True))
    binary = sum((t == "refusal") == (r == "refusal") for t, r in zip(tiers, readings, strict=True))
    confusion: dict[str, dict[str, int]] = {}
    for t, r in zip(tiers, readings, strict=True):
        confusion.setdefault(r, {}).setdefault(str(t), 0)
        confusion[r][str(t)] += 1
    print(f"  {name:<8} agrees {agree}/{n}  refusal-or-not {binary}/{n}  reading->tier {confusion}")
    for level in sorted(set(levels)):
        idx = [i for i, lv in enumerate(levels) if lv == level]
        mine = [DCS[tiers[i]] for i in idx if tiers[i] is not None]
        read = [DCS[readings[i]] for i in idx]
        dcs = f"{sum(mine) / len(mine):5.1f}" if mine else "  n/a"
        print(f"    level {level}: DCS {dcs}  (reading {sum(read) / len(read):5.1f}, {len(idx)} replies)")


def check(args: argparse.Namespace) -> None:
    from refusal_lab.core.metrics import REFUSAL_MARKERS
    from refusal_lab.evaluate.escalation import keyword_tier

    ref = [json.loads(x) for x in REFERENCE.open(encoding="utf-8")]
    print(f"reference: {len(ref)} rows; generation: {SETTINGS}, greedy")
    for tag, folder in models(args.model).items():
        rows = {(r["scenario"], r["level"], r["reply_sha"]): r for r in ref if r["model"] == tag}
        if not rows:
            print(f"{tag}: no reference rows (tags: {sorted({r['model'] for r in ref})})")
            continue
        turns_read = {k[:2] for k in rows}  # a turn may carry readings of several reply versions
        got = [t for t in turns(folder) if (t.scenario, t.level) in turns_read]
        same = [t for t in got if (t.scenario, t.level, sha(t.response)) in rows]
        print(f"\n## {tag}: {len(same)} of {len(turns_read)} replies match a read reply's hash")
        if len(same) < len(turns_read) / 2:
            print("  most replies differ: another dtype, CPU kind, library version or batching than the reference's")
        readings = [rows[(t.scenario, t.level, sha(t.response))]["reading"] for t in same]
        levels = [t.level for t in same]
        scored("keyword", [keyword_tier(t.response, REFUSAL_MARKERS) for t in same], readings, levels)
        if args.judge_local:
            from refusal_lab.core.model import load
            from refusal_lab.evaluate.judge import JudgeCache, LocalJudge, judge_tiers

            jm = load(args.judge_local, SETTINGS["dtype"], "cpu")
            backend = LocalJudge(str(args.judge_local), jm.model, jm.tokenizer, 1)
            start = time.perf_counter()
            tiers = judge_tiers(backend, [(t.prompt, t.response) for t in same], JudgeCache(None))
            print(f"  (judge: {time.perf_counter() - start:.0f} s)")
            scored("judge", tiers, readings, levels)


def main() -> None:
    ap, _ = reference_commands(__doc__)
    args = ap.parse_args()
    {"check": check, "dump": dump, "record": record}[args.cmd](args)


if __name__ == "__main__":
    main()
