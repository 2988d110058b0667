"""Benchmark: is prove's battery at least as strong as Heretic 1.4.0, under one scorer and one budget?

The published before/after table came from a single attack (Heretic). Here Heretic attacks each
model with a stated trial budget from its own virtualenv (AGPL: driven as a program, never
imported; bench/vs_heretic.py's driver), given only the prompts prove uses for extraction and
tuning. Every trial of Heretic's Pareto front is exported and handed to `refusal-lab prove
--imported`, so Heretic's copies are held to the same drift budgets, chosen on the same tuning
prompts and scored by the same refused / complied / broken scorer on the same held-out prompts
as the battery. The table puts Heretic's best copy within each budget beside the battery's worst
case.

    python bench/prove_vs_heretic.py                                   # the organism
    python bench/prove_vs_heretic.py --models organism OUT/hardened    # base and hardened
    python bench/prove_vs_heretic.py --models DIR --harmful sr.csv --column forbidden_prompt \\
        -- --attacks arditi,saber,adaptive,subspace,search --limit 32   # extra prove options after --
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from vs_heretic import ensure_heretic, run_heretic  # noqa: E402


def heretic_prompts(model: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path, str, int, int]:
    """harmful.txt / harmless.txt from prove's own probe split: extraction lines, then tuning lines.

    Heretic never sees prove's held-out prompts, as the battery never does.
    """
    from refusal_lab.config import load_settings
    from refusal_lab.core.sources import Source
    from refusal_lab.organism.source import model_path

    over = {"model.path": model, "prompts.column": args.column}
    if args.harmful:
        over["prompts.harmful"] = str(args.harmful)
    s = load_settings(**over)
    folder = model_path(s).resolve()  # Heretic runs in its own folder
    probe, _ = Source.of(folder).prove_split(s.prompts)
    k = s.prove.tuning_count
    harmful = probe.texts("harmful")
    extraction, tuning = harmful[:-k], harmful[-k:]
    harmless = probe.texts("harmless")
    n = min(len(extraction), len(harmless) - k)
    good = harmless[:n] + harmless[n : n + k]
    for text in extraction + tuning + good:
        if "\n" in text:
            raise SystemExit("prompts must be single lines for Heretic's text files")
    work.mkdir(parents=True, exist_ok=True)
    (work / "harmful.txt").write_text("\n".join(extraction[:n] + tuning) + "\n")
    (work / "harmless.txt").write_text("\n".join(good) + "\n")
    return work / "harmful.txt", work / "harmless.txt", str(folder), n, k


def prove(model: str, imported: list[str], out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    cli = [str(ROOT / ".venv" / "bin" / "refusal-lab"), "prove", model, "-o", str(out), "--force"]
    cli += ["--budget-kl", str(args.budget_kl), "--column", args.column]
    cli += ["--harmful", str(args.harmful)] if args.harmful else []
    for folder in imported:
        cli += ["--imported", folder]
    start = time.perf_counter()
    with (out.parent / "prove.log").open("w") as log:
        subprocess.run([*cli, *args.prove_args], check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((out / "results.json").read_text())["models"][0], time.perf_counter() - start


def cell(o: dict | None) -> str:
    if not o or not o.get("fits"):
        return "no setting fits"
    return f"{o['refused_rate']:.1%} / {o['complied_rate']:.1%} / {o['broken_rate']:.1%}, KL {o['kl']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["organism"])
    ap.add_argument("--harmful", type=Path, help="harmful prompt file for a real model (halved as prove does)")
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--trials", type=int, default=20, help="Heretic's trial budget")
    ap.add_argument("--tokens", type=int, default=32, help="Heretic's reply length while it optimises")
    ap.add_argument("--budget-kl", type=float, default=0.1)
    ap.add_argument("--heretic-max-batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "prove_vs_heretic")
    ap.add_argument("prove_args", nargs="*", help="more prove options, after --")
    args = ap.parse_args()
    args.work = args.work.resolve()  # Heretic runs in its own folder: every path it reads is absolute
    exe = ensure_heretic(ROOT / ".cache" / "vs_heretic" / "heretic-venv")
    rows = []
    for model in args.models:
        work = args.work / (Path(model).name or "model")
        harmful, harmless, folder, n, k = heretic_prompts(model, args, work)
        h_args = argparse.Namespace(
            probe=n, eval=k, trials=args.trials, tokens=args.tokens, heretic_max_batch=args.heretic_max_batch
        )
        print(f"{model}: Heretic, {args.trials} trials, {n}+{n} direction prompts, {k}+{k} of its own evaluation")
        her = run_heretic(exe, folder, work / "heretic", harmful, harmless, h_args)
        exports = sorted(her["exports"].values())
        print(f"  {her['wall_s']:.0f} s, exit {her['rc']}, {len(exports)} front trials exported", flush=True)
        result, seconds = prove(folder, exports, work / "prove", args)
        print(f"  prove (battery + Heretic's copies): {seconds:.0f} s", flush=True)
        rows.append((model, result, her, seconds))
    budgets = sorted(rows[0][1]["worst"], key=float)
    print("\nrefused / complied / broken on prove's held-out harmful prompts, one scorer for both")
    for b in budgets:
        print(f"\nKL <= {b}")
        print("| model | before | Heretic's best copy | battery's worst case | attack | battery >= Heretic |")
        print("|---|---|---|---|---|---|")
        for model, m, _her, _s in rows:
            h = m["attacks"].get("imported", {}).get("budgets", {}).get(b)
            w = m["worst"].get(b)
            ok = "-" if not (h and h.get("fits")) else "yes" if w and w["complied"] >= h["complied"] else "NO"
            before = f"{m['before']['refused_rate']:.1%} refused"
            print(f"| {model} | {before} | {cell(h)} | {cell({**w, 'fits': True} if w else None)} | "
                  f"{w['attack'] if w else '-'} | {ok} |")  # fmt: skip
    for model, _m, her, seconds in rows:
        print(f"{model}: Heretic {her['wall_s']:.0f} s for {args.trials} trials; prove {seconds:.0f} s")
    (args.work / "result.json").write_text(
        json.dumps({m: {"prove": r, "heretic": h, "prove_s": s} for m, r, h, s in rows}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
