"""Monte Carlo against theory: shared by the families' tests."""

import numpy as np

from modelcollapse.loop import simulate

POLICIES = ["replace", "accumulate", "replace-grown", "accumulate-subsample", {"name": "mix", "real_fraction": 0.5},
            {"name": "fresh", "real_fraction": 0.3}]


def assert_within(family, policy, seeds: int, iterations: int, expected: dict, k: float = 4.0) -> dict:
    """Every metric of `expected` (an array per iteration) within k standard errors of the mean over `seeds`
    chains at every iteration (exactly equal where the chains never vary). Returns the simulated metrics."""
    assert expected, "no theory to check"
    sims = simulate(family, policy, list(range(seeds)), iterations, policy.select, policy.real_weight)
    for metric, curve in expected.items():
        values = sims[metric]
        mean, se = values.mean(0), values.std(0, ddof=1) / np.sqrt(seeds)
        gap = np.abs(mean - curve)
        ok = np.where(se > 0, gap <= k * se, gap <= 1e-9 * np.maximum(1, np.abs(curve)))
        assert ok.all(), f"{policy.label} {metric}: mean {mean} vs theory {curve} (se {se})"
    return sims
