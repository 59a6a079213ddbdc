"""The linreg fast path against the way the public peer code fits: a per-seed Python loop calling
`np.linalg.pinv` on the stacked data every iteration (S = 100 seeds, T = 89, d = 7, 100 iterations).

Both sides go end to end on the same draws: ours runs `simulate` (labels drawn, fitted and scored for every
seed at once); the baseline draws each seed's labels from the same streams, one seed and generation at a
time, refits on the stacked data and scores each fit, and must reach the same test errors."""

from __future__ import annotations

import numpy as np

from modelcollapse.bench import median_ratio, paired_times
from modelcollapse.families import linreg as family_module
from modelcollapse.loop import simulate
from modelcollapse.policies import from_spec
from modelcollapse.seeding import normal, stream_keys


def truth(family, seeds: list[int]):
    """Each seed's design X (S, T, d), w* (S, d) and real labels (S, T), as our run draws them."""
    design, w_star = family.truth(seeds)
    _, _, y1 = family.real_data("train", np.array(seeds)).materialise()
    return design.X, w_star, y1


def baseline(seeds, X, w_star, y1, sigma: float, policy: str, N: int) -> np.ndarray:
    """Refit OLS with pinv on the whole stacked training set of every seed and iteration: test_error (S, N)."""
    T = X.shape[1]
    err = np.empty((len(seeds), N))
    for s, seed in enumerate(seeds):
        xs, ys = [X[s]], [y1[s]]
        w = np.linalg.pinv(X[s]) @ y1[s]
        err[s, 0] = np.sum((w - w_star[s]) ** 2)
        for n in range(1, N):
            y_new = X[s] @ w + sigma * normal(stream_keys([seed], policy, n + 1, "sample"), T)[0]
            if policy == "replace":
                xs, ys = [X[s]], [y_new]
            else:
                xs.append(X[s])
                ys.append(y_new)
            w = np.linalg.pinv(np.concatenate(xs)) @ np.concatenate(ys)
            err[s, n] = np.sum((w - w_star[s]) ** 2)
    return err


def linreg(quick: bool = False, S: int = 100, T: int = 89, d: int = 7, N: int = 100) -> list[dict]:
    if quick:
        S, N = 10, 10
    family = family_module.Family(family_module.Config(d=d, T=T, sigma2=1.0, n_test=10))
    seeds = list(range(S))
    rows = []
    for policy in ("replace", "accumulate"):
        X, w_star, y1 = truth(family, seeds)
        out = {}
        t_ours, t_base = paired_times(
            lambda: out.__setitem__("ours", simulate(family, from_spec(policy), seeds, N)["test_error"]),
            lambda: out.__setitem__("base", baseline(seeds, X, w_star, y1, family.sigma, policy, N)),
            repeats=3 if quick else 5,
        )
        err = float(np.max(np.abs(out["ours"] - out["base"])))
        rows.append({
            "bench": f"linreg-{policy}", "ours": float(np.median(t_ours)), "baseline": float(np.median(t_base)),
            "unit": "s", "ratio": median_ratio(t_ours, t_base), "equal": err <= 1e-9, "max_abs_diff": err,
            "S": S, "T": T, "d": d, "iterations": N,
        })
    return rows
