#!/usr/bin/env bash
# The checks CI cannot run, on a machine with a CUDA GPU: QLoRA (4-bit) hardening of the organism
# proved against its base; probe, ablate, eval and prove on a 4-bit and an 8-bit model (the ablated
# folder unquantized and loadable by from_pretrained, search and --device cpu refused); the CUDA
# tests, the harden tests on the GPU, the demo, and stage-2 throughput. Each step is timed and
# capped; everything goes to OUTDIR/log.txt.
#
#   bash bench/cuda_check.sh [OUTDIR] [CHECK...]   # checks: qlora quantized tests demo throughput (default: all)
# refusal-lab must be importable, with bitsandbytes ('.[qlora]'). QUANT_MODEL (default: organism) is
# what the quantized check loads: a model folder or hub id (a Qwen2.5 0.5B instruct model, say).
set -uo pipefail
out=${1:-cuda-check}
checks=" ${*:2} "
[ "$checks" = "  " ] && checks=" qlora quantized tests demo throughput "
mkdir -p "$out"
work=$(mktemp -d)
log="$out/log.txt"
rl=(python3 -m refusal_lab.cli)
qmodel=${QUANT_MODEL:-organism}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {  # step SECONDS NAME COMMAND...: run it capped, log its output, its exit code and its time
    local cap=$1 name=$2 t0=$SECONDS
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    timeout "$cap" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$log"
}

refused() {  # refused COMMAND...: rc 0 when COMMAND stops with a one-line error (exit code 2), else 1
    "$@"
    [ $? -eq 2 ]
}
export -f refused

{
    nvidia-smi -L
    python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__,
torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__,
'| accelerate', accelerate.__version__, '| bitsandbytes', b.__version__)"
} 2>&1 | tee -a "$log"

if [[ $checks == *" qlora "* ]]; then
    step 120 qlora-harden "${rl[@]}" harden organism --quantize 4bit -o "$work/h4"
    step 200 qlora-prove "${rl[@]}" prove organism "$work/h4" -o "$work/p4"
    cp "$work/p4/summary.md" "$out/qlora_prove.md" 2>/dev/null
fi
if [[ $checks == *" quantized "* ]]; then
    cat >"$work/unquantized.py" <<'PY'
"""An ablate folder written from a 4/8-bit model: full-precision tensors in the source's dtypes, every
tensor the edit leaves alone exactly the source's, no quantization_config, loadable by from_pretrained."""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM


def tensors(folder):
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "ablation.safetensors":
            with safe_open(str(f), "pt") as g:
                found.update({k: g.get_tensor(k) for k in g.keys()})
    return found


out = Path(sys.argv[1])
source = Path(json.loads((out / "ablation.json").read_text())["source"])
assert "quantization_config" not in json.loads((out / "config.json").read_text()), "config.json is quantized"
saved, original = tensors(out), tensors(source)
assert saved.keys() == original.keys(), "tensor names differ from the source's"
assert all(saved[k].dtype == original[k].dtype for k in saved), "dtypes differ from the source's"
same = sum(torch.equal(saved[k], original[k]) for k in saved)
assert 0 < same < len(saved), f"{same} of {len(saved)} tensors exactly the source's"
model = AutoModelForCausalLM.from_pretrained(out)
assert not getattr(model, "is_quantized", False) and not getattr(model, "is_loaded_in_4bit", False)
print(f"unquantized: {len(saved)} tensors, {same} exactly the source's, {len(saved) - same} edited")
PY
    for q in 4bit 8bit; do
        step 150 "probe-$q" "${rl[@]}" probe "$qmodel" --quantize $q -o "$work/probe-$q"
        step 200 "ablate-$q" "${rl[@]}" ablate "$qmodel" --quantize $q --probe "$work/probe-$q" -o "$work/ablated-$q"
        step 120 "unquantized-$q" python3 "$work/unquantized.py" "$work/ablated-$q"
        step 200 "eval-$q" "${rl[@]}" eval "$qmodel" "$work/ablated-$q" --base "$qmodel" --quantize $q --limit 16 \
            -o "$work/eval-$q"
        step 300 "prove-$q" "${rl[@]}" prove "$qmodel" --quantize $q \
            --attacks arditi,saber,adaptive,subspace,rdo,finetune,prefill -o "$work/prove-$q"
        step 60 "search-refused-$q" bash -c 'refused "$@"' _ "${rl[@]}" search "$qmodel" --quantize $q -o "$work/s-$q"
        step 60 "cpu-refused-$q" bash -c 'refused "$@"' _ "${rl[@]}" probe "$qmodel" --quantize $q --device cpu \
            -o "$work/c-$q"
        cp "$work/eval-$q/summary.md" "$out/quantized_eval_$q.md" 2>/dev/null
        cp "$work/prove-$q/summary.md" "$out/quantized_prove_$q.md" 2>/dev/null
    done
fi
if [[ $checks == *" tests "* ]]; then
    step 150 cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_harden.py \
        tests/test_quantized.py -k "not two_processes"
fi
if [[ $checks == *" demo "* ]]; then
    step 300 demo "${rl[@]}" demo -o "$work/demo"
    cp "$work/demo/prove/summary.md" "$out/demo_prove.md" 2>/dev/null
fi
[[ $checks == *" throughput "* ]] && step 60 throughput python3 bench/harden_throughput.py
grep -E "^=== .*rc" "$log"
