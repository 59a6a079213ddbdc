"""The linreg closed forms, and Monte-Carlo means of the real chains against them."""

import math

import numpy as np
import pytest

from modelcollapse import theory
from modelcollapse.errors import BadInput
from modelcollapse.families import linreg
from modelcollapse.loop import simulate
from modelcollapse.policies import from_spec


def test_worked_example_from_the_paper():
    # σ² = 1, d = 10, T = 111 ⇒ c = 0.1; after 10 iterations replace = 1.0, accumulate ≈ 0.155, bound ≈ 0.164
    assert theory.linreg_c(10, 111, 1.0) == pytest.approx(0.1)
    assert theory.linreg_test_error("replace", 10, 111, 1.0, 10)[-1] == pytest.approx(1.0)
    assert theory.linreg_test_error("accumulate", 10, 111, 1.0, 10)[-1] == pytest.approx(0.155, abs=5e-4)
    assert theory.linreg_accumulate_bound(10, 111, 1.0) == pytest.approx(0.1 * math.pi**2 / 6)
    grown = theory.linreg_test_error("replace-grown", 10, 111, 1.0, 4)
    assert grown == pytest.approx(0.1 * np.array([1, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25]))


def test_too_few_rows_is_bad_input():
    with pytest.raises(BadInput, match="d \\+ 2"):
        theory.linreg_c(10, 11, 1.0)


def mc(policy, d, T, sigma2, iterations, seeds):
    fam = linreg.Family(linreg.Config(d=d, T=T, sigma2=sigma2, n_test=10))
    return simulate(fam, from_spec(policy), list(range(seeds)), iterations)["test_error"]  # (S, N)


@pytest.mark.parametrize("d,T,sigma2,seeds", [(10, 111, 1.0, 3000), (4, 8, 0.5, 20000), (2, 30, 2.0, 3000)])
@pytest.mark.parametrize("policy", ["replace", "accumulate", "replace-grown"])
def test_monte_carlo_agrees_with_closed_form(policy, d, T, sigma2, seeds):
    """Means over seeds within 4 standard errors of theory at every iteration (T = 8 is d + 4: close to
    d + 2, where the error's variance is still finite)."""
    errors = mc(policy, d, T, sigma2, 8, seeds)
    mean, se = errors.mean(0), errors.std(0, ddof=1) / np.sqrt(seeds)
    expected = theory.linreg_test_error(policy, d, T, sigma2, 8)
    assert np.all(np.abs(mean - expected) <= 4 * se), (mean, expected, se)


def test_accumulate_stays_under_the_pi_squared_over_six_bound():
    d, T, sigma2 = 10, 50, 1.0
    errors = mc("accumulate", d, T, sigma2, 40, 2000)
    mean, se = errors.mean(0), errors.std(0, ddof=1) / np.sqrt(2000)
    assert np.all(mean <= theory.linreg_accumulate_bound(d, T, sigma2) + 4 * se)
    # while replace keeps growing past it
    assert mc("replace", d, T, sigma2, 40, 200).mean(0)[-1] > 10 * theory.linreg_accumulate_bound(d, T, sigma2)


def test_empirical_test_mse_reads_the_same_quantity():
    fam = linreg.Family(linreg.Config(d=5, T=40, sigma2=1.0, n_test=2000))
    m = simulate(fam, from_spec("replace"), list(range(500)), 5)
    # E[mse on fresh points] − σ² = E‖ŵ − w*‖²; the two readings agree up to test-set noise
    assert np.allclose(m["test_mse_excess"].mean(0), m["test_error"].mean(0), rtol=0.1)


