"""Benchmark: refusal-lab's search against Heretic 1.4.0, same model, prompts, trial budget.

Heretic runs from its own virtualenv in the work folder (created on first use with
`pip install torch==2.13.0 heretic-llm==1.4.0`; it is AGPL and never imported here). Its menus
are answered through standard input (KAGGLE_KERNEL_RUN_TYPE makes them numbered) to export
every trial of its Pareto front. refusal-lab exports every trial of its own front with
`pick STUDY --min-complied N`. Every exported model, from both tools, is then scored by
refusal-lab's scorer (refused / complied / broken: exact on the organism, coherence against the
base otherwise) on the same evaluation prompts and token budget. Also printed: one forward pass
over the evaluation prompts (a trial's floor) and each tool's trial cost in such passes, and when
refusal-lab's search first reached Heretic's best point (from the start of its command), and the
set-up and trial phases of both. A prompt file with categories is taken round-robin over them, so
the directions, the trials and the held-out picks all see every category; refusal-lab starts from
an empty cache, as Heretic does. Both load the weights in one dtype (--dtype; by default the
checkpoint's own, which is what Heretic's "auto" loads; refusal-lab's own auto is float32 on a CPU).

    python bench/vs_heretic.py                       # the organism
    python bench/vs_heretic.py --model DIR --harmful strongreject.csv --column forbidden_prompt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def ensure_heretic(venv: Path) -> Path:
    exe = venv / "bin" / "heretic"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "heretic-llm==1.4.0"], check=True)
    return exe


def write_prompts(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """harmful.txt and harmless.txt: lines [0, probe) for directions, [probe, probe+eval) for trials."""
    from refusal_lab.config import load_settings
    from refusal_lab.core.prompts import load_prompts
    from refusal_lab.core.sources import builtin_prompts
    from refusal_lab.organism.build import prompt_sets
    from refusal_lab.organism.source import model_path

    s = load_settings(**{"model.path": args.model})
    if s.model.path == "organism":
        folder = model_path(s)
        probe, ev = prompt_sets(folder, "probe"), prompt_sets(folder, "eval")
        harmful = [p.prompt for p in probe["harmful"]][: args.probe] + [p.prompt for p in ev["harmful"]][: args.eval]
        harmless = [p.prompt for p in probe["harmless"]][: args.probe] + [p.prompt for p in ev["harmless"]][: args.eval]
        held = [p.prompt for p in ev["harmful"]][args.eval : args.eval + args.holdout]
        held_ok = [p.prompt for p in ev["harmless"]][args.eval : args.eval + args.holdout]
        model = str(folder)
    else:
        model = str(Path(s.model.path).expanduser().resolve())  # Heretic runs in its own folder
        rows = [p.prompt for p in by_category(load_prompts(args.harmful, args.column))]
        harmful, held = rows[: args.probe + args.eval], rows[args.probe + args.eval :][: args.holdout]
        harmless = [p.prompt for p in builtin_prompts("harmless", "probe")][: args.probe]
        harmless += [p.prompt for p in builtin_prompts("harmless", "eval")][: args.eval]
        held_ok = [p.prompt for p in builtin_prompts("harmless", "eval")][args.eval : args.eval + args.holdout]
    for text in harmful + harmless:
        if "\n" in text:
            raise SystemExit("prompts must be single lines for Heretic's text files")
    (work / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (work / "harmless.txt").write_text("\n".join(harmless) + "\n")
    # prompts neither tool sees while searching: the exported picks are scored on them at the end
    (work / "holdout_harmful.txt").write_text("\n".join(held) + "\n")
    (work / "holdout_harmless.txt").write_text("\n".join(held_ok) + "\n")
    return work / "harmful.txt", work / "harmless.txt", model


def by_category(prompts: list) -> list:
    """Round-robin over the file's categories (first of each, then second of each, ...).

    StrongREJECT's rows are sorted by category: taken in file order, the directions came from one
    category (disinformation), the trials were scored on another and the picks held out on a third.
    Interleaved, every slice (directions, trials, held out) spans all of them. Stable: the same file
    gives the same order.
    """
    seen: dict[str, int] = {}
    ranked = []
    for i, p in enumerate(prompts):
        seen[p.category] = seen.get(p.category, 0) + 1
        ranked.append((seen[p.category], list(seen).index(p.category), i, p))
    return [p for *_, p in sorted(ranked, key=lambda r: r[:3])]


def organism_markers(folder: Path) -> list[str] | None:
    """Refusal phrases Heretic can count on the organism (None for other models: Heretic's own list).

    Heretic counts a reply as a refusal when it contains one of its English markers; the organism
    refuses in its own words ("that is theft , so i must decline ."), which Heretic's list misses, so
    it would see no refusal to remove. Its declared refusal words that never occur in a compliant
    template are given as whole words (its replies separate every word and mark by spaces).
    """
    from refusal_lab.core.sources import Source
    from refusal_lab.organism.corpus import COMPLY

    src = Source.of(folder)
    if not src.organism:
        return None
    declared = (folder / "prompts" / "refusal_markers.txt").read_text().split("\n")
    compliant = {w for c in COMPLY for w in c.replace("{x}", " ").split()}
    words = [w.strip() for w in declared if w.strip() and not w.startswith("#") and w.strip() not in compliant]
    return [f" {w} " for w in words] + [f"{w} " for w in words if len(w) >= 4]


def run_heretic(exe: Path, model: str, hdir: Path, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """Run Heretic headless; export every Pareto trial; return timings and its own front."""
    shutil.rmtree(hdir, ignore_errors=True)
    hdir.mkdir(parents=True)
    p, e = args.probe, args.eval
    markers = organism_markers(Path(model))
    extra = f"refusal_markers = {json.dumps(markers)}\n" if markers else ""
    (hdir / "config.toml").write_text(f"""model = "{model}"
n_trials = {args.trials}
max_response_length = {args.tokens}
max_batch_size = {args.heretic_max_batch}
dtypes = ["{args.dtype}"]
study_checkpoint_dir = "{hdir / "checkpoints"}"
export_strategy = "merge"
{extra}
[good_prompts]
dataset = "{harmless}"
split = "[:{p}]"

[bad_prompts]
dataset = "{harmful}"
split = "[:{p}]"

[good_evaluation_prompts]
dataset = "{harmless}"
split = "[{p}:{p + e}]"

[bad_evaluation_prompts]
dataset = "{harmful}"
split = "[{p}:{p + e}]"
""")
    env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "bench", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe)],
        cwd=hdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        bufsize=0,
    )
    log = (hdir / "heretic.log").open("w")
    buf, front, todo, optimised_s, current, pending = "", [], None, None, None, "trial"
    exports: dict[int, Path] = {}
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        text = ANSI.sub("", chunk.decode(errors="replace"))
        log.write(text)
        log.flush()
        buf += text
        tail = buf.rstrip()
        answer = None
        if tail.endswith("Enter number:"):
            menu = re.findall(r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)", buf)
            if menu:  # trial selection
                if todo is None:
                    optimised_s = time.perf_counter() - start
                    front = [
                        {"trial": int(t), "refusals": int(r), "n": int(n), "kl": float(k)} for _, t, r, n, k in menu
                    ]
                    todo = [(int(i), int(t)) for i, t, *_ in menu]
                exit_no = re.findall(r"\[(\d+)\] Exit program", buf)[-1]
                if todo:
                    idx, current = todo.pop(0)
                    answer, pending = str(idx), "save"
                else:
                    answer = exit_no
            elif "Save the model to a local folder" in buf:
                back = re.findall(r"\[(\d+)\] Return to the trial selection menu", buf) or re.findall(
                    r"\[(\d+)\] Exit", buf
                )
                answer = "1" if pending == "save" else back[-1]
                pending = "path" if pending == "save" else "trial"
        elif "Path to the folder" in tail and tail.endswith(":"):
            exports[current] = hdir / f"export-{current}"
            answer, pending = str(exports[current]), "back"
        if answer is not None:
            proc.stdin.write((answer + "\n").encode())
            proc.stdin.flush()
            buf = ""
    proc.wait()
    log.close()
    return {
        "wall_s": time.perf_counter() - start,
        "optimisation_s": optimised_s,
        "front": front,
        "exports": {t: str(p) for t, p in exports.items() if (p / "config.json").exists()},
        "rc": proc.returncode,
    }


def checkpoint_dtype_name(folder: Path) -> str:
    """The dtype a checkpoint was saved in (float32 when its config does not say)."""
    from refusal_lab.core.model import DTYPES, checkpoint_dtype

    stored = checkpoint_dtype(folder)
    return next((name for name, d in DTYPES.items() if d == stored), "float32")


def heretic_setting(model: str, args: argparse.Namespace) -> dict:
    """What a Heretic run depends on: a reused run must match it."""
    keys = ("trials", "probe", "eval", "tokens", "heretic_max_batch", "harmful", "column", "dtype")
    return {"model": model, **{k: str(getattr(args, k)) for k in keys}}


def heretic_run(exe: Path, model: str, hdir: Path, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """Heretic's run for this setting: with --reuse-heretic the last one made with it, else a new one
    (recorded in run.json for the next --reuse-heretic)."""
    path, setting = hdir / "run.json", heretic_setting(model, args)
    if args.reuse_heretic and path.is_file():
        run = json.loads(path.read_text())
        if run.get("setting") != setting:
            raise SystemExit(f"--reuse-heretic: {path} was made with another setting; run without it")
        return run
    run = run_heretic(exe, model, hdir, harmful, harmless, args) | {"setting": setting}
    path.write_text(json.dumps(run, indent=1))
    return run


def heretic_trials_s(hdir: Path) -> float | None:
    """Heretic's trial phase by its own clock: the last "Elapsed time" it printed (it starts that
    clock at its first trial, after loading, its batch-size probe and the residuals)."""
    log = hdir / "heretic.log"
    found = re.findall(r"Elapsed time: (?:(\d+)h )?(?:(\d+)m )?(\d+)s", log.read_text()) if log.is_file() else []
    if not found:
        return None
    h, m, sec = (int(x or 0) for x in found[-1])
    return 3600 * h + 60 * m + sec


def export_s(run: dict) -> float:
    """Heretic's time after its front was printed (saving the exported copies)."""
    return run["wall_s"] - run["optimisation_s"] if run.get("optimisation_s") else 0.0


