"""The categorical family: the contract, exact draws and subsamples, and every theory curve (the closed forms
and each outcome's count chain) against Monte Carlo."""

import math

import numpy as np
import pytest
from pydantic import ValidationError

from mc import POLICIES, assert_within
from modelcollapse import theory
from modelcollapse.families import categorical
from modelcollapse.policies import from_spec
from modelcollapse.seeding import stream_keys
from modelcollapse.testing import check_family


def test_passes_check_family():
    rows = check_family("categorical", {"k": 12, "n": 20, "smoothing": 0.5})
    assert {r["metric"] for r in rows} == set(theory.CATEGORICAL_METRICS)


def test_draws_follow_the_fit_and_subsamples_are_hypergeometric():
    S = 20000
    fam = categorical.Family(categorical.Config(k=6, n=30, zipf=1.0))
    real = fam.real_data("train", np.arange(S))
    counts = real.counts.astype(float)
    assert (counts.sum(1) == 30).all()
    p = fam.p
    assert np.all(np.abs(counts.mean(0) - 30 * p) < 4.5 * np.sqrt(30 * p * (1 - p) / S))
    # a fit of one fixed count vector, sampled: multinomial with the fitted (smoothed) probabilities
    c = np.array([10, 0, 5, 0, 0, 15])
    for alpha in (0.0, 0.5):
        model = categorical.Fitted(np.broadcast_to(c, (S, 6)), 30, alpha)
        drawn = fam.sample(model, 40, real, stream_keys(np.arange(S), "s", alpha), None).counts.astype(float)
        q = (c + alpha) / (30 + 6 * alpha)
        assert (drawn.sum(1) == 40).all() and (alpha > 0 or (drawn[:, c == 0] == 0).all())
        assert np.all(np.abs(drawn.mean(0) - 40 * q) <= 4.5 * np.sqrt(40 * q * (1 - q) / S) + 1e-12)
    # a subsample of 12 of those 30 draws: each count hypergeometric, never above the pool's
    pool = categorical.Counts(np.broadcast_to(c, (S, 6)), 30)
    sub = fam.subsample(pool, 12, stream_keys(np.arange(S), "sub")).counts.astype(float)
    assert (sub.sum(1) == 12).all() and (sub <= c).all()
    var = 12 * (c / 30) * (1 - c / 30) * (30 - 12) / 29
    assert np.all(np.abs(sub.mean(0) - 12 * c / 30) <= 4.5 * np.sqrt(var / S) + 1e-12)


def test_the_tail_is_the_fewest_rarest_outcomes_holding_a_tenth():
    assert categorical.tail_of(np.full(10, 0.1)).tolist() == [False] * 9 + [True]
    assert categorical.tail_of(np.full(8, 0.125)).sum() == 1
    p = categorical.Config(k=100, zipf=1.0).truth
    tail = categorical.tail_of(p)
    assert p[tail].sum() >= 0.1 and p[tail].sum() - p[tail].max() < 0.1 and tail[-1] and not tail[0]


def test_kl_runs_from_the_fit_and_stays_finite_when_outcomes_are_lost():
    fam = categorical.Family(categorical.Config(k=50, n=10, zipf=1.0))
    metrics = fam.evaluate(fam.fit(fam.real_data("train", np.arange(100)), None, None), fam.p, None, None)
    assert (metrics["lost"] >= 40).all() and np.isfinite(metrics["kl"]).all() and (metrics["kl"] > 0).all()


SETTINGS = [dict(k=10, n=15), dict(k=30, n=10, zipf=1.2), dict(k=8, n=12, zipf=0.0),
            dict(probs=[0.4, 0.3, 0.2, 0.06, 0.04], n=10, smoothing=0.3)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["zipf", "k>n", "uniform", "smoothed"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p if isinstance(p, str) else p["name"])
def test_monte_carlo_agrees_with_every_curve(settings, policy):
    """K > n + 1 runs each chain from the real counts; K ≤ n + 1 from each outcome's distribution."""
    config, policy = categorical.Config(**settings), from_spec(policy)
    expected = categorical.theory(config, policy, 8)
    assert set(expected) == set(theory.CATEGORICAL_METRICS)
    assert_within(categorical.Family(config), policy, 3000, 8, expected)


def test_closed_forms_are_the_fields_and_the_chain_agrees():
    """Wright–Fisher: E[gini]_t = (1 − 1/n)^t gini_0 under replace, ∏(1 − 1/(n k²)) under accumulate, where
    the expected number of lost outcomes stays at its first value; the chain computes the same numbers."""
    config = categorical.Config(k=20, n=15, zipf=1.0)
    p = config.truth
    g0, t = 1 - np.sum(p**2), np.arange(1, 11)
    tail = categorical.tail_of(p)
    for name, factor in [("replace", (1 - 1 / 15) ** t), ("accumulate", np.cumprod(1 - 1 / (15 * t**2)))]:
        assert np.allclose(categorical.theory(config, from_spec(name), 10)["gini_simpson"], g0 * factor)
        chain = theory.categorical_chain(from_spec(name), p, tail, 15, 0.0, 10)
        assert np.allclose(chain["gini_simpson"], g0 * factor, rtol=1e-9)
    lost = theory.categorical_chain(from_spec("accumulate"), p, tail, 15, 0.0, 10)["lost"]
    assert np.allclose(lost, np.sum((1 - p) ** 15))
    # replace's lost outcomes, from the binomial chain's matrix powers written out
    from scipy.stats import binom

    P = binom.pmf(np.arange(16)[None, :], 15, np.arange(16)[:, None] / 15)
    start = binom.pmf(np.arange(16)[None, :], 15, p[:, None])
    expected = [np.sum(start @ np.linalg.matrix_power(P, k)[:, 0]) for k in range(10)]
    assert np.allclose(theory.categorical_chain(from_spec("replace"), p, tail, 15, 0.0, 10)["lost"], expected)
    # without smoothing E p̂ = p under every policy: the tail keeps its mass in expectation
    for policy in POLICIES:
        assert np.allclose(categorical.theory(config, from_spec(policy), 10)["tail_mass"], p[tail].sum())


def test_a_chain_over_budget_leaves_only_the_closed_form():
    config = categorical.Config(k=1000, n=2000)
    assert theory.chain_cost(from_spec("accumulate"), 2000, 1000, 50) > theory.CHAIN_BUDGET
    assert set(categorical.theory(config, from_spec("accumulate"), 50)) == {"gini_simpson"}
    assert categorical.theory(config.model_copy(update={"smoothing": 1.0}), from_spec("accumulate"), 50) is None


def test_replace_loses_outcomes_and_accumulate_keeps_them():
    config = categorical.Config(k=100, n=100, zipf=1.0)
    replace, accumulate = (categorical.theory(config, from_spec(p), 25) for p in ("replace", "accumulate"))
    assert replace["lost"][-1] > replace["lost"][0] + 30 and accumulate["lost"][-1] == pytest.approx(accumulate["lost"][0])
    assert replace["entropy"][-1] < accumulate["entropy"][-1] - 0.3


def test_bad_configs_are_refused():
    for bad, match in [(dict(probs=[0.5, 0.6]), "summing to 1"), (dict(probs=[1.0, 0.0]), "positive"),
                       (dict(k=3, probs=[0.5, 0.5]), "k = 3"), (dict(zipf=1.0, probs=[0.5, 0.5]), "not both"),
                       (dict(smoothing=-1.0), "greater than or equal")]:
        with pytest.raises(ValidationError, match=match):
            categorical.Config(**bad)
    assert math.isclose(categorical.Config(probs=[0.25, 0.75]).truth.sum(), 1.0)
