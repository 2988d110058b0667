"""Which hardening option makes refusals survive the battery: the ablation study, over organism seeds.

For every seed: the base organism is proved, then hardened once per variant and each hardened
model proved with the same battery (directional attacks; the fine-tuning attack is its own threat
model and is left out here). Printed per variant and seed: refusals retained under the worst
attack within KL 0.1 and 0.5, that attack, and what hardening cost (over-refusal, capability,
harmless compliance against the base). Usage:

    python bench/harden_ablation.py --seeds 0 1 2 --out bench-out/harden
    python bench/harden_ablation.py --seeds 0 --variants plain,default
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refusal_lab.config import load_settings
from refusal_lab.core.kernels import use_kernels
from refusal_lab.harden.stage import run_harden
from refusal_lab.organism.source import load_model, model_path
from refusal_lab.prove.stage import run_prove

OFF = {"ablation_aware": False, "invariance": 0.0, "matching": 0.0}
VARIANTS = {
    "plain": dict(OFF),
    "+extended": {**OFF, "extended_refusals": True},
    "+aware": {**OFF, "ablation_aware": True},
    "+invariance": {**OFF, "invariance": 1.0},
    "+matching": {**OFF, "matching": 0.1},
    "default": {},  # ablation-aware (harmful and harmless examples) + invariance: the stage's defaults
    "default-aware-harmful-only": {"aware_harmless": False},
    "default-no-stage1": {"stage1_tokens": 0},
    "all": {"matching": 0.1, "extended_refusals": True},
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("bench-out/harden"))
    args = ap.parse_args()
    quiet = lambda _m: None  # noqa: E731
    table: dict[str, list[str]] = {}
    for seed in args.seeds:
        s = load_settings(**{"organism.seed": seed, "prove.attacks": ATTACKS, "eval.escalation": "none"})
        use_kernels(s.model.cpu_kernels, s.model.path)  # the organism's: pinned, as the CLI would
        base = str(model_path(s, "organism"))
        start = time.perf_counter()
        proof = run_prove([base], s, None, args.out / f"seed{seed}" / "prove-base", True, quiet)
        base_res = proof.to_json()["models"][0]
        print(row(f"seed {seed} base", base_res, None), f"({time.perf_counter() - start:.0f} s)", flush=True)
        for name in args.variants.split(","):
            start = time.perf_counter()
            sv = s.model_copy(deep=True)
            for k, v in VARIANTS[name].items():
                setattr(sv.harden, k, v)
            out = args.out / f"seed{seed}" / name
            run_harden(load_model(sv), sv, out / "model", True, quiet)
            res = run_prove([str(out / "model")], sv, None, out / "prove", True, quiet).to_json()["models"][0]
            line = row(f"seed {seed} {name}", res, base_res)
            table.setdefault(name, []).append(line)
            print(line, f"({time.perf_counter() - start:.0f} s)", flush=True)
            (out / "row.json").write_text(json.dumps({"worst": res["worst"], "before": res["before"]}, default=str))


if __name__ == "__main__":
    main()
