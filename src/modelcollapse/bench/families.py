"""The gaussian, categorical and kde fast paths against the obvious per-seed loop (replace and accumulate).

Each baseline is the loop the field's public code writes: for every seed, generation after generation, stack
the training points, fit and score them with NumPy (the KDE's density by `scipy.special.logsumexp` over every
pair: scikit-learn's `KernelDensity`, which Kazdan et al.'s code calls, is slower still and rounds far-away
kernels to zero, so it would not reach our exact numbers once replace drifts from the data), sample the
next set. So that both sides must reach the same numbers, the baseline is
handed our random draws, made outside its timing: the gaussian's standardised points y (a sample of a fit
(m, L) is m + Ly, and y does not depend on the fit), the categorical's uniforms (a draw is the training draw at
position ⌊uN⌋ of the outcome-sorted draws), the KDE's picks and kernel noise. Ours runs `simulate` end to end:
draws, fits and metrics of every seed at once."""

from __future__ import annotations

import math

import numpy as np

from modelcollapse.bench import median_ratio, paired_times
from modelcollapse.families import categorical as categorical_family
from modelcollapse.families import gaussian as gaussian_family
from modelcollapse.families import kde as kde_family
from modelcollapse.loop import simulate
from modelcollapse.policies import from_spec
from modelcollapse.seeding import normal, stream_keys, subkeys, uniform


def compare(family, name: str, policies, draws, baseline, config: dict, repeats: int) -> list[dict]:
    """A row per policy: median times of `simulate` and of `baseline(draws(policy), policy)`, their paired
    ratio, and whether every metric agrees to 1e-6, relative: after a hundred refits under replace the
    gaussian's covariance is nearly singular (det Σ/det Σ₀ ~ 1e-31), and its determinant and KL then carry
    the condition number's rounding (1e-8 between two exact computations)."""
    rows = []
    for policy in policies:
        inputs, out = draws(policy), {}
        N = config["iterations"]
        seeds = list(range(config["S"]))
        t_ours, t_base = paired_times(
            lambda: out.__setitem__("ours", simulate(family, from_spec(policy), seeds, N)),
            lambda: out.__setitem__("base", baseline(inputs, policy)),
            repeats=repeats, what=f"{name}-{policy}",
        )
        diff = max(float(np.max(np.abs(out["ours"][k] - v) / np.maximum(np.abs(v), 1e-300))) for k, v in out["base"].items())
        rows.append({"bench": f"{name}-{policy}", "ours": float(np.median(t_ours)), "baseline": float(np.median(t_base)),
                     "unit": "s", "ratio": median_ratio(t_ours, t_base), "equal": diff <= 1e-6, "max_rel_diff": diff, **config})
    return rows


def gaussian(quick: bool = False, S: int = 100, d: int = 10, n: int = 100, N: int = 100) -> list[dict]:
    if quick:
        S, N = 10, 10
    family = gaussian_family.Family(gaussian_family.Config(d=d, n=n))
    seeds = np.arange(S)
    zero, eye = np.zeros((S, d)), np.broadcast_to(np.eye(d), (S, d, d))
    rows, cols = np.repeat(np.arange(S), n), np.tile(np.arange(n), S)

    def draws(policy):
        """Every generation's standardised points (S, N, n, d), as our run draws them."""
        keys = [stream_keys(seeds, "gaussian", "real", 0)] + [stream_keys(seeds, policy, t, "sample") for t in range(2, N + 1)]
        return np.stack([gaussian_family.Block(zero, eye, k, n).points(rows, cols).reshape(S, n, d) for k in keys], 1)

    truth = family.truth
    Sigma0 = truth.chol @ truth.chol.T
    w, V = np.linalg.eigh(Sigma0)
    root0 = V @ np.diag(np.sqrt(w)) @ V.T

    def baseline(Y, policy):
        out = {k: np.empty((S, N)) for k in ("trace_ratio", "mean_sq_error", "det_ratio", "kl", "w2")}
        for s in range(S):
            sets = [truth.mean + Y[s, 0] @ truth.chol.T]
            for t in range(N):
                x = sets[-1] if policy == "replace" else np.concatenate(sets)
                m, C = x.mean(0), np.cov(x, rowvar=False, bias=True)
                delta = m - truth.mean
                logdet = np.linalg.slogdet(C)[1]
                out["trace_ratio"][s, t] = np.trace(C) / truth.trace
                out["mean_sq_error"][s, t] = delta @ delta
                out["det_ratio"][s, t] = math.exp(logdet - truth.logdet)
                out["kl"][s, t] = 0.5 * (np.trace(np.linalg.solve(C, Sigma0)) + delta @ np.linalg.solve(C, delta) - d + logdet - truth.logdet)
                nuclear = np.sqrt(np.maximum(np.linalg.eigvalsh(root0 @ C @ root0), 0)).sum()
                out["w2"][s, t] = math.sqrt(max(delta @ delta + np.trace(C) + truth.trace - 2 * nuclear, 0.0))
                if t < N - 1:
                    sets.append(m + Y[s, t + 1] @ np.linalg.cholesky(C).T)
        return out

    return compare(family, "gaussian", ["replace", "accumulate"], draws, baseline, {"S": S, "d": d, "n": n, "iterations": N}, 3 if quick else 5)


