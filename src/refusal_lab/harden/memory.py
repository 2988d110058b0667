"""How much memory a training step takes and how much is free, so a batch that cannot fit is refused
with one that can before training starts (on the CPU the kernel kills a process that runs out of
memory without a word), and a GPU that runs out mid-run is named in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from refusal_lab.errors import UserError

STATUS = "/proc/self/status"  # this process's VmRSS (resident now) and VmHWM (its peak)
GIB = 2**30


def free_memory(device: torch.device) -> int | None:
    """Bytes a step may still take on `device`: MemAvailable on the CPU (Linux), free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return proc_bytes("/proc/meminfo", "MemAvailable")
    except (OSError, KeyError):
        return None


def proc_bytes(path: str, field: str) -> int:
    """A 'Field:  N kB' line of a /proc file, in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(device: torch.device) -> int | None:
    """Start a peak measurement; returns the memory in use now (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed blocks back to the system, so reuse does not hide cost
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return proc_bytes(STATUS, "VmRSS")
    except (OSError, KeyError):
        return None


def peak(device: torch.device) -> int:
    """The peak memory since reset_peak: CUDA's peak allocation, or this process's peak resident size."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_bytes(STATUS, "VmHWM")


def refuse_unless_fits(per_row: float, batch: int, free: int, longest: int, device: torch.device) -> None:
    """A UserError naming a batch that fits when `batch` rows of `per_row` bytes exceed 80% of `free`."""
    if per_row * batch <= 0.8 * free:
        return
    fits = int(0.8 * free // per_row)  # per_row > 0 here: a step of 0 bytes fits any batch
    fix = (
        f"pass --train-batch-size {fits} (or --gradient-checkpointing)"
        if fits >= 1
        else f"pass --train-batch-size 1 --max-length {max(8, longest // 2)} --gradient-checkpointing"
    )
    raise UserError(
        f"a training step of {batch} examples of up to {longest} tokens needs about "
        f"{per_row * batch / GIB:.1f} GiB, more than 80% of the {free / GIB:.1f} GiB of {device.type} memory free",
        fix,
    )


@contextmanager
def out_of_memory_named(device: torch.device, batch: int, where: str) -> Iterator[None]:
    """A GPU out of memory as one line with the settings that use less (the run resumes)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of {device.type} memory at {where} (batch {batch})",
            "pass a smaller --train-batch-size or --max-length, --gradient-checkpointing or --quantize 4bit;"
            " the run resumes from its last checkpoint",
        ) from None
