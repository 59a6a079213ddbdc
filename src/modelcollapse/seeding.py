"""Derived random streams: every (seed, policy, generation, purpose) gets its own.

A generation's draws then depend only on where it sits in the experiment, not on the order in which chains
run or on whether the run was resumed half-way.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed from a base seed and a path of keys: a hash, stable across runs and machines (and
    ten times cheaper than a SeedSequence, which matters when thousands of seeds each draw every generation)."""
    path = "/".join(map(str, (seed, *keys))).encode()
    return int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "little") >> 1


def stream_seed(seed: int, policy: str, generation: int, purpose: str) -> int:
    """The seed the loop hands to a family call: `purpose` is "fit", "evaluate", "sample" or "policy"."""
    return derive_seed(seed, policy, generation, purpose)


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))
