"""The gaussian family: the contract, exact statistics and points, metrics against reference code, and every
theory curve against Monte Carlo."""

import math
from typing import Literal

import numpy as np
import pytest
import scipy.linalg
from pydantic import ValidationError

from mc import POLICIES, assert_within
from modelcollapse import theory
from modelcollapse.families import gaussian
from modelcollapse.policies import Policy, from_spec
from modelcollapse.seeding import stream_keys
from modelcollapse.testing import check_family

COV = [[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.7]]


def test_passes_check_family():
    rows = check_family("gaussian", {"d": 3, "n": 12, "cov": COV, "mean": [1.0, -1.0, 2.0], "estimator": "unbiased"})
    assert {r["metric"] for r in rows} == {"trace_ratio", "mean_sq_error", "det_ratio", "kl", "w2"}


def block(S=20000, n=6, tag="t"):
    L = np.linalg.cholesky(np.array(COV))
    m = np.array([1.0, -1.0, 2.0])
    return gaussian.Block(np.broadcast_to(m, (S, 3)), np.broadcast_to(L, (S, 3, 3)), stream_keys(np.arange(S), tag), n), m, L


@pytest.mark.parametrize("n", [2, 4, 6, 40])
def test_a_blocks_points_have_its_statistics_and_are_iid_gaussian(n):
    """Drawn as statistics (n ≥ d + 1) or point by point (n ≤ d), every block's points reproduce its mean and
    scatter exactly, and each point is N(μ, Σ), independent of the others."""
    S = 10000
    b, m, L = block(S, n)
    x = b.points(np.repeat(np.arange(S), n), np.tile(np.arange(n), S)).reshape(S, n, 3)
    xbar, scatter = gaussian._moments(x)
    assert np.allclose(xbar, b.xbar, atol=1e-12) and np.allclose(scatter, b.scatter, atol=1e-10)
    z = np.linalg.solve(L, (x - m)[..., None])[..., 0]  # (S, n, 3): should be i.i.d. N(0, 1)
    assert np.all(np.abs(z.mean(0)) < 4.5 / np.sqrt(S))
    assert np.all(np.abs(z.var(0) - 1) < 4.5 * np.sqrt(2 / S))
    if n >= 2:
        assert np.all(np.abs((z[:, 0, :, None] * z[:, 1, None, :]).mean(0)) < 4.5 / np.sqrt(S))


def test_a_subsample_picks_exactly_the_points_of_the_pool():
    fam = gaussian.Family(gaussian.Config(d=3, n=8, cov=COV))
    seeds = np.arange(5)
    real = fam.real_data("train", seeds)
    model = fam.fit(real, None, None)
    pool = fam.concat([real, fam.sample(model, 8, real, stream_keys(seeds, "s"), None), fam.sample(model, 3, real, stream_keys(seeds, "t"), None)])
    every = pool.points_at(np.broadcast_to(np.arange(19), (5, 19)))  # (5, 19, 3)
    keys = stream_keys(seeds, "pick")
    sub = fam.subsample(pool, 7, keys)
    from modelcollapse.seeding import choose

    assert np.allclose(sub.parts[0].x, np.take_along_axis(every, choose(keys, 19, 7)[..., None], 1), atol=1e-12)
    N, mean, scatter = pool.moments()
    assert N == 19 and np.allclose(mean, every.mean(1)) and np.allclose(scatter, gaussian._moments(every)[1])


def test_metrics_agree_with_reference_formulas():
    fam = gaussian.Family(gaussian.Config(d=3, n=10, cov=COV, mean=[1.0, 0.0, -1.0]))
    model = fam.fit(fam.real_data("train", np.arange(4)), None, None)
    got = fam.evaluate(model, fam.real_data("test", np.arange(4)), None, None)
    S0, m0 = np.array(COV), np.array([1.0, 0.0, -1.0])
    for s in range(4):
        S1, m1 = model.chol_[s] @ model.chol_[s].T, model.mean_[s]
        delta = m1 - m0
        kl = 0.5 * (np.trace(np.linalg.solve(S1, S0)) + delta @ np.linalg.solve(S1, delta) - 3 + math.log(np.linalg.det(S1) / np.linalg.det(S0)))
        root = scipy.linalg.sqrtm(S0)
        w2 = math.sqrt(delta @ delta + np.trace(S1 + S0 - 2 * np.real(scipy.linalg.sqrtm(root @ S1 @ root))))
        assert got["kl"][s] == pytest.approx(kl, rel=1e-9)
        assert got["w2"][s] == pytest.approx(w2, rel=1e-7)
        assert got["det_ratio"][s] == pytest.approx(np.linalg.det(S1) / np.linalg.det(S0), rel=1e-9)
        assert got["trace_ratio"][s] == pytest.approx(np.trace(S1) / np.trace(S0), rel=1e-12)
        assert got["mean_sq_error"][s] == pytest.approx(delta @ delta, rel=1e-12)


