"""Derived random streams: every (seed, policy, generation, purpose) gets its own.

A generation's draws then depend only on where it sits in the experiment, not on the order in which chains
run or on whether the run was resumed half-way.

Two kinds of stream:
- `stream_seed`: one integer seed, for families that seed a generator of their own (torch, numpy), one seed
  at a time;
- `stream_keys` and the counter-based draws below it, for batched families that run thousands of seeds at
  once: a stream is a 64-bit key, and draw i of the stream keyed k is a pure function of (k, i) — SplitMix64
  (Steele, Lea & Flood 2014, the generator of java.util.SplittableRandom): mix(k + (i + 1)·γ). Every seed's
  draws then come out of one vectorised call, with no generator object per stream, and any draw can be
  recomputed on its own (a subsample needs only the labels it keeps).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # the golden-ratio increment of SplitMix64
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


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


# -- counter-based streams, vectorised over seeds -------------------------------------------------------------


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, a bijection of 64-bit words (a new array)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def stream_keys(seeds, *path: str | int) -> np.ndarray:
    """The key of stream `path` (e.g. policy, generation, purpose) for each seed: uint64 (S,)."""
    with np.errstate(over="ignore"):
        salt = np.uint64(derive_seed(0, *path))
        return mix64(mix64(np.asarray(seeds, dtype=np.uint64) + GAMMA) ^ salt)


def subkeys(keys: np.ndarray, *path: str | int) -> np.ndarray:
    """Keys of a named sub-stream of each stream (e.g. "noise" and "rows" of one sampling call)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(keys, dtype=np.uint64) ^ np.uint64(derive_seed(1, *path)))


def bits(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw `counters` of the streams `keys`, elementwise (the two broadcast together): uint64."""
    keys, counters = np.asarray(keys, dtype=np.uint64), np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix64(keys + (counters + np.uint64(1)) * GAMMA)


def uniform(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1], 53 bits each, elementwise over (keys, counters)."""
    return ((bits(keys, counters) >> np.uint64(11)) + np.uint64(1)) * 2.0**-53


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    return r * np.cos(theta), r * np.sin(theta)


def normal_at(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Standard normal number `index` of the streams `keys`, elementwise (the two broadcast together):
    Box–Muller on the pair of uniforms (2j, 2j + 1), j = index // 2, the cosine for even indices and the sine
    for odd ones. So `normal_at(keys[:, None], arange(n))` is `normal(keys, n)`."""
    index = np.asarray(index, dtype=np.uint64)
    first = (index >> np.uint64(1)) << np.uint64(1)
    cos, sin = _box_muller(uniform(keys, first), uniform(keys, first + np.uint64(1)))
    return np.where(index & np.uint64(1), sin, cos)


def normal(keys: np.ndarray, n: int) -> np.ndarray:
    """The first n standard normals of each stream keyed `keys` (S,): (S, n)."""
    half = (n + 1) // 2
    j = np.arange(half, dtype=np.uint64) << np.uint64(1)
    keys = np.asarray(keys, dtype=np.uint64)[:, None]
    out = np.empty((len(keys), 2 * half))
    out[:, 0::2], out[:, 1::2] = _box_muller(uniform(keys, j), uniform(keys, j + np.uint64(1)))
    return out[:, :n]


CHOOSE_CHUNK = 1 << 24  # index entries held at once by `choose` (64 MiB of int32)
_IDENTITY = threading.local()  # choose's index buffer, lent to one call at a time per thread


def _identity(rows: int, population: int, dtype) -> np.ndarray:
    """A buffer of at least (rows, population) with arange in every row: the last call's where it is large
    enough and was given back (a call that raised never gives it back, so no stale swaps survive), else a new
    one, grown ahead of a pool that accumulates every generation."""
    held = _IDENTITY.__dict__.pop("buffer", None)
    if held is None or held.shape[0] < rows or held.shape[1] < population or held.dtype != dtype:
        width = population if held is None or held.shape[1] >= population else int(1.5 * population)
        held = np.broadcast_to(np.arange(width, dtype=dtype), (rows, width)).copy()
    return held


def choose(keys: np.ndarray, population: int, k: int) -> np.ndarray:
    """k distinct indices of range(population) for each stream, uniformly without replacement: (S, k).

    A partial Fisher–Yates shuffle, vectorised over the streams: step i swaps position i with a uniform
    position in [i, population). Streams go in chunks so memory stays bounded however large the population;
    one index buffer serves every chunk, the positions a chunk touched put back after it."""
    keys = np.asarray(keys, dtype=np.uint64)
    if not 0 <= k <= population:
        raise ValueError(f"cannot choose {k} distinct items of {population}")
    dtype = np.int32 if population < 2**31 else np.int64
    u = uniform(keys[:, None], np.arange(k, dtype=np.uint64))  # (S, k)
    steps = np.arange(k)
    j = steps + np.minimum((u * (population - steps)).astype(np.int64), population - 1 - steps)  # (S, k) in [i, population)
    out = np.empty((len(keys), k), dtype=np.int64)
    chunk = max(1, min(len(keys), CHOOSE_CHUNK // max(population, 1)))
    buffer = _identity(chunk, population, dtype)
    idx = buffer[:chunk, :population]
    for lo in range(0, len(keys), chunk):
        n = min(chunk, len(keys) - lo)
        rows, jj = np.arange(n), j[lo : lo + n]
        for i in range(k):
            held = idx[rows, i]  # fancy indexing copies
            idx[rows, i] = idx[rows, jj[:, i]]
            idx[rows, jj[:, i]] = held
        out[lo : lo + n] = idx[:n, :k]
        idx[rows[:, None], jj] = jj  # put back what this chunk moved: positions < k and the j's
        idx[:n, :k] = np.arange(k, dtype=dtype)
    _IDENTITY.buffer = buffer  # as it was lent: the identity in every row
    return out
