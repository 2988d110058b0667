"""Benchmark: does an exported GGUF decode like the model folder? f16 token identity, q8_0 first-token agreement.

Each type is exported with `refusal-lab export`'s code (llama.cpp's converter), decoded greedily by
llama.cpp (xllamacpp) from the same chat-templated token ids as transformers, and compared.

    python bench/gguf_roundtrip.py ~/models/qwen2.5-coder-0.5b-instruct --types f16 q8_0 --tokens 24
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from refusal_lab.config import load_settings
from refusal_lab.core.sources import Source, builtin_prompts
from refusal_lab.ship.gguf import export_gguf, greedy_ids, llama_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--prompts", type=int, default=16, help="harmless eval prompts (its own or ours)")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    shipped = Source.of(args.model).shipped("harmless", "eval")  # an organism's own held-out prompts
    prompts = [p.prompt for p in shipped or builtin_prompts("harmless", "eval")][: args.prompts]
    ids = []
    for p in prompts:
        x = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        ids.append(list(x["input_ids"] if isinstance(x, dict) else x))
    start = time.perf_counter()
    with torch.no_grad():
        hf = [
            model.generate(torch.tensor([x]), max_new_tokens=args.tokens, do_sample=False)[0, len(x) :].tolist()
            for x in ids
        ]
    print(
        f"{args.model.name}: {len(prompts)} prompts, {args.tokens} greedy tokens; "
        f"transformers {time.perf_counter() - start:.0f} s"
    )
    cache = load_settings().cache_dir
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            t0 = time.perf_counter()
            gguf = export_gguf(args.model, Path(tmp) / f"m-{kind}.gguf", kind, cache)
            t1 = time.perf_counter()
            with llama_server(gguf) as url:
                ours = [greedy_ids(url, x, args.tokens) for x in ids]
            t2 = time.perf_counter()
            same = sum(a == b for a, b in zip(ours, hf, strict=True))
            first = sum(a[:1] == b[:1] for a, b in zip(ours, hf, strict=True))
            agree = [
                next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b)))
                for a, b in zip(ours, hf, strict=True)
            ]
            print(
                f"  {kind}: identical sequences {same}/{len(ids)}, first token {first}/{len(ids)}, "
                f"mean agreeing prefix {sum(agree) / len(agree):.1f} tokens; "
                f"export {t1 - t0:.0f} s ({gguf.stat().st_size / 2**20:.0f} MiB), llama.cpp decoding {t2 - t1:.0f} s"
            )


if __name__ == "__main__":
    main()
