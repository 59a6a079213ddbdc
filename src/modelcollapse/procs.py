"""Threads and child processes: how many threads this process and each child gets, and that children do not
outlive the process that started them."""

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


THREADS_ENV = "MODELCOLLAPSE_THREADS"
DEFAULT_THREADS = 1  # the toolkit's CPU models are small: a second thread gains little, and on shared cores costs much


def user_threads() -> str | None:
    """The thread count the user chose ($MODELCOLLAPSE_THREADS, which --threads exports, or OMP_NUM_THREADS set
    by hand), None where they chose none."""
    return os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or None


def threads() -> int:
    """The cores this process may use: the user's choice (see set_threads), else DEFAULT_THREADS."""
    try:
        return max(1, int(user_threads() or DEFAULT_THREADS))
    except ValueError:
        return DEFAULT_THREADS


def threads_each(n: int) -> str:
    """OMP_NUM_THREADS for each of n processes sharing this machine: the user's choice, else DEFAULT_THREADS."""
    return user_threads() or str(DEFAULT_THREADS)


def set_threads(n: int | None = None) -> int:
    """Set the torch/OpenMP/BLAS threads of this process and of the processes it starts, and return the number:
    `n` (--threads), else $MODELCOLLAPSE_THREADS, else OMP_NUM_THREADS, else DEFAULT_THREADS. A choice of the
    user's is exported as $MODELCOLLAPSE_THREADS too, which a Ray cell then takes over its config's `cpus`.
    Called before numpy or torch is imported, the environment is enough; torch, when already imported, is told too."""
    from modelcollapse.errors import BadInput

    given = str(n) if n is not None else user_threads()
    try:
        n = int(given) if given else DEFAULT_THREADS
    except ValueError:
        n = 0
    if n < 1:
        name = THREADS_ENV if os.environ.get(THREADS_ENV) else "OMP_NUM_THREADS"
        raise BadInput(f"{name} must be a positive integer (got {given!r})")
    if given:
        os.environ[THREADS_ENV] = str(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
