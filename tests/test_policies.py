"""Each policy trains generation n on exactly the data (and the amount) DESIGN.md says."""

import numpy as np
import pytest

from modelcollapse.policies import from_spec
from modelcollapse.seeding import rng

R = 10  # |real|


class Tagged:
    """Datasets as arrays of tags: 0 = real, k = sampled from model k, -d = the d-th fresh real draw."""

    def size(self, data):
        return len(data)

    def concat(self, datasets):
        return np.concatenate(datasets)

    def subsample(self, data, size, seed):
        return data[rng(seed).choice(len(data), size, replace=False)]


def pool_for(policy, n):
    """The pool after n − 1 generations, each synthetic set the size the policy asks for."""
    pool = [np.zeros(R, int)]
    for k in range(1, n):
        pool.append(np.full(policy.synthetic_size(k + 1, R), k))
    return pool


def counts(data):
    tags, c = np.unique(data, return_counts=True)
    return dict(zip(tags.tolist(), c.tolist()))


def train(policy, n, seed=0):
    return policy.training_set(n, pool_for(policy, n), Tagged(), seed, fresh_real=lambda: np.full(R, -n))


@pytest.mark.parametrize("name", ["replace", "accumulate", "replace-grown", "accumulate-subsample"])
def test_generation_one_is_real_data_only(name):
    assert counts(train(from_spec(name), 1)) == {0: R}


def test_replace_trains_on_the_newest_synthetic_set_only():
    for n in range(2, 6):
        assert counts(train(from_spec("replace"), n)) == {n - 1: R}


def test_accumulate_trains_on_real_and_every_synthetic_set():
    for n in range(2, 6):
        assert counts(train(from_spec("accumulate"), n)) == {k: R for k in range(n)}


def test_replace_grown_is_synthetic_only_at_accumulate_size():
    for n in range(2, 6):
        assert counts(train(from_spec("replace-grown"), n)) == {n - 1: n * R}


def test_accumulate_subsample_keeps_real_size_and_draws_from_the_whole_pool():
    p = from_spec("accumulate-subsample")
    data = train(p, 5)
    assert len(data) == R and len(set(data.tolist())) > 1
    assert set(data.tolist()) <= set(range(5))
    # over many seeds every set of the pool is drawn from, in proportion to its size
    tags = np.concatenate([train(p, 5, seed) for seed in range(400)])
    assert np.allclose(np.bincount(tags) / len(tags), 0.2, atol=0.02)


@pytest.mark.parametrize("lam", [0.3, 0.5, 0.8])
def test_mix_takes_a_fraction_of_real_and_the_rest_from_the_newest_model(lam):
    p = from_spec({"name": "mix", "real_fraction": lam})
    k = round(lam * R)
    for n in range(2, 5):
        assert counts(train(p, n)) == {0: k, n - 1: R - k}


def test_fresh_takes_its_real_part_from_new_real_data():
    p = from_spec({"name": "fresh", "real_fraction": 0.5})
    for n in range(2, 5):
        assert counts(train(p, n)) == {-n: 5, n - 1: 5}


def test_policies_are_pure():
    pool = pool_for(from_spec("accumulate"), 4)
    before = [a.copy() for a in pool]
    from_spec("accumulate-subsample").training_set(4, pool, Tagged(), 1)
    assert all(np.array_equal(a, b) for a, b in zip(pool, before))
    a = train(from_spec("accumulate-subsample"), 4, seed=3)
    b = train(from_spec("accumulate-subsample"), 4, seed=3)
    assert np.array_equal(a, b)
