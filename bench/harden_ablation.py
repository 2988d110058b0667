"""Which hardening option makes refusals survive the battery: the ablation study, over seeds.

For every organism seed (or one real model): the base is proved, then hardened once per variant and
training seed and each hardened model proved with the same battery (directional attacks; the
fine-tuning attack is its own threat model and is left out here). Printed per row: refusals retained
under the worst attack within KL 0.1 and 0.5, that attack, and what hardening cost (over-refusal,
capability, harmless compliance against the base). A killed sweep resumes: a finished row is read
back from its row.json when its settings are the same. Usage:

    python bench/harden_ablation.py --seeds 0 1 2 --out bench-out/harden
    python bench/harden_ablation.py --seeds 0 --variants plain,default
    python bench/harden_ablation.py --seeds 0 1 2 --variants default,passes2 --twins 0.5 --out bench-out/twins
    python bench/harden_ablation.py --model MODEL --harden-seeds 0 1 2 --variants default \
        --set prompts.harmful=FILE --set prompts.column=forbidden_prompt --set model.dtype=bfloat16 \
        --set harden.train_batch_size=2 --out bench-out/harden-real
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_lab.config import Settings, load_settings
from refusal_lab.core.artifacts import write_text_atomic
from refusal_lab.core.kernels import use_kernels
from refusal_lab.harden.stage import run_harden
from refusal_lab.organism import corpus, values
from refusal_lab.organism.source import load_model, model_path
from refusal_lab.prove.stage import run_prove

OFF = {"ablation_aware": False, "invariance": 0.0}
VARIANTS = {
    "plain": dict(OFF),
    "+extended": {**OFF, "extended_refusals": True},
    "+aware": {**OFF, "ablation_aware": True},
    "+invariance": {**OFF, "invariance": 1.0},
    "default": {},  # ablation-aware (harmful and harmless examples) + invariance: the stage's defaults
    "default-aware-harmful-only": {"aware_harmless": False},
    "default-no-stage1": {"stage1_tokens": 0},
    "all": {"extended_refusals": True},
    "aware8": {"aware_directions": 8},
    "aware8-full": {"aware_directions": 8, "full_ablation": 0.6},
    "full06": {"full_ablation": 0.6},
    "full10": {"full_ablation": 1.0},
    "aware8-full10": {"aware_directions": 8, "full_ablation": 1.0},
    "aware8-full-retain3": {"aware_directions": 8, "full_ablation": 0.6, "retain": 3.0},
    "passes2": {"aware_passes": 2},
    "passes2-full10": {"aware_passes": 2, "full_ablation": 1.0},
    "passes2-aware-harmful-only": {"aware_passes": 2, "aware_harmless": False},
    "passes3": {"aware_passes": 3},
    "reest5": {"reestimate_every": 5},
    "reest5-passes2": {"reestimate_every": 5, "aware_passes": 2},
    "once": {"reestimate_every": 100_000},  # one estimate, before the first step (DeepRefusal's fixed direction)
}
ATTACKS = "arditi,saber,adaptive,subspace,rdo,search"


def row(label: str, m: dict, base: dict | None) -> str:
    w1, w5 = m["worst"].get("0.1"), m["worst"].get("0.5")
    b = m["before"]
    cap = b["capability"].get("capability", float("nan"))
    over = b.get("overrefusal_refused", float("nan"))
    comply = 1 - b.get("harmless_refused", 0.0)
    delta = ""
    if base is not None:
        bb = base["before"]
        delta = (
            f"  over-refusal {100 * (over - bb['overrefusal_refused']):+5.1f} pts"
            f"  capability {100 * (cap - bb['capability'].get('capability', float('nan'))):+5.1f} pts"
        )
    ret = lambda w: f"{w['retained']:6.1%} ({w['attack']})" if w else "  none fits"  # noqa: E731
    return (
        f"{label:<24} refused {b['refused_rate']:6.1%}  retained@0.1 {ret(w1):<22} retained@0.5 {ret(w5):<22}"
        f" harmless not refused {comply:6.1%}{delta}"
    )


def resumed(folder: Path, key: dict[str, Any], run: Callable[[], dict]) -> dict:
    """A row's proof: read back from folder/row.json when it was made with the same key, else run and kept."""
    saved = folder / "row.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("key") == key:
            return old
    res = run()
    row_ = {"key": key, "worst": res["worst"], "before": res["before"]}
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(row_, default=str))
    return row_


