"""The kde family: the contract, the density against scikit-learn and brute force, the sampler, the reuse of
accumulate's scores, and the shape Kazdan et al. report (replace's test NLL grows, accumulate's stays low)."""

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import logsumexp
from sklearn.neighbors import KernelDensity

from modelcollapse.families import kde
from modelcollapse.loop import simulate
from modelcollapse.policies import from_spec
from modelcollapse.seeding import stream_keys
from modelcollapse.testing import check_family


def test_passes_check_family():
    rows = check_family("kde", {"n": 16, "n_test": 20, "bandwidth": 0.3})
    assert {r["metric"] for r in rows} == {"test_nll", "mean_sq_error", "trace_ratio"}


@pytest.mark.parametrize("dataset", ["moons", "circles", "blobs", "swiss_roll"])
def test_the_density_is_an_exact_log_sum_exp(dataset):
    """Our test NLL is brute force to 1e-12 on every toy set, and scikit-learn's where its tree keeps every
    kernel (far points, as on the swiss roll at a narrow bandwidth, it rounds away)."""
    fam = kde.Family(kde.Config(dataset=dataset, n=60, n_test=80, bandwidth="scott"))
    seeds = np.arange(3)
    train, test = fam.real_data("train", seeds), fam.real_data("test", seeds)
    model = fam.fit(train, None, None)
    assert model.bandwidth_ == pytest.approx(KernelDensity(bandwidth="scott").fit(train.parts[0][0]).bandwidth_)
    nll = fam.evaluate(model, test, None, None)["test_nll"]
    for s in seeds:
        x, p, h = test.x[s], train.parts[0][s], model.bandwidth_
        d2 = ((x[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        brute = -(logsumexp(-d2 / (2 * h * h), axis=1) - math.log(60) - math.log(2 * math.pi * h * h)).mean()
        assert nll[s] == pytest.approx(brute, rel=1e-12)
        if dataset != "swiss_roll":
            assert nll[s] == pytest.approx(-KernelDensity(bandwidth=h).fit(p).score_samples(x).mean(), rel=1e-10)


def test_silverman_is_scikit_learns_and_equals_scott_in_two_dimensions():
    config = kde.Config(bandwidth="silverman")
    x = np.zeros((37, 2))
    assert config.bandwidth_for(37) == pytest.approx(KernelDensity(bandwidth="silverman").fit(x).bandwidth_)
    assert config.bandwidth_for(37) == pytest.approx(kde.Config(bandwidth="scott").bandwidth_for(37))


def test_samples_are_a_training_point_plus_kernel_noise():
    """Mean of a sample: the training mean; its covariance: the training covariance plus h²I."""
    S, h = 20000, 0.3
    fam = kde.Family(kde.Config(n=10, bandwidth=h))
    train = fam.real_data("train", np.zeros(1, dtype=np.int64))
    train = kde.Points([np.broadcast_to(train.parts[0], (S, 10, 2))])
    x = fam.sample(fam.fit(train, None, None), 5, train, stream_keys(np.arange(S), "s"), None).parts[0]  # (S, 5, 2)
    mean, cov = train.parts[0][0].mean(0), np.cov(train.parts[0][0].T, bias=True) + h * h * np.eye(2)
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(np.diag(cov) / S))
    for i in range(5):
        assert np.allclose(np.cov(x[:, i].T, bias=True), cov, atol=4.5 * np.sqrt(2 / S) * cov.max())


def test_accumulates_reused_scores_equal_a_fresh_computation():
    config = kde.Config(n=20, n_test=30, bandwidth=0.2)
    seeds = list(range(4))
    reused = simulate(kde.Family(config), from_spec("accumulate"), seeds, 5)

    class Fresh(kde.Family):
        def evaluate(self, model, test, seed, workdir):
            self._scored = None
            return super().evaluate(model, test, seed, workdir)

    again = simulate(Fresh(config), from_spec("accumulate"), seeds, 5)
    assert all(np.allclose(reused[k], again[k], rtol=1e-12) for k in reused)


def test_replace_degrades_and_accumulate_stays_bounded():
    fam = kde.Family(kde.Config(dataset="blobs", n=50, n_test=100, bandwidth=0.2))
    replace, accumulate = (simulate(fam, from_spec(p), list(range(40)), 12)["test_nll"].mean(0) for p in ("replace", "accumulate"))
    assert replace[-1] > replace[0] + 0.5 and accumulate[-1] < accumulate[0] + 0.3


def test_bad_configs_are_refused():
    for bad in [dict(bandwidth=0), dict(bandwidth="wide"), dict(bandwidth=float("inf")), dict(dataset="iris"), dict(noise=-1.0)]:
        with pytest.raises(ValidationError):
            kde.Config(**bad)