def test_closed_forms_are_the_fields():
    """FIELD.md's formulas, t = 1..N: replace with the MLE and the unbiased covariance, accumulate's products."""
    n, d, N = 7, 3, 12
    t = np.arange(1, N + 1)
    T, M = theory.second_moments(from_spec("replace"), n, N, ddof=0)
    assert np.allclose(T, (1 - 1 / n) ** t) and np.allclose(M, 1 - (1 - 1 / n) ** t)
    T, M = theory.second_moments(from_spec("replace"), n, N, ddof=1)
    assert np.allclose(T, 1) and np.allclose(M, t / n)
    T, M = theory.second_moments(from_spec("accumulate"), n, N, ddof=0)
    shrink = np.cumprod(1 - 1 / (n * t**2))
    assert np.allclose(T, shrink)
    assert np.allclose(M, np.cumsum(1 / t**2 * np.concatenate([[1], shrink[:-1]])) / n)
    assert T[-1] > math.sin(math.pi / math.sqrt(n)) / (math.pi / math.sqrt(n))  # bounded away from 0
    det = theory.wishart_chain(from_spec("replace"), d, n, N)["det_ratio"]
    assert np.allclose(det, np.prod(1 - np.arange(1, d + 1) / n) ** t)


@pytest.mark.parametrize("settings", [dict(d=2, n=10), dict(d=3, n=20, estimator="unbiased"),
                                      dict(d=3, n=12, cov=COV, mean=[1.0, -1.0, 2.0])], ids=["d2n10", "unbiased", "full-cov"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p if isinstance(p, str) else p["name"])
def test_monte_carlo_agrees_with_every_curve(settings, policy):
    config = gaussian.Config(**settings)
    policy = from_spec(policy)
    expected = gaussian.theory(config, policy, 8)
    assert {"trace_ratio", "mean_sq_error"} <= set(expected)
    assert ("det_ratio" in expected) == ("kl" in expected) == (policy.name in ("replace", "replace-grown"))
    assert_within(gaussian.Family(config), policy, 4000, 8, expected)


def test_the_determinant_with_n_close_to_d():
    """n = d + 2: each generation keeps ∏(1 − i/n) = 0.192 of the determinant in expectation. E tr Σ⁻¹ is
    infinite for n ≤ d + 2, so there is no KL curve."""
    config = gaussian.Config(d=3, n=5)
    expected = gaussian.theory(config, from_spec("replace"), 3)
    assert "kl" not in expected and expected["det_ratio"] == pytest.approx(0.192 ** np.arange(1, 4))
    assert_within(gaussian.Family(config), from_spec("replace"), 20000, 3, expected)


def test_replace_collapses_and_accumulate_does_not():
    config = gaussian.Config(d=2, n=20)
    replace, accumulate = (gaussian.theory(config, from_spec(p), 200)["trace_ratio"] for p in ("replace", "accumulate"))
    assert replace[-1] < 0.01 and accumulate[-1] > 0.9


def test_bad_configs_are_refused():
    for bad, match in [(dict(d=5, n=5), "at least d \\+ 1"), (dict(d=2, cov=[[1, 2], [2, 1]]), "positive definite"),
                       (dict(d=2, cov=[[1, 0], [0, 1]], sigma2=2.0), "not both"), (dict(d=2, mean=[0.0]), "d = 2 entries")]:
        with pytest.raises(ValidationError, match=match):
            gaussian.Config(**bad)


class Unknown(Policy):  # not registered: theory sees only its name
    name: Literal["unknown"] = "unknown"


def test_a_policy_without_a_recursion_has_no_curve():
    assert gaussian.theory(gaussian.Config(d=2, n=10), Unknown(), 5) is None
