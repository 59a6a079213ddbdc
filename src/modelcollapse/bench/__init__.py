"""Benchmarks: ours against a baseline in one process, interleaved, on the same inputs.

Each returns rows `{"bench", "ours", "baseline", "unit", "ratio", "equal", ...}`; `ratio` is the median of
paired ratios (baseline time / our time, or our throughput / theirs), so a noisy, shared machine slows both
sides of a pair alike.
"""

from __future__ import annotations

import importlib
import sys
import time

import numpy as np

from modelcollapse.errors import BadInput

BENCHES = {  # name: (module, function, what it measures)
    "linreg": ("linreg", "linreg", "linreg's batched simulation against a per-seed NumPy loop, replace and accumulate"),
    "linreg-all": ("linreg", "linreg_all", "a whole linreg run of six policies into a run directory, fast path against the generic loop"),
    "gaussian": ("families", "gaussian", "the gaussian family's batched simulation against a per-seed NumPy loop"),
    "categorical": ("families", "categorical", "the categorical family's batched simulation against a per-seed NumPy loop"),
    "kde": ("families", "kde", "the KDE family's batched simulation against a per-seed NumPy/SciPy loop"),
    "lm-train": ("lm", "lm_train", "training tokens/s of our LM against transformers' LlamaForCausalLM of the same shape"),
    "lm-sample": ("lm", "lm_sample", "sampling tokens/s of our LM against transformers' generate, same weights"),
}


def say(message: str) -> None:
    """What a benchmark is doing, as it goes: on stderr, so stdout keeps only the result rows."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_bench(name: str, quick: bool = False) -> list[dict]:
    if name not in BENCHES:
        raise BadInput(f"bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}")
    module, func, what = BENCHES[name]
    say(f"{name}: {what}" + (" (--quick: a smoke run, numbers not meaningful)" if quick else ""))
    return getattr(importlib.import_module(f"modelcollapse.bench.{module}"), func)(quick=quick)


def paired_times(ours, baseline, repeats: int, what: str) -> tuple[list[float], list[float]]:
    """Wall times of `ours()` and `baseline()`, alternating, after one warm-up call of each."""
    say(f"timing {what}: one warm-up each, then {repeats} pair(s), ours then the baseline")
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
    say(f"  {what}: median ours {np.median(t_ours):.3g} s, baseline {np.median(t_base):.3g} s a call")
    return t_ours, t_base


def median_ratio(t_ours: list[float], t_base: list[float]) -> float:
    return float(np.median(np.array(t_base) / np.array(t_ours)))