def overrides(pairs: list[str]) -> dict[str, str]:
    """--set section.key=value pairs as load_settings' dotted overrides."""
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--set {p!r}: expected section.key=value, e.g. --set harden.train_batch_size=2")
        out[k.strip()] = v.strip()
    return out


def with_twins(seed: int, share: float, out: Path) -> Path:
    """The organism's alignment set (seed `seed`) with `share` of its helpful rows made benign twins, as JSONL."""
    cfg = corpus.CorpusConfig(seed=seed, think=False)
    split = corpus.make_split(cfg)
    rows = values.alignment_set(cfg, split)
    rng = random.Random(seed + 99)
    persons = [(v, o) for v, o in split.train_pairs["safe"] if o in corpus.PEOPLE]
    for r in rows:
        if r["category"] == "helpful" and rng.random() < share:
            verb, obj = rng.choice(persons)
            req = corpus.harmless_request(rng, "safe", verb, obj, rng.choice(split.train_phrasings), False)
            r["messages"] = [{"role": "user", "content": req.prompt}, {"role": "assistant", "content": req.answer}]
    path = out / f"twins-{share}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiet(_m: str) -> None:
    pass


def proof(model: str, s: Settings, out: Path) -> dict:
    """The battery's record of one model (its worst cases and measures before any attack)."""
    return run_prove([model], s, None, out, True, quiet).to_json()["models"][0]


def sweep(s: Settings, name: str, variants: list[str], hseeds: list[int], out: Path, data: Path | None = None) -> None:
    """The base and every (variant, training seed) row of one model, printed as they finish; `data`: the
    alignment examples every variant trains on (default: the model's own)."""
    use_kernels(s.model.cpu_kernels, s.model.path)  # as the CLI would (the organism's: pinned)
    base = str(model_path(s, s.model.path))
    key = {"model": base, "settings": s.model_dump(mode="json", exclude={"cache_dir"})}
    start = time.perf_counter()
    base_res = resumed(out / "prove-base", key, lambda: proof(base, s, out / "prove-base"))
    print(row(f"{name} base", base_res, None), f"({time.perf_counter() - start:.0f} s)", flush=True)
    for variant in variants:
        for hs in hseeds:
            start = time.perf_counter()
            sv = s.model_copy(deep=True)
            for k, v in {**VARIANTS[variant], "harden_seed": hs}.items():
                setattr(sv.harden, k, v)
            if data is not None:
                sv.harden.data = data
            folder = out / variant / f"harden-seed{hs}"

            def run(sv: Settings = sv, folder: Path = folder) -> dict:
                run_harden(load_model(sv), sv, folder / "model", True, quiet)
                return proof(str(folder / "model"), sv, folder / "prove")

            res = resumed(folder, {**key, "settings": sv.model_dump(mode="json", exclude={"cache_dir"})}, run)
            label = f"{name} {variant}" + (f" h{hs}" if len(hseeds) > 1 or hs else "")
            print(row(label, res, base_res), f"({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism", help="the organism (default) or a model folder or hub id")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="organism seeds (the organism only)")
    ap.add_argument("--harden-seeds", type=int, nargs="+", default=[0], help="training seeds per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any other setting")
    ap.add_argument("--out", type=Path, default=Path("bench-out/harden"))
    ap.add_argument("--twins", type=float, metavar="SHARE", help="the organism: this share of helpful rows as twins")
    args = ap.parse_args()
    variants = args.variants.split(",")
    common = {"model.path": args.model, "prove.attacks": ATTACKS, "eval.escalation": "none", **overrides(args.set)}
    if args.model == "organism":
        for seed in args.seeds:
            s = load_settings(**common, **{"organism.seed": seed})
            out = args.out / f"seed{seed}"
            data = None if args.twins is None else with_twins(seed, args.twins, out)
            sweep(s, f"seed {seed}", variants, args.harden_seeds, out, data)
    else:
        sweep(load_settings(**common), Path(args.model).name, variants, args.harden_seeds, args.out)


if __name__ == "__main__":
    main()
