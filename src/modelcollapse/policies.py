"""Data policies: which data generation n trains on, as a pure function of (n, pool, real).

`pool[0]` is the real training set and `pool[k]` (k >= 1) the synthetic set sampled from model k, which
generation k + 1 trains on. Policies only ask the family to measure, concatenate and subsample datasets, so
every policy works with every family.
"""

from __future__ import annotations

from typing import Callable

from modelcollapse.config import PolicySpec
from modelcollapse.families import Data, FamilyProtocol


def real_part(policy: PolicySpec, real_size: int) -> int:
    """How many real examples `mix`/`fresh` put in each later generation."""
    return round(policy.real_fraction * real_size)


def synthetic_size(policy: PolicySpec, n: int, real_size: int) -> int:
    """How many examples the newest model samples for generation n (n >= 2)."""
    if policy.name == "replace-grown":
        return n * real_size  # as much as accumulate trains on, all from the newest model
    if policy.name in ("mix", "fresh"):
        return real_size - real_part(policy, real_size)  # the rest is real
    return real_size  # the paper's default: a synthetic set the size of the real one


def training_set(
    policy: PolicySpec,
    n: int,
    pool: list[Data],
    family: FamilyProtocol,
    seed: int,
    fresh_real: Callable[[], Data] | None = None,
) -> Data:
    """The training set of generation n. `seed` drives any subsampling; `fresh_real()` gives new real data."""
    real = pool[0]
    # 1) the first model is fit on real data alone, whatever the policy
    if n == 1:
        return real
    # 2) replace: the newest synthetic set only (replace-grown's is just larger)
    if policy.name in ("replace", "replace-grown"):
        return pool[-1]
    # 3) accumulate: real data and every synthetic set so far, n * |real| examples
    if policy.name == "accumulate":
        return family.concat(pool)
    # 4) accumulate-subsample: the accumulated pool, cut to |real| (fixed compute per generation)
    if policy.name == "accumulate-subsample":
        return family.subsample(family.concat(pool), family.size(real), seed)
    # 5) mix: a fraction λ of |real| from the real data, the rest from the newest model
    k = real_part(policy, family.size(real))
    if policy.name == "mix":
        return family.concat([family.subsample(real, k, seed), pool[-1]])
    # 6) fresh: like mix, but the real part is new real data each generation
    assert policy.name == "fresh" and fresh_real is not None
    return family.concat([family.subsample(fresh_real(), k, seed), pool[-1]])
