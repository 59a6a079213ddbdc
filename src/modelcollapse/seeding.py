"""Derived random streams: every (seed, policy, generation, purpose) gets its own.

A generation's draws then depend only on where it sits in the experiment, not on the order in which chains
run or on whether the run was resumed half-way.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed from a base seed and a path of keys (strings hashed with crc32, stable across runs)."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def stream_seed(seed: int, policy: str, generation: int, purpose: str) -> int:
    """The seed the loop hands to a family call: `purpose` is "fit", "evaluate", "sample" or "policy"."""
    return derive_seed(seed, policy, generation, purpose)


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))
