"""The linreg fast path against the way the public peer code fits: a per-seed Python loop calling
`np.linalg.pinv` on the stacked data every iteration (S = 100 seeds, T = 89, d = 7, 100 iterations)."""

from __future__ import annotations

import numpy as np

from modelcollapse.bench import median_ratio, paired_times
from modelcollapse.families.linreg import fit_chains


def draws(S: int, T: int, d: int, N: int, sigma2: float, seed: int = 0):
    g = np.random.default_rng(seed)
    X = g.standard_normal((S, T, d))
    w_star = g.standard_normal((S, d)) / np.sqrt(d)
    y1 = np.einsum("std,sd->st", X, w_star) + np.sqrt(sigma2) * g.standard_normal((S, T))
    E = np.sqrt(sigma2) * g.standard_normal((S, N - 1, T))
    return X, y1, E


def baseline(X, y1, E, policy: str) -> np.ndarray:
    """Refit OLS with pinv on the whole stacked training set of every seed and iteration."""
    S, N = X.shape[0], E.shape[1] + 1
    W = np.empty((S, N, X.shape[2]))
    for s in range(S):
        xs, ys = [X[s]], [y1[s]]
        W[s, 0] = np.linalg.pinv(X[s]) @ y1[s]
        for n in range(1, N):
            y_new = X[s] @ W[s, n - 1] + E[s, n - 1]
            if policy == "replace":
                xs, ys = [X[s]], [y_new]
            else:
                xs.append(X[s])
                ys.append(y_new)
            W[s, n] = np.linalg.pinv(np.concatenate(xs)) @ np.concatenate(ys)
    return W


def linreg(quick: bool = False, S: int = 100, T: int = 89, d: int = 7, N: int = 100) -> list[dict]:
    if quick:
        S, N = 10, 10
    X, y1, E = draws(S, T, d, N, sigma2=1.0)
    rows = []
    for policy in ("replace", "accumulate"):
        out = {}
        t_ours, t_base = paired_times(
            lambda: out.__setitem__("ours", fit_chains(X, y1, E, policy)),
            lambda: out.__setitem__("base", baseline(X, y1, E, policy)),
            repeats=3 if quick else 5,
        )
        err = float(np.max(np.abs(out["ours"] - out["base"])))
        rows.append({
            "bench": f"linreg-{policy}", "ours": float(np.median(t_ours)), "baseline": float(np.median(t_base)),
            "unit": "s", "ratio": median_ratio(t_ours, t_base), "equal": err <= 1e-9, "max_abs_diff": err,
            "S": S, "T": T, "d": d, "iterations": N,
        })
    return rows
