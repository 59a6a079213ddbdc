"""A Gaussian kernel density estimate refit to its own samples, on scikit-learn's 2-D toy sets (Kazdan,
Schaeffer et al. 2024, "Collapse or Thrive?").

Real data: n points of `make_moons`, `make_circles` (factor 0.5), `make_blobs` (three fixed centres, the
corners of a triangle of side 4, so every seed and split shares one truth) or `make_swiss_roll` (its x and z
coordinates), each seed's draw seeded by its own stream. Each generation fits a KDE with an isotropic
Gaussian kernel of width h, as scikit-learn's `KernelDensity` does: a number, or `"scott"` N^(−1/6) and
`"silverman"` (N(d + 2)/4)^(−1/(d + 4)), scikit-learn's rules (for unit-scale data; in two dimensions the two
coincide), N the training set's size. Sampling picks a training point uniformly and adds N(0, h²I).

Metrics on held-out real points (n_test per seed, never trained on): `test_nll`, the mean negative log
density of the KDE at them (nats per point); `mean_sq_error`, ‖mean of the KDE − mean of the held-out
points‖²; `trace_ratio`, tr Cov(KDE) / tr Cov(held-out points), Cov(KDE) being the training points'
covariance plus h²I. No closed form is known for any of them under any policy, so the report draws none.

The family is batched: every seed's points are one array per generated set, sampled, subsampled and scored
for every seed at once, in chunks of seeds so memory stays bounded. A training set that extends the last one
scored (accumulate) with the same bandwidth reuses the last log-densities and scores only its new points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelcollapse.families.gaussian import by_part
from modelcollapse.seeding import choose, derive_seed, normal, subkeys, uniform
from modelcollapse.store import atomic_save_npy, atomic_save_npz

PRIMARY_METRIC = "test_nll"
CLAIM = ("Kazdan, Schaeffer et al. 2024 (a follow-up to the paper): a kernel density estimate refit to its own "
         "samples widens and drifts under replace, so its negative log-likelihood on real held-out points grows "
         "every generation, while under accumulate it levels off. No closed form is known; no theory is drawn.")
METRICS = {
    "test_nll": ("mean negative log density of the KDE at held-out real points", "nats/point", "lower"),
    "mean_sq_error": ("‖mean of the KDE − mean of the held-out points‖²", "(units of x)²", "lower"),
    "trace_ratio": ("tr Cov(KDE) / tr Cov(held-out points): the fitted spread relative to the data's", "", "1 (the data's spread)"),
}
MIN_ITERATIONS = 10  # each generation adds one bandwidth's worth of spread: a few are within the noise
CHUNK = 1 << 22  # pairwise distances (or drawn numbers) held at once
BLOB_CENTRES = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2 * math.sqrt(3)]])
NOISE = {"moons": 0.1, "circles": 0.05, "blobs": 0.5, "swiss_roll": 0.5}  # each generator's noise, unless given


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["moons", "circles", "blobs", "swiss_roll"] = Field("moons", description="scikit-learn's 2-D toy set")
    n: int = Field(100, ge=2, le=1_000_000, description="points per generation (the real data and each synthetic set)")
    n_test: int = Field(500, ge=1, le=1_000_000, description="held-out real points per seed for the metrics")
    bandwidth: float | Literal["scott", "silverman"] = Field("scott", description="kernel width h, or the rule that sets it from the training size")
    noise: float | None = Field(None, ge=0.0, description="the generator's noise (blobs: cluster_std); default per dataset: " + ", ".join(f"{k} {v}" for k, v in NOISE.items()))
    method: Literal["fast", "loop"] = Field("fast", description="every seed of a policy at once, or one seed at a time with a folder per generation")

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _positive(cls, v):
        ok = v in ("scott", "silverman") if isinstance(v, str) else isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
        if not ok:
            raise ValueError("must be a positive number, 'scott' or 'silverman'")
        return v

    def bandwidth_for(self, N: int, d: int = 2) -> float:
        """h for a training set of N points (scikit-learn's KernelDensity rules)."""
        if self.bandwidth == "scott":
            return N ** (-1 / (d + 4))
        if self.bandwidth == "silverman":
            return (N * (d + 2) / 4) ** (-1 / (d + 4))
        return float(self.bandwidth)


def toy(dataset: str, n: int, noise: float, random_state: int) -> np.ndarray:
    """n points (n, 2) of a scikit-learn toy set."""
    from sklearn import datasets

    if dataset == "moons":
        return datasets.make_moons(n_samples=n, noise=noise, random_state=random_state)[0]
    if dataset == "circles":
        return datasets.make_circles(n_samples=n, noise=noise, factor=0.5, random_state=random_state)[0]
    if dataset == "blobs":
        return datasets.make_blobs(n_samples=n, centers=BLOB_CENTRES, cluster_std=noise, random_state=random_state)[0]
    return datasets.make_swiss_roll(n_samples=n, noise=noise, random_state=random_state)[0][:, [0, 2]]


@dataclass
class Points:
    """A dataset of every seed: its parts, arrays (S, size_k, 2), never copied when concatenated."""

    parts: list

    @property
    def n(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The points at `positions` (S, m) of each seed's concatenated parts: (S, m, 2)."""
        if len(self.parts) == 1:
            return np.take_along_axis(self.parts[0], positions[..., None], axis=1)
        S, m = positions.shape
        out = np.empty((S * m, 2))
        seed, part, local = by_part([p.shape[1] for p in self.parts], positions)
        bounds = np.searchsorted(part, np.arange(len(self.parts) + 1))
        for k, p in enumerate(self.parts):
            pick = slice(bounds[k], bounds[k + 1])
            out[seed.order[pick]] = p[seed.values[pick], local[pick]]
        return out.reshape(S, m, 2)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (S, 2) and the trace of the covariance (divide by N) (S,) of every seed's points."""
        N = self.n
        mean = sum(p.sum(axis=1) for p in self.parts) / N
        return mean, sum(((p - mean[:, None, :]) ** 2).sum(axis=(1, 2)) for p in self.parts) / N


@dataclass
class TestSet:
    x: np.ndarray  # (S, n_test, 2)
    mean: np.ndarray  # (S, 2)
    trace: np.ndarray  # (S,)


@dataclass
class Fitted:
    train: Points
    bandwidth_: float


def log_kernel_sums(x: np.ndarray, points: np.ndarray, h: float) -> np.ndarray:
    """log Σ_j exp(−‖x_i − p_j‖²/(2h²)) for each seed's test points x (S, m, 2) over its points (S, k, 2): (S, m),
    in chunks of seeds. −‖x − p‖² = 2x·p − ‖p‖² − ‖x‖², and the last term leaves the sum: one matrix product
    and one exp per pair."""
    S, m, _ = x.shape
    k = points.shape[1]
    out = np.empty((S, m))
    step = max(1, CHUNK // max(m * k, 1))
    for lo in range(0, S, step):
        xs, ps = x[lo : lo + step], points[lo : lo + step]
        a = xs @ ps.swapaxes(1, 2)  # (s, m, k)
        a -= 0.5 * (ps**2).sum(axis=2)[:, None, :]
        top = a.max(axis=2)
        a -= top[..., None]
        a *= 1 / (h * h)
        np.exp(a, out=a)
        out[lo : lo + step] = (top - 0.5 * (xs**2).sum(axis=2)) / (h * h) + np.log(a.sum(axis=2))
    return out


class Family:
    batched = True

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.vectorised = config.method == "fast"
        self.noise = NOISE[config.dataset] if config.noise is None else config.noise
        self._scored: tuple | None = None  # (parts, h, test set, their log kernel sums): accumulate extends it

    def draw(self, seeds: np.ndarray, split: str, draw: int, n: int) -> np.ndarray:
        """Each seed's n points of the toy set (S, n, 2), seeded by its own stream."""
        return np.stack([toy(self.config.dataset, n, self.noise, derive_seed(int(s), "kde", split, draw) % 2**32) for s in seeds])

    def real_data(self, split: str, seed, draw: int = 0) -> Points | TestSet:
        seeds = np.atleast_1d(np.asarray(seed, dtype=np.int64))
        if split == "test":
            x = self.draw(seeds, "test", 0, self.config.n_test)
            mean, trace = Points([x]).moments()
            return TestSet(x, mean, trace)
        return Points([self.draw(seeds, "train", draw, self.config.n)])

    def size(self, data: Points) -> int:
        return data.n

    def concat(self, datasets: list[Points]) -> Points:
        return Points([p for data in datasets for p in data.parts])

    def subsample(self, data: Points, size: int, seed) -> Points:
        return Points([data.at(choose(seed, data.n, size))])

    def fit(self, train: Points, seed, workdir: Path | None) -> Fitted:
        return Fitted(train, self.config.bandwidth_for(train.n))

    def evaluate(self, model: Fitted, test: TestSet, seed, workdir: Path | None) -> dict[str, np.ndarray]:
        parts, h = model.train.parts, model.bandwidth_
        start, sums = 0, None
        if self._scored is not None:  # the same bandwidth and test set, and a training set that extends the last
            done, h_done, test_done, sums_done = self._scored
            if h_done == h and test_done is test and len(done) <= len(parts) and all(a is b for a, b in zip(done, parts)):
                start, sums = len(done), sums_done
        for p in parts[start:]:
            s = log_kernel_sums(test.x, p, h)
            sums = s if sums is None else np.logaddexp(sums, s)
        self._scored = (list(parts), h, test, sums)
        N = model.train.n
        log_density = sums - math.log(N) - math.log(2 * math.pi * h * h)  # (S, n_test)
        mean, trace = model.train.moments()
        return {"test_nll": -log_density.mean(axis=1), "mean_sq_error": np.sum((mean - test.mean) ** 2, axis=1),
                "trace_ratio": (trace + 2 * h * h) / test.trace}

    def sample(self, model: Fitted, size: int, like: Points, seed, workdir: Path | None) -> Points:
        """A training point chosen uniformly plus N(0, h²I), `size` times per seed."""
        keys = np.asarray(seed, dtype=np.uint64)
        N = model.train.n
        picks = np.minimum((uniform(subkeys(keys, "pick")[:, None], np.arange(size, dtype=np.uint64)) * N).astype(np.int64), N - 1)
        x = model.train.at(picks) + model.bandwidth_ * normal(subkeys(keys, "noise"), 2 * size).reshape(len(keys), size, 2)
        if workdir is not None:
            atomic_save_npy(Path(workdir) / "synthetic.npy", x)
        return Points([x])

    def load_sample(self, workdir: Path) -> Points:
        return Points([np.load(Path(workdir) / "synthetic.npy")])

    def save_model(self, model: Fitted, workdir: Path) -> None:
        atomic_save_npz(Path(workdir) / "kde.npz", points=np.concatenate(model.train.parts, axis=1), bandwidth=model.bandwidth_)

    def load_model(self, workdir: Path) -> Fitted:
        with np.load(Path(workdir) / "kde.npz") as f:
            return Fitted(Points([f["points"]]), float(f["bandwidth"]))


def memory_estimate(config: Config, seeds: int, iterations: int, vectorised: bool) -> int:
    """Bytes a run holds at its peak: every generation's points (the pool), the held-out points and their
    log kernel sums, a saved model's copy of the largest training set, and the chunked distances."""
    S, n = (seeds if vectorised else 1), config.n
    pool = S * iterations * n * 2 * 8
    return 2 * pool + S * config.n_test * 8 * 6 + 8 * 4 * CHUNK + (1 << 27)
