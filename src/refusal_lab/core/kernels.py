"""CPU kernels pinned so that training gives the same weights on every x86-64 machine.

Training amplifies the last bit of every sum, and each CPU's fastest kernels sum in their own
order (ATen dispatches AVX-512 or AVX2 code by CPU; MKL picks its GEMM code by vendor and
generation): the same seed trained on two machines gave two organisms that SABER moved by 51% and
86%. ATen's AVX2 kernels and MKL's COMPATIBLE branch exist on every x86-64 machine with AVX2 and
sum the same way on all of them, at about 1.8x the time of a matmul. Both are read once, at a
process's first tensor operation, so they are set in the environment before any. Also here: whether
the CPU computes bfloat16 natively, which decides whether bfloat16 is the fast dtype on it or the slow one.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path


def pinned_kernels() -> dict[str, str]:
    """The environment that pins them (empty off x86-64, where the native kernels are used)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def use_kernels(choice: str, model_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
    """Pin this process's kernels ('pinned', or 'auto' when every model is the organism or made from it)
    or leave them ('native'). Effective only before the process's first tensor operation.

    A command of several models (prove, eval) passes them all: a real model among them keeps the
    CPU's own kernels (pinned AVX2 ones are slower, and bfloat16 attention fails under them on some
    AVX-512 CPUs).
    """
    paths = [model_paths] if isinstance(model_paths, str | os.PathLike) else list(model_paths)
    if choice == "auto":
        from refusal_lab.core.sources import Source

        organism = all(str(p) == "organism" or Source.of(Path(p)).organism for p in paths)
        choice = "pinned" if organism else "native"
    if choice == "pinned":
        os.environ.update(pinned_kernels())


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); None where it cannot tell.

    Without it torch emulates bfloat16 matmuls: on a 2-core AVX2 CPU Qwen2.5-Coder-0.5B's first-token
    reads ran 6.6x and its replies 2.7x slower than in float32 (bench/dtype_speed.py), so a long run
    asked for in bfloat16 there is several times slower than the default.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[-1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return None if flags is None else any(f in flags for f in BF16_FLAGS)


def emulated_bf16_note(dtypes: Sequence[str], device: str, cpuinfo: str | None = None) -> str | None:
    """A one-line note where bfloat16 is asked for on a CPU that would emulate it, else None.

    `device` is the setting (auto runs on the CPU when no CUDA GPU is visible); torch is imported only
    once bfloat16 is asked for, so other commands start no slower."""
    if "bfloat16" not in dtypes:
        return None
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu or native_bf16(cpuinfo) is not False:
        return None
    return (
        "note: bfloat16 asked for on a CPU without native bfloat16 (no AVX512-BF16 or AMX): its matmuls are "
        "emulated and float32 (--dtype auto) is usually several times faster here"
    )


def kernels_in_use() -> dict[str, str]:
    import torch

    return {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR", "native")}
