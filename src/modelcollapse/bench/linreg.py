"""The linreg fast path against the way the public peer code fits: a per-seed Python loop calling
`np.linalg.pinv` on the stacked data every iteration (S = 100 seeds, T = 89, d = 7, 100 iterations).

Both sides see the same labels and must reach the same test errors. Ours runs `simulate` end to end (labels
drawn, fitted and scored for every seed at once); the baseline is handed every label's noise drawn in
advance (our streams, materialised outside its timing) and refits on the stacked data, one seed and
generation at a time, scoring each fit."""

from __future__ import annotations

import os

import numpy as np

from modelcollapse import procs
from modelcollapse.bench import median_ratio, paired_times, say
from modelcollapse.families import linreg as family_module
from modelcollapse.families.linreg import Block, Labels
from modelcollapse.loop import SEEDS_AT_ONCE, simulate
from modelcollapse.policies import from_spec
from modelcollapse.seeding import stream_keys


def draws(family, seeds: list[int], policy: str, N: int):
    """Each seed's design X (S, T, d), w* (S, d), real labels (S, T) and the noise ε/σ of every later
    generation's synthetic labels (S, N − 1, T), as our run draws them."""
    design, w_star = family.truth(seeds)
    _, _, y1 = family.real_data("train", np.array(seeds)).materialise()
    zero = np.zeros_like(w_star)
    E = [Labels(design, [Block(design, 1.0, zero, stream_keys(seeds, policy, n, "sample"), design.X.shape[1])]).materialise()[2]
         for n in range(2, N + 1)]
    return design.X, w_star, y1, np.stack(E, 1)


def baseline(X, w_star, y1, E, sigma: float, policy: str) -> np.ndarray:
    """Refit OLS with pinv on the whole stacked training set of every seed and iteration: test_error (S, N)."""
    S, N = X.shape[0], E.shape[1] + 1
    err = np.empty((S, N))
    for s in range(S):
        xs, ys = [X[s]], [y1[s]]
        w = np.linalg.pinv(X[s]) @ y1[s]
        err[s, 0] = np.sum((w - w_star[s]) ** 2)
        for n in range(1, N):
            y_new = X[s] @ w + sigma * E[s, n - 1]
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
        X, w_star, y1, E = draws(family, seeds, policy, N)
        out = {}
        t_ours, t_base = paired_times(
            lambda: out.__setitem__("ours", simulate(family, from_spec(policy), seeds, N)["test_error"]),
            lambda: out.__setitem__("base", baseline(X, w_star, y1, E, family.sigma, policy)),
            repeats=3 if quick else 5, what=f"linreg-{policy} ({S} seeds x {N} iterations)",
        )
        err = float(np.max(np.abs(out["ours"] - out["base"])))
        rows.append({
            "bench": f"linreg-{policy}", "ours": float(np.median(t_ours)), "baseline": float(np.median(t_base)),
            "unit": "s", "ratio": median_ratio(t_ours, t_base), "equal": err <= 1e-9, "max_abs_diff": err,
            "S": S, "T": T, "d": d, "iterations": N,
        })
    return rows


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (a split run's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def linreg_all(quick: bool = False, S: int = 2000, N: int = 100, d: int = 20, T: int = 200, loop_seeds: int = 10) -> list[dict]:
    """The whole run, as a user types it: all six policies, S seeds × N iterations into a run directory (its seeds
    split over --threads processes), against the generic loop (one seed at a time, a folder per generation) on
    the first `loop_seeds` seeds, per seed. Also what each wrote to disk."""
    import tempfile
    import time
    from pathlib import Path

    from modelcollapse import config as configlib
    from modelcollapse.loop import run_experiment
    from modelcollapse.store import read_metrics

    if quick:
        S, N, loop_seeds = 40, 6, 4
    policies = ["replace", "accumulate", "replace-grown", "accumulate-subsample",
                {"name": "mix", "real_fraction": 0.5}, {"name": "fresh", "real_fraction": 0.5}]

    def config(method: str, seeds: int):
        return configlib.from_dict({"name": "bench", "family": "linreg", "policies": policies, "iterations": N,
                                    "seeds": seeds, "linreg": {"d": d, "T": T, "method": method}})

    def size(path: Path, skip: str | None = None) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != skip)

    with tempfile.TemporaryDirectory() as tmp:
        say(f"running the fast path: 6 policies x {S} seeds x {N} iterations into a run directory")
        t0, c0 = time.perf_counter(), cpu_seconds()
        fast = run_experiment(config("fast", S), Path(tmp) / "fast", progress=False)
        t_fast, c_fast = time.perf_counter() - t0, cpu_seconds() - c0
        say(f"  {t_fast:.3g} s; running the generic loop on {loop_seeds} seeds (a folder per generation)")
        t0 = time.perf_counter()
        loop = run_experiment(config("loop", loop_seeds), Path(tmp) / "loop", progress=False)
        t_loop = time.perf_counter() - t0
        ours = {(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(fast)}
        diff = max(abs(r["value"] - ours[r["policy"], r["seed"], r["iteration"], r["metric"]]) for r in read_metrics(loop))
        metrics_mb, other_mb = (fast / "metrics.jsonl").stat().st_size / 2**20, size(fast, "metrics.jsonl") / 2**20
    return [{
        "bench": "linreg-all-policies", "ours": t_fast, "baseline": t_loop * S / loop_seeds, "unit": "s",
        "ours_cpu": c_fast,  # CPU seconds of this process and its workers: on a busy machine, the work itself
        "processes": min(procs.threads(), -(-S // SEEDS_AT_ONCE)),  # --threads: the seeds split over this many
        "ratio": (t_loop / loop_seeds) / (t_fast / S), "equal": diff <= 1e-9, "max_abs_diff": diff,
        "S": S, "T": T, "d": d, "iterations": N, "policies": 6, "baseline_seeds": loop_seeds,
        "metrics_jsonl_mb": round(metrics_mb, 1), "other_files_mb": round(other_mb, 2),
        "note": "baseline: the generic loop on baseline_seeds seeds, scaled to S",
    }]