def categorical(quick: bool = False, N: int = 100) -> list[dict]:
    """Two settings: many seeds of a small distribution (S = 1000, K = n = 100), where the per-seed loop's
    Python overhead dominates, and few seeds of a large one (S = 100, K = n = 1000), where both sides pay
    per draw (and ours also draws its uniforms, which the baseline is handed)."""
    if quick:
        return categorical_at(10, 100, 100, 10, quick=True)
    return categorical_at(1000, 100, 100, N) + categorical_at(100, 1000, 1000, N)


def categorical_at(S: int, k: int, n: int, N: int, quick: bool = False) -> list[dict]:
    family = categorical_family.Family(categorical_family.Config(k=k, n=n, zipf=1.0))
    seeds = np.arange(S)
    real = family.real_data("train", seeds).counts.astype(np.int64)
    p, tail = family.p, family.tail

    def draws(policy):
        """Every later generation's uniforms (S, N − 1, n), as our run draws them."""
        return np.stack([uniform(stream_keys(seeds, policy, t, "sample")[:, None], np.arange(n, dtype=np.uint64)) for t in range(2, N + 1)], 1)

    def baseline(U, policy):
        out = {m: np.empty((S, N)) for m in ("gini_simpson", "entropy", "lost", "tail_mass", "tv", "kl")}
        for s in range(S):
            pool = np.repeat(np.arange(k), real[s])  # the real draws
            for t in range(N):
                counts = np.bincount(pool, minlength=k)
                q = counts / len(pool)
                seen = q > 0
                out["gini_simpson"][s, t] = 1 - q @ q
                out["entropy"][s, t] = -q[seen] @ np.log(q[seen])
                out["lost"][s, t] = k - seen.sum()
                out["tail_mass"][s, t] = q[tail].sum()
                out["tv"][s, t] = 0.5 * np.abs(q - p).sum()
                out["kl"][s, t] = q[seen] @ np.log(q[seen] / p[seen])
                if t < N - 1:
                    ordered = np.sort(pool)
                    new = ordered[np.minimum((U[s, t] * len(pool)).astype(np.int64), len(pool) - 1)]
                    pool = new if policy == "replace" else np.concatenate([pool, new])
        return out

    return compare(family, "categorical", ["replace", "accumulate"], draws, baseline, {"S": S, "k": k, "n": n, "iterations": N}, 3 if quick else 5)


def kde(quick: bool = False, S: int = 20, n: int = 100, n_test: int = 500, N: int = 20, h: float = 0.1) -> list[dict]:
    from scipy.special import logsumexp

    if quick:
        S, N, n_test = 4, 5, 100
    family = kde_family.Family(kde_family.Config(dataset="moons", n=n, n_test=n_test, bandwidth=h))
    seeds = np.arange(S)
    real, test = family.real_data("train", seeds).parts[0], family.real_data("test", seeds)

    def draws(policy):
        """Every later generation's pick uniforms (S, N − 1, n) and kernel noise (S, N − 1, n, 2)."""
        keys = [stream_keys(seeds, policy, t, "sample") for t in range(2, N + 1)]
        picks = np.stack([uniform(subkeys(k, "pick")[:, None], np.arange(n, dtype=np.uint64)) for k in keys], 1)
        noise = np.stack([normal(subkeys(k, "noise"), 2 * n).reshape(S, n, 2) for k in keys], 1)
        return picks, noise

    def baseline(inputs, policy):
        picks, noise = inputs
        out = {m: np.empty((S, N)) for m in ("test_nll", "mean_sq_error", "trace_ratio")}
        for s in range(S):
            sets = [real[s]]
            for t in range(N):
                x = sets[-1] if policy == "replace" else np.concatenate(sets)
                d2 = ((test.x[s][:, None, :] - x[None, :, :]) ** 2).sum(-1)
                out["test_nll"][s, t] = -(logsumexp(-d2 / (2 * h * h), axis=1) - math.log(len(x) * 2 * math.pi * h * h)).mean()
                out["mean_sq_error"][s, t] = np.sum((x.mean(0) - test.mean[s]) ** 2)
                out["trace_ratio"][s, t] = (x.var(0).sum() + 2 * h * h) / test.trace[s]
                if t < N - 1:
                    sets.append(x[np.minimum((picks[s, t] * len(x)).astype(np.int64), len(x) - 1)] + h * noise[s, t])
        return out

    return compare(family, "kde", ["replace", "accumulate"], draws, baseline, {"S": S, "n": n, "n_test": n_test, "iterations": N, "bandwidth": h}, 2 if quick else 3)
