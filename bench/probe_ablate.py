"""Benchmark: one SABER pass (capture + extraction + edit) against one plain forward pass.

Both run in the same process over the same prompts and batch size, so the ratio is fair;
a forward pass is the floor (capture is a forward pass with hooks). Iterative passes are
timed apart. Usage:

    python bench/probe_ablate.py                                   # the embedded organism
    python bench/probe_ablate.py --model DIR --harmful FILE.csv --column forbidden_prompt
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from refusal_lab.ablate.edit import apply_weights
from refusal_lab.ablate.saber import picks_to_ablations, saber, saber_pick
from refusal_lab.config import PromptSettings, load_settings
from refusal_lab.core.activations import capture
from refusal_lab.core.generate import encode
from refusal_lab.core.sources import Source
from refusal_lab.organism.source import load_model
from refusal_lab.probe.directions import probe_layers


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    s = load_settings(**{"model.path": args.model, "model.dtype": args.dtype})
    loaded = load_model(s)
    model, tok = loaded.model, loaded.tokenizer
    sets = Source.of(loaded.source).probe_sets(PromptSettings(harmful=args.harmful, column=args.column))
    harmful, harmless, cap = sets.texts("harmful")[:49], sets.texts("harmless")[:49], sets.texts("capability")[:30]
    everything = harmful + harmless + cap
    a = loaded.adapter
    cfg, popts = s.ablate.saber, s.probe
    print(
        f"model {s.model}  layers {a.num_layers}  hidden {a.hidden_size}  prompts {len(harmful)}+{len(harmless)}"
        f"+{len(cap)}  batch {args.batch_size}  threads {torch.get_num_threads()}"
    )
    print(f"peak RSS after load: {rss_mb():.0f} MB")

    @torch.inference_mode()
    def forward() -> None:
        for start in range(0, len(everything), args.batch_size):
            model(**encode(tok, everything[start : start + args.batch_size], model.device), use_cache=False)

    def one_pass() -> None:
        x = {
            n: capture(model, tok, a, p, "last", args.batch_size, keep=len(p)).vectors[:, 0]
            for n, p in (("h", harmful), ("b", harmless), ("c", cap))
        }
        probe = probe_layers(popts.extraction, x["h"], x["b"], x["c"], popts.directions_per_layer, biproject=True)
        return picks_to_ablations(probe, saber_pick(probe, cfg), a.num_layers, cfg)

    forward()  # warm-up
    fwd, pas = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        forward()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        ablations = one_pass()
        pas.append(time.perf_counter() - t)
    t = time.perf_counter()
    apply_weights(a, ablations)
    edit_s = time.perf_counter() - t
    f, p = min(fwd), min(pas)
    print(f"plain forward pass:                {f:8.3f} s   (best of {args.repeats})")
    print(f"capture + extraction + selection:  {p:8.3f} s   ratio {p / f:.2f}x")
    print(f"weight edit (in place):            {edit_s:8.3f} s")
    print(f"one pass incl. edit:               {p + edit_s:8.3f} s   ratio {(p + edit_s) / f:.2f}x  (target <= 2x)")
    loaded2 = load_model(s)
    t = time.perf_counter()
    res = saber(loaded2.model, tok, loaded2.adapter, harmful, harmless, cap, popts, cfg, args.batch_size)
    it = time.perf_counter() - t
    print(f"iterative SABER, {len(res.passes)} passes (hooks):   {it:8.3f} s   ratio {it / f:.2f}x")
    print(f"peak RSS: {rss_mb():.0f} MB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
