"""Fault injection: a process that ends at a chosen step, so kill-and-resume is tested without timing.

Set RLAB_FAULT_AT_STEP=N in a run's environment and a loop that calls `maybe_fail(step)`
after each step's work (and after that step's checkpoint, where it writes one) ends the process
at once with exit code FAULT_EXIT_CODE when `step` is N: no clean-up, no atexit handlers, no
flushed-out output folder, as a kill -9 would leave it. Unset, empty or another step: nothing happens.
"""

from __future__ import annotations

import os
import sys

FAULT_ENV = "RLAB_FAULT_AT_STEP"  # outside REFUSAL_LAB_*, which the settings read
FAULT_EXIT_CODE = 86  # distinctive: neither success, a Python error (1), a usage error (2) nor a signal


def maybe_fail(step: int) -> None:
    """End the process with FAULT_EXIT_CODE if $RLAB_FAULT_AT_STEP equals `step` (the steps done so far)."""
    at = os.environ.get(FAULT_ENV, "").strip()
    if at and int(at) == step:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