@pytest.mark.parametrize("args,family,config,policy", [
    (["gaussian", "--policy", "replace", "--d", "3", "--n", "10", "--sigma2", "2", "--estimator", "unbiased"], "gaussian",
     {"d": 3, "n": 10, "sigma2": 2.0, "estimator": "unbiased"}, "replace"),
    (["categorical", "--policy", "mix", "--real-fraction", "0.5", "--k", "10", "--n", "20", "--zipf", "1.1"], "categorical",
     {"k": 10, "n": 20, "zipf": 1.1}, {"name": "mix", "real_fraction": 0.5}),
    (["categorical", "--policy", "fresh", "--real-fraction", "0.5", "--k", "4", "--n", "12", "--zipf", "1", "--reward", "0,1,3,2",
      "--select", "k-choice", "--score", "reward", "--select-k", "3", "--temperature", "0.5"], "categorical",
     {"k": 4, "n": 12, "zipf": 1.0, "reward": [0.0, 1.0, 3.0, 2.0]},
     {"name": "fresh", "real_fraction": 0.5, "select": {"name": "k-choice", "score": "reward", "k": 3, "temperature": 0.5}}),
    (["gaussian", "--policy", "mix", "--real-fraction", "0.5", "--real-weight", "0.7", "--d", "2", "--n", "10"], "gaussian",
     {"d": 2, "n": 10}, {"name": "mix", "real_fraction": 0.5, "real_weight": 0.7}),
], ids=["gaussian", "categorical", "categorical curation", "gaussian weighted"])
def test_theory_command_prints_the_familys_curves(args, family, config, policy):
    import json

    from conftest import cli
    from modelcollapse.families import load_family

    out = cli("theory", *args, "--iterations", "6", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    spec = load_family(family)
    expected = spec.theory(spec.Config(**config), from_spec(policy), 6)
    assert got["iteration"] == list(range(1, 7)) and set(got) == {"family", "policy", "iteration", *expected}
    assert got["policy"] == from_spec(policy).label
    for metric, curve in expected.items():
        assert np.allclose(got[metric], curve, rtol=1e-12)
    table = cli("theory", *args, "--iterations", "6")
    assert table.returncode == 0 and table.stdout.splitlines()[1].split("\t") == ["iteration", *expected]


@pytest.mark.parametrize("args,message", [
    (["kde"], "no closed forms for family 'kde'"),
    (["gaussian", "--T", "5"], "--T is not an option of gaussian"),
    (["gaussian", "--d", "5", "--n", "4"], "n must be at least d \\+ 1"),
    (["categorical", "--policy", "fresh"], "needs --real-fraction"),
    (["categorical", "--policy", "nope"], "unknown policy 'nope'"),
    (["gaussian", "--estimator", "median"], "estimator"),
    (["categorical", "--iterations", "0"], "iterations must be at least 1"),
    (["categorical", "--select-k", "3"], "name it with --select"),
    (["categorical", "--policy", "replace", "--k", "4", "--n", "8", "--select", "top-fraction", "--score", "reward"],
     "no exact curve for policy 'replace\\+top-fraction-reward-x4'"),
    (["categorical", "--reward", "up"], "--reward must be head, tail or comma-separated numbers"),
    (["linreg", "--real-weight", "0.5"], "no exact curve with a selection or a real weight"),
])
def test_theory_command_bad_input_is_one_line_and_exit_2(args, message):
    import re

    from conftest import cli

    out = cli("theory", *args)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert re.search(message, out.stderr), out.stderr


# -- selection and weighting (issue 13) -----------------------------------------------------------------------


def test_choice_probabilities_are_the_softmax_choice_among_k_and_tend_to_the_tilted_distribution():
    import itertools

    p, r, tau = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0.5, 0.0]), 0.7
    v = np.exp(r / tau)
    for k in (2, 3, 5):
        brute = np.zeros(3)
        for c in itertools.product(range(3), repeat=k):  # every ordered k-tuple of candidates
            brute += np.prod(p[list(c)]) * np.bincount(c, weights=v[list(c)] / v[list(c)].sum(), minlength=3)
        assert np.allclose(theory.choice_probs(p, r, k, tau), brute, atol=1e-12)
    tilted = p * v / (p @ v)  # Ferbach et al.'s k → ∞ limit
    gaps = [np.abs(theory.choice_probs(p, r, k, tau) - tilted).max() for k in (10, 100, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


@pytest.mark.parametrize("policy", [
    {"name": "replace", "select": {"name": "k-choice", "score": "reward", "k": 3, "temperature": 0.5}},
    {"name": "fresh", "real_fraction": 0.5, "select": {"name": "k-choice", "score": "reward", "k": 4}},
])
def test_curation_chain_agrees_with_monte_carlo(policy):
    """Every metric's exact expectation under k-choice curation on the reward, within 4 standard errors of
    20,000 chains at every iteration; reward rises and diversity falls under replace."""
    from mc import assert_within
    from modelcollapse.families import categorical

    config = categorical.Config(k=4, n=12, zipf=1.0)
    policy = from_spec(policy)
    expected = categorical.theory(config, policy, 8)
    assert set(expected) == set(theory.CATEGORICAL_METRICS)
    assert_within(categorical.Family(config), policy, 20000, 8, expected)
    if policy.name == "replace":
        assert expected["reward"][-1] > expected["reward"][0] + 0.1 and expected["gini_simpson"][-1] < 0.5 * expected["gini_simpson"][0]


def test_curation_has_no_exact_curve_where_the_chain_is_not_exact_or_too_large():
    from modelcollapse.families import categorical

    small = categorical.Config(k=4, n=12)
    k_choice = {"name": "k-choice", "score": "reward", "k": 3}
    assert categorical.theory(small, from_spec({"name": "accumulate", "select": k_choice}), 3) is None
    assert categorical.theory(small, from_spec({"name": "replace", "select": {"name": "top-fraction", "score": "reward"}}), 3) is None
    assert categorical.theory(small, from_spec({"name": "mix", "real_fraction": 0.5, "real_weight": 0.3}), 3) is None
    noisy = categorical.Config(k=4, n=12, verifier_noise=0.5)
    assert categorical.theory(noisy, from_spec({"name": "replace", "select": k_choice | {"score": "verifier"}}), 3) is None
    assert categorical.theory(categorical.Config(k=100, n=100), from_spec({"name": "replace", "select": k_choice}), 3) is None
    # the mean-field curve iterates q: an approximation, off the exact curve at small n
    mean_field = theory.curation_mean_field(small.truth, small.rewards, 3, 1.0, 8) @ small.rewards
    exact = categorical.theory(small, from_spec({"name": "replace", "select": k_choice}), 8)["reward"]
    assert mean_field[0] == pytest.approx(exact[0]) and abs(mean_field[-1] - exact[-1]) > 0.01


@pytest.mark.parametrize("estimator", ["mle", "unbiased"])
@pytest.mark.parametrize("policy", [{"name": "mix", "real_fraction": 0.5, "real_weight": 0.8},
                                    {"name": "fresh", "real_fraction": 0.3, "real_weight": 0.2},
                                    {"name": "fresh", "real_fraction": 0.5, "real_weight": 0.618}])
def test_gaussian_real_weight_curves_agree_with_monte_carlo(policy, estimator):
    from mc import assert_within
    from modelcollapse.families import gaussian

    config = gaussian.Config(d=2, n=10, estimator=estimator)
    policy = from_spec(policy)
    expected = gaussian.theory(config, policy, 10)
    assert set(expected) == {"trace_ratio", "mean_sq_error"}
    assert_within(gaussian.Family(config), policy, 6000, 10, expected)


def test_gaussian_weighted_curves_reduce_to_the_plain_ones_and_exist_only_where_exact():
    from modelcollapse.families import gaussian

    config = gaussian.Config(d=3, n=20, estimator="unbiased")
    for name in ("mix", "fresh"):
        plain = gaussian.theory(config, from_spec({"name": name, "real_fraction": 0.25}), 6)
        weighted = gaussian.theory(config, from_spec({"name": name, "real_fraction": 0.25, "real_weight": 0.25}), 6)
        assert all(np.allclose(plain[k], weighted[k], rtol=1e-12) for k in plain)  # w = m/n is the plain fit
    assert gaussian.theory(config, from_spec({"name": "accumulate", "real_weight": 0.5}), 6) is None
    assert gaussian.theory(config, from_spec({"name": "replace", "real_weight": 0.5}), 6).keys() == gaussian.theory(config, from_spec("replace"), 6).keys()
    assert gaussian.theory(config, from_spec({"name": "replace", "select": {"name": "top-fraction", "score": "likelihood"}}), 6) is None


def test_the_golden_ratio_optimum_of_the_fixed_variance_mean_error():
    """He, Xu & Cheng's claim: with k synthetic = m real points and the synthetic variance held at the
    truth's, the limit of the mean's error V(w) = [w²/m + (1 − w)²/k]/(1 − (1 − w)²) is least at w = 1/φ. The
    exact recursion (which lets the variance move) puts fresh's optimum near it."""
    from modelcollapse.families import gaussian

    w = np.linspace(0.05, 0.95, 901)
    V = (w**2 + (1 - w) ** 2) / (1 - (1 - w) ** 2)
    assert w[np.argmin(V)] == pytest.approx((math.sqrt(5) - 1) / 2, abs=1e-3)
    config = gaussian.Config(d=1, n=200)
    limit = [gaussian.theory(config, from_spec({"name": "fresh", "real_fraction": 0.5, "real_weight": float(x)}), 400)["mean_sq_error"][-1]
             for x in w[::10]]
    assert w[::10][np.argmin(limit)] == pytest.approx(0.618, abs=0.02)
