"""CPU kernels pinned so that training gives the same weights on every x86-64 machine.

Training amplifies the last bit of every sum, and each CPU's fastest kernels sum in their own
order (ATen dispatches AVX-512 or AVX2 code by CPU; MKL picks its GEMM code by vendor and
generation): the same seed trained on two machines gave two organisms that SABER moved by 51% and
86%. ATen's AVX2 kernels and MKL's COMPATIBLE branch exist on every x86-64 machine with AVX2 and
sum the same way on all of them, at about 1.8x the time of a matmul. Both are read once, at a
process's first tensor operation, so they are set in the environment before any.
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


def kernels_in_use() -> dict[str, str]:
    import torch

    return {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR", "native")}
