"""Child processes: how many threads each gets, and that they do not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """On Linux, have this process sent SIGTERM when its parent dies, even by kill -9: a sweep's cell or a
    data-parallel rank left running would go on holding its run directory. Elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def threads_each(n: int) -> str:
    """OMP_NUM_THREADS for each of n processes sharing this machine: the user's choice, else a share of the cores."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
