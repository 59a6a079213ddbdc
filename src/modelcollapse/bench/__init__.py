"""Benchmarks: ours against a baseline in one process, interleaved, on the same inputs.

Each returns rows `{"bench", "ours", "baseline", "unit", "ratio", "equal", ...}`; `ratio` is the median of
paired ratios (baseline time / our time, or our throughput / theirs), so a noisy, shared machine slows both
sides of a pair alike.
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from modelcollapse.errors import BadInput

BENCHES = {"linreg": ("linreg", "linreg"), "linreg-all": ("linreg", "linreg_all"), "gaussian": ("families", "gaussian"),
           "categorical": ("families", "categorical"), "kde": ("families", "kde"), "lm-train": ("lm", "lm_train"),
           "lm-sample": ("lm", "lm_sample")}


def run_bench(name: str, quick: bool = False) -> list[dict]:
    if name not in BENCHES:
        raise BadInput(f"bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}")
    module, func = BENCHES[name]
    return getattr(importlib.import_module(f"modelcollapse.bench.{module}"), func)(quick=quick)


def paired_times(ours, baseline, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of `ours()` and `baseline()`, alternating, after one warm-up call of each."""
    ours(), baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        baseline()
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_base.append(t2 - t1)
    return t_ours, t_base


def median_ratio(t_ours: list[float], t_base: list[float]) -> float:
    return float(np.median(np.array(t_base) / np.array(t_ours)))
