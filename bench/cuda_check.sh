#!/usr/bin/env bash
# The checks CI cannot run, on a machine with a CUDA GPU: QLoRA (4-bit) hardening of the organism
# proved against its base, the CUDA tests, the harden tests on the GPU, the demo, and stage-2
# throughput. Each step is timed and capped; everything goes to OUTDIR/log.txt.
#
#   bash bench/cuda_check.sh [OUTDIR] [CHECK...]   # checks: qlora tests demo throughput (default: all)
# refusal-lab must be importable, with bitsandbytes ('.[qlora]').
set -uo pipefail
out=${1:-cuda-check}
checks=" ${*:2} "
[ "$checks" = "  " ] && checks=" qlora tests demo throughput "
mkdir -p "$out"
work=$(mktemp -d)
log="$out/log.txt"
rl=(python3 -m refusal_lab.cli)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {  # step SECONDS NAME COMMAND...: run it capped, log its output, its exit code and its time
    local cap=$1 name=$2 t0=$SECONDS
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    timeout "$cap" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$log"
}

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
if [[ $checks == *" tests "* ]]; then
    step 150 cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_harden.py \
        -k "not two_processes"
fi
if [[ $checks == *" demo "* ]]; then
    step 300 demo "${rl[@]}" demo -o "$work/demo"
    cp "$work/demo/prove/summary.md" "$out/demo_prove.md" 2>/dev/null
fi
[[ $checks == *" throughput "* ]] && step 60 throughput python3 bench/harden_throughput.py
grep -E "^=== .*rc" "$log"