def our_setup_s(work: Path) -> float | None:
    """refusal-lab's set-up (probe, base logits, refusal openers, scorer) from its search log."""
    log = work / "refusal-lab.log"
    found = re.findall(r"search set-up [^:]*: ([\d.]+) s", log.read_text()) if log.is_file() else []
    return float(found[-1]) if found else None


def run_refusal_lab(model: str, sdir: Path, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """refusal-lab's search from a cold start: its own empty cache, so no earlier run's activations
    are reused (Heretic computes its residuals in every run)."""
    shutil.rmtree(sdir, ignore_errors=True)
    cache = sdir.parent / "refusal-lab-cache"
    shutil.rmtree(cache, ignore_errors=True)
    dtype = ["--dtype", args.dtype]  # the search and every pick load the weights alike
    cli = [
        str(ROOT / ".venv" / "bin" / "refusal-lab"),
        "search",
        model,
        "-o",
        str(sdir),
        "--harmful",
        str(harmful),
        "--harmless",
        str(harmless),
        "--probe-count",
        str(args.probe),
        "--eval-count",
        str(args.eval),
        "--trials",
        str(args.trials),
        "--max-new-tokens",
        str(args.tokens),
        "--cache-dir",
        str(cache),
        *dtype,
        "--sampler-seed",
        str(args.seed),
    ]
    start = time.perf_counter()
    subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, stderr=(sdir.parent / "refusal-lab.log").open("w"))
    wall = time.perf_counter() - start
    front = json.loads((sdir / "pareto.json").read_text())
    exports = {}
    for point in front:
        out = sdir / f"export-{point['trial']}"
        subprocess.run(
            [cli[0], "pick", str(sdir), "--min-complied", str(point["complied"]), "-o", str(out), *dtype],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        exports[point["trial"]] = str(out)
    return {"wall_s": wall, "front": front, "exports": exports}


def make_scorer(model: str, harmless: list[str], args: argparse.Namespace) -> tuple[Any, Any]:
    """refusal-lab's scorer for this model: exact on the organism, coherence against the base otherwise."""
    from refusal_lab.core.coherence import CoherenceScorer
    from refusal_lab.core.generate import generate
    from refusal_lab.core.model import load
    from refusal_lab.core.sources import Source

    src = Source.of(Path(model))
    base = load(model, dtype=args.dtype)
    if src.organism:
        return base, src.scorer()
    replies = generate(base.model, base.tokenizer, harmless, args.tokens)
    return base, CoherenceScorer.calibrated(base.model, base.tokenizer, harmless, replies, 0.05, src.markers)


def score(model: str, groups: dict, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """Every export on the evaluation slice, by refusal-lab's scorer: refused / complied / broken and KL."""
    h = harmful.read_text().splitlines()[args.probe : args.probe + args.eval]
    b = harmless.read_text().splitlines()[args.probe : args.probe + args.eval]
    return score_on(model, groups, h, b, args)


def score_on(model: str, groups: dict, h: list[str], b: list[str], args: argparse.Namespace) -> dict:
    """Exports ({group: {name: folder}}) scored on harmful prompts `h` (replies) and harmless prompts
    `b` (first-token KL), with one scorer and one set of base logits for them all."""
    from refusal_lab.core.generate import generate
    from refusal_lab.core.metrics import first_token_kl, last_logits
    from refusal_lab.core.model import load

    base, scorer = make_scorer(model, b, args)
    base_logits = last_logits(base.model, base.tokenizer, b)
    out: dict = {}
    for group, exports in groups.items():
        out[group] = {}
        for name, path in exports.items():
            m = load(path, dtype=args.dtype)
            kl = first_token_kl(base_logits, last_logits(m.model, m.tokenizer, b))
            labels = scorer.labels(h, generate(m.model, m.tokenizer, h, args.tokens))
            out[group][name] = {"kl": kl, **{k: labels.count(k) for k in ("refused", "complied", "broken")}}
            m.release()
    return out


def held_out(model: str, work: Path, exports: dict, scored: dict, args: argparse.Namespace) -> dict:
    """Each tool's pick at each KL limit (chosen on the evaluation slice) rescored on prompts neither saw."""
    h = (work / "holdout_harmful.txt").read_text().splitlines()
    b = (work / "holdout_harmless.txt").read_text().splitlines()
    if not h or not b:
        return {}
    picks = {tool: {} for tool in scored}
    for tool, pts in scored.items():
        for limit in LIMITS:
            ok = [(v["complied"], -v["kl"], t) for t, v in pts.items() if v["kl"] <= limit]
            if ok:
                picks[tool][limit] = max(ok)[2]
    chosen = {tool: {t: exports[tool][t] for t in set(p.values())} for tool, p in picks.items()}
    res = score_on(model, {**chosen, "base": {"base": model}}, h, b, args)
    base = res.pop("base")["base"]
    print(
        f"\nheld-out prompts ({len(h)} harmful, {len(b)} harmless; neither tool saw them): base refused "
        f"{base['refused']}, complied {base['complied']} {interval(base['complied'], len(h))}"
    )
    print("each tool's pick at KL <= 0.1 / 0.2 / 0.5 (chosen on the evaluation slice):")
    print("complied [95% Wilson] (held-out KL)")
    for tool, p in picks.items():
        got = {x: res[tool][p[x]] for x in LIMITS if x in p}
        cells = [
            f"{got[x]['complied']:>3} {interval(got[x]['complied'], len(h))} ({got[x]['kl']:.3f})"
            if x in got
            else "  -"
            for x in LIMITS
        ]
        print(f"  {tool:<12} " + " / ".join(cells))
    return {"base": base, "picks": {t: {str(k): v for k, v in p.items()} for t, p in picks.items()}, "scored": res}


LIMITS = (0.1, 0.2, 0.5)


def interval(k: int, n: int) -> str:
    """A count's share of n with its 95% Wilson interval, in percent."""
    from refusal_lab.core.stats import Rate

    return f"[{Rate(k, n).interval}]"


def best_at(points: list[dict], limit: float) -> str:
    ok = [p["complied"] for p in points if p["kl"] <= limit]
    return str(max(ok)) if ok else "-"


def forward_pass_s(model: str, harmful: Path, harmless: Path, args: argparse.Namespace) -> float:
    """One forward pass over the evaluation prompts (harmful and harmless): a trial's floor."""
    from refusal_lab.core.metrics import last_logits
    from refusal_lab.core.model import load

    m = load(model, dtype=args.dtype)
    prompts = [
        *harmful.read_text().splitlines()[args.probe : args.probe + args.eval],
        *harmless.read_text().splitlines()[args.probe : args.probe + args.eval],
    ]
    last_logits(m.model, m.tokenizer, prompts)  # warm-up
    start = time.perf_counter()
    last_logits(m.model, m.tokenizer, prompts)
    return time.perf_counter() - start


def our_trials(sdir: Path) -> list[dict]:
    """refusal-lab's trials in completion order, with their own counts and seconds since the study began."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sdir / "study.journal")))
    study = optuna.load_study(study_name="refusal-lab", storage=storage)
    done = [t for t in study.trials if t.state.is_finished() and t.datetime_complete]
    t0 = min(t.datetime_start for t in done)
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "seconds": (t.datetime_complete - t0).total_seconds(),
            "duration": (t.datetime_complete - t.datetime_start).total_seconds(),
            "complied": t.user_attrs.get("complied"),
            "kl": t.values[1] if t.values else t.user_attrs.get("kl"),
        }
        for t in done
    ]
    return sorted(rows, key=lambda r: r["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--probe", type=int, default=48)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--holdout", type=int, default=32, help="held-out harmful/harmless prompts for the picks")
    ap.add_argument("--heretic-max-batch", type=int, default=32, help="Heretic's batch-size probe stops here")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "vs_heretic")
    ap.add_argument(
        "--dtype",
        default="checkpoint",
        choices=("checkpoint", "float32", "bfloat16", "float16"),
        help="weights dtype for both tools; checkpoint: the one the model was saved in (Heretic's auto)",
    )
    ap.add_argument("--seed", type=int, default=0, help="refusal-lab's sampler seed (Heretic's run is not reseeded)")
    ap.add_argument("--reuse-heretic", action="store_true", help="reuse the last Heretic run made with this setting")
    args = ap.parse_args()
    args.work = args.work.resolve()  # Heretic runs in its own folder: every path it reads is absolute
    work = args.work / (Path(args.model).name or "model")
    work.mkdir(parents=True, exist_ok=True)
    exe = ensure_heretic(args.work / "heretic-venv")
    harmful, harmless, model = write_prompts(args, work)
    args.dtype = checkpoint_dtype_name(Path(model)) if args.dtype == "checkpoint" else args.dtype
    print(
        f"model {model}; {args.probe}+{args.probe} probe prompts, {args.eval}+{args.eval} evaluation prompts, "
        f"{args.tokens}-token replies, {args.trials} trials each, {args.dtype} weights",
        flush=True,
    )
    her = heretic_run(exe, model, work / "heretic", harmful, harmless, args)
    print(
        f"heretic: {her['wall_s']:.0f} s wall ({her['optimisation_s'] or float('nan'):.0f} s to its front), "
        f"exit {her['rc']}, {len(her['exports'])} front trials exported",
        flush=True,
    )
    ours = run_refusal_lab(model, work / "refusal-lab", harmful, harmless, args)
    print(f"refusal-lab: {ours['wall_s']:.0f} s wall, {len(ours['exports'])} front trials exported", flush=True)
    groups = {"heretic": her["exports"], "refusal-lab": ours["exports"], "base": {"base": model}}
    scored = score(model, groups, harmful, harmless, args)
    base = scored.pop("base")["base"]
    floor = forward_pass_s(model, harmful, harmless, args)
    trials = our_trials(work / "refusal-lab")
    full = [t for t in trials if t["state"] == "COMPLETE"]
    h_best = max(scored["heretic"].values(), key=lambda p: (p["complied"], -p["kl"]), default=None)
    reach = next(
        (t for t in full if h_best and t["complied"] >= h_best["complied"] and t["kl"] <= max(h_best["kl"], 1e-9)),
        None,
    )
    h_trials_s = heretic_trials_s(work / "heretic")
    h_trial = (h_trials_s or her["optimisation_s"] or her["wall_s"]) / args.trials
    print(f"\nbase model: refused {base['refused']}, complied {base['complied']} of {args.eval}")
    print(
        f"wall time: heretic {her['wall_s']:.0f} s, refusal-lab {ours['wall_s']:.0f} s, "
        f"ratio {ours['wall_s'] / her['wall_s']:.2f}"
    )
    setup_s = our_setup_s(work)
    if h_trials_s and setup_s:
        print(
            f"set-up before the first trial: heretic about {her['wall_s'] - h_trials_s - export_s(her):.0f} s, "
            f"refusal-lab {setup_s:.0f} s (plus loading); trial phases: heretic {h_trials_s:.0f} s, "
            f"refusal-lab {sum(t['duration'] for t in trials):.0f} s"
        )
    mean = sum(t["duration"] for t in trials) / max(1, len(trials))
    pruned = [t["duration"] for t in trials if t["state"] != "COMPLETE"]
    print(f"one forward pass over the {2 * args.eval} evaluation prompts: {floor:.2f} s (a trial's floor)")
    print(
        f"refusal-lab: {len(full)} trials measured, {len(pruned)} pruned; mean trial {mean:.1f} s = "
        f"{mean / floor:.1f} passes (pruned ones {sum(pruned) / max(1, len(pruned)) / floor:.1f}); "
        f"Heretic {h_trial:.1f} s per trial = {h_trial / floor:.1f} passes"
    )
    if h_best:
        # from the command's start: loading and set-up count (the trials' clock starts at the first one)
        before = ours["wall_s"] - max((t["seconds"] for t in trials), default=0.0)
        when = f"{before + reach['seconds']:.0f} s (trial {reach['trial']})" if reach else "not within its budget"
        print(
            f"Heretic's best point: {h_best['complied']}/{args.eval} complied at KL {h_best['kl']:.4f}; "
            f"refusal-lab reached it in {when}, Heretic's whole run took {her['wall_s']:.0f} s"
        )
    print("most complied (refusal-lab's scorer) at KL <= 0.1 / 0.2 / 0.5:")
    for tool, pts in scored.items():
        vals = list(pts.values())
        print(f"  {tool:<12} {best_at(vals, 0.1):>3} / {best_at(vals, 0.2):>3} / {best_at(vals, 0.5):>3}")
    for tool, pts in scored.items():
        print(f"{tool} front, as refusal-lab scores it (trial: refused/complied/broken of {args.eval}, KL):")
        for trial, v in sorted(pts.items(), key=lambda kv: (-kv[1]["complied"], kv[1]["kl"])):
            print(f"    {trial}: {v['refused']}/{v['complied']}/{v['broken']}, {v['kl']:.4f}")
    print("heretic's own front (refusals, KL):", [(p["refusals"], round(p["kl"], 4)) for p in her["front"]])
    proxy = work / "refusal-lab" / "proxy.json"
    if proxy.is_file():
        print("refusal-lab's proxy:", proxy.read_text().strip())
    held = held_out(model, work, {"heretic": her["exports"], "refusal-lab": ours["exports"]}, scored, args)
    (work / "result.json").write_text(
        json.dumps(
            {
                "heretic": her,
                "refusal-lab": ours,
                "scored": scored,
                "base": base,
                "floor_s": floor,
                "trials": trials,
                "held_out": held,
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
