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
])
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
])
def test_theory_command_bad_input_is_one_line_and_exit_2(args, message):
    import re

    from conftest import cli

    out = cli("theory", *args)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert re.search(message, out.stderr), out.stderr
