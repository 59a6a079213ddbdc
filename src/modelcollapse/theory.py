"""Closed forms from the paper's §3 (Theorems 1 and 2, and the "halfway" control).

With c = σ²d / (T − d − 1), the expected test error E‖ŵ_n − w*‖² after n iterations (n = 1: real data) is
- replace (Theorem 1, from Dohmatob et al. 2024): c · n
- accumulate (Theorem 2): c · Σ_{i≤n} 1/i², bounded by c · π²/6
- replace-grown (synthetic only, n·T samples at iteration n): c · Σ_{i≤n} 1/i
"""

from __future__ import annotations

import math

import numpy as np

from modelcollapse.errors import BadInput

LINREG_POLICIES = ("replace", "accumulate", "replace-grown")


def linreg_c(d: int, T: int, sigma2: float) -> float:
    if T < d + 2:
        raise BadInput(f"T must be at least d + 2 = {d + 2} for a finite test error (T={T}, d={d})")
    if d < 1 or sigma2 <= 0:
        raise BadInput(f"need d >= 1 and sigma2 > 0 (d={d}, sigma2={sigma2})")
    return sigma2 * d / (T - d - 1)


def linreg_test_error(policy: str, d: int, T: int, sigma2: float, iterations: int) -> np.ndarray:
    """E‖ŵ_n − w*‖² for n = 1..iterations."""
    if iterations < 1:
        raise BadInput(f"iterations must be at least 1 (got {iterations})")
    c = linreg_c(d, T, sigma2)
    n = np.arange(1, iterations + 1, dtype=float)
    if policy == "replace":
        return c * n
    if policy == "accumulate":
        return c * np.cumsum(1.0 / n**2)
    if policy == "replace-grown":
        return c * np.cumsum(1.0 / n)
    raise BadInput(f"no closed form for policy {policy!r}; choose one of {', '.join(LINREG_POLICIES)}")


def linreg_accumulate_bound(d: int, T: int, sigma2: float) -> float:
    return linreg_c(d, T, sigma2) * math.pi**2 / 6
