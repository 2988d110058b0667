"""Benchmark: refusal-lab's search against Heretic 1.4.0, same model, prompts, trial budget.

Heretic runs from its own virtualenv in the work folder (created on first use with
`pip install torch==2.13.0 heretic-llm==1.4.0`; it is AGPL and never imported here). Its menus
are answered through standard input (KAGGLE_KERNEL_RUN_TYPE makes them numbered) to export
every trial of its Pareto front. refusal-lab exports every trial of its own front with
`pick STUDY --min-complied N`. Every exported model, from both tools, is then scored by
refusal-lab's evaluator on the same evaluation prompts and token budget.

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
    from refusal_lab.core.sources import builtin_prompts, model_path
    from refusal_lab.organism.build import prompt_sets

    s = load_settings(**{"model.path": args.model})
    if s.model.path == "organism":
        folder = model_path(s)
        probe, ev = prompt_sets(folder, "probe"), prompt_sets(folder, "eval")
        harmful = [p.prompt for p in probe["harmful"]][: args.probe] + [p.prompt for p in ev["harmful"]][: args.eval]
        harmless = [p.prompt for p in probe["harmless"]][: args.probe] + [p.prompt for p in ev["harmless"]][: args.eval]
        model = str(folder)
    else:
        model = s.model.path
        harmful = [p.prompt for p in load_prompts(args.harmful, args.column)][: args.probe + args.eval]
        harmless = [p.prompt for p in builtin_prompts("harmless", "probe")][: args.probe]
        harmless += [p.prompt for p in builtin_prompts("harmless", "eval")][: args.eval]
    for text in harmful + harmless:
        if "\n" in text:
            raise SystemExit("prompts must be single lines for Heretic's text files")
    (work / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (work / "harmless.txt").write_text("\n".join(harmless) + "\n")
    return work / "harmful.txt", work / "harmless.txt", model


def run_heretic(exe: Path, model: str, hdir: Path, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """Run Heretic headless; export every Pareto trial; return timings and its own front."""
    shutil.rmtree(hdir, ignore_errors=True)
    hdir.mkdir(parents=True)
    p, e = args.probe, args.eval
    (hdir / "config.toml").write_text(f"""model = "{model}"
n_trials = {args.trials}
max_response_length = {args.tokens}
max_batch_size = {args.heretic_max_batch}
study_checkpoint_dir = "{hdir / "checkpoints"}"
export_strategy = "merge"

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


def run_refusal_lab(model: str, sdir: Path, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(sdir, ignore_errors=True)
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
    ]
    start = time.perf_counter()
    subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, stderr=(sdir.parent / "refusal-lab.log").open("w"))
    wall = time.perf_counter() - start
    front = json.loads((sdir / "pareto.json").read_text())
    exports = {}
    for point in front:
        out = sdir / f"export-{point['trial']}"
        subprocess.run(
            [cli[0], "pick", str(sdir), "--min-complied", str(point["complied"]), "-o", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        exports[point["trial"]] = str(out)
    return {"wall_s": wall, "front": front, "exports": exports}


def score(model: str, exports: dict, harmful: Path, harmless: Path, args: argparse.Namespace) -> dict:
    """refusal-lab's evaluator on the evaluation slice: keyword refusals and first-token KL."""
    from refusal_lab.core.generate import generate
    from refusal_lab.core.model import load
    from refusal_lab.evaluate.metrics import first_token_kl, is_refusal, last_logits

    h = harmful.read_text().splitlines()[args.probe : args.probe + args.eval]
    b = harmless.read_text().splitlines()[args.probe : args.probe + args.eval]
    base = load(model)
    base_logits = last_logits(base.model, base.tokenizer, b)
    out = {}
    for name, path in exports.items():
        m = load(path)
        kl = first_token_kl(base_logits, last_logits(m.model, m.tokenizer, b))
        refusals = sum(map(is_refusal, generate(m.model, m.tokenizer, h, args.tokens)))
        out[name] = {"refusals": refusals, "kl": kl}
    return out


def best_at(points: list[dict], limit: float) -> str:
    ok = [p["refusals"] for p in points if p["kl"] <= limit]
    return str(min(ok)) if ok else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--probe", type=int, default=48)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--heretic-max-batch", type=int, default=32, help="Heretic's batch-size probe stops here")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "vs_heretic")
    args = ap.parse_args()
    work = args.work / (Path(args.model).name or "model")
    work.mkdir(parents=True, exist_ok=True)
    exe = ensure_heretic(args.work / "heretic-venv")
    harmful, harmless, model = write_prompts(args, work)
    print(
        f"model {model}; {args.probe}+{args.probe} probe prompts, {args.eval}+{args.eval} evaluation prompts, "
        f"{args.tokens}-token replies, {args.trials} trials each",
        flush=True,
    )
    her = run_heretic(exe, model, work / "heretic", harmful, harmless, args)
    print(
        f"heretic: {her['wall_s']:.0f} s wall ({her['optimisation_s'] or float('nan'):.0f} s to its front), "
        f"exit {her['rc']}, {len(her['exports'])} front trials exported",
        flush=True,
    )
    ours = run_refusal_lab(model, work / "refusal-lab", harmful, harmless, args)
    print(f"refusal-lab: {ours['wall_s']:.0f} s wall, {len(ours['exports'])} front trials exported", flush=True)
    scored = {
        "heretic": score(model, her["exports"], harmful, harmless, args),
        "refusal-lab": score(model, ours["exports"], harmful, harmless, args),
    }
    base = score(model, {"base": model}, harmful, harmless, args)["base"]
    print(f"\nbase model: {base['refusals']}/{args.eval} refused")
    print(
        f"wall time: heretic {her['wall_s']:.0f} s, refusal-lab {ours['wall_s']:.0f} s, "
        f"ratio {ours['wall_s'] / her['wall_s']:.2f}"
    )
    print("best refusal count (refusal-lab's evaluator) at KL <= 0.1 / 0.2 / 0.5:")
    for tool, pts in scored.items():
        vals = list(pts.values())
        print(f"  {tool:<12} {best_at(vals, 0.1):>3} / {best_at(vals, 0.2):>3} / {best_at(vals, 0.5):>3}")
    for tool, pts in scored.items():
        print(f"{tool} front, as refusal-lab scores it (trial: refusals/{args.eval}, KL):")
        for trial, v in sorted(pts.items(), key=lambda kv: (kv[1]["refusals"], kv[1]["kl"])):
            print(f"    {trial}: {v['refusals']}, {v['kl']:.4f}")
    print("heretic's own front:", [(p["refusals"], round(p["kl"], 4)) for p in her["front"]])
    print("refusal-lab's own front:", [(int(p["not_complied"]), round(p["kl"], 4)) for p in ours["front"]])
    (work / "result.json").write_text(
        json.dumps({"heretic": her, "refusal-lab": ours, "scored": scored, "base": base}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
