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

Selection and weighting (issue 13): scores `likelihood`, the log-density of each synthetic point under the
toy set's distribution (its continuous limit: the generator's curve, its parameter uniform, blurred by its
Gaussian noise — a sum over a fine grid of the curve, or blobs' three Gaussians), and `verifier`, the same
under a shifted copy of it, shifted by `verifier_bias` (each coordinate) + N(0, verifier_noise²/2·I) drawn
once per seed. A dataset knows which of its points are real, so `real_weight` w weights the kernels: the
real points carry a share w of the density and the synthetic ones 1 − w (each kernel w/n_real or
(1 − w)/n_syn, where a seed's set has both), sampling picks a point with its kernel's weight, and the
metrics use the weighted mean and covariance. The bandwidth rule still counts N points, as scikit-learn's
KernelDensity does with sample weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelcollapse.families.gaussian import by_part
from modelcollapse.errors import BadInput
from modelcollapse.seeding import choose, derive_seed, normal, stream_keys, subkeys, uniform
from modelcollapse.store import atomic_save_npz

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
SCORES = {
    "likelihood": "the point's log-density under the toy set's distribution",
    "verifier": "its log-density under that distribution shifted by verifier_bias + N(0, verifier_noise²/2·I), drawn once per seed",
}
GRID_SPACING = 0.5  # the truth's curve is summed over points about this fraction of its noise apart: the
# log-density is exact to ~1e-15 away from an open curve's ends (moons, swiss roll) and within ~2e-3 near them
CHUNK = 1 << 22  # pairwise distances (or drawn numbers) held at once
BLOB_CENTRES = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2 * math.sqrt(3)]])
NOISE = {"moons": 0.1, "circles": 0.05, "blobs": 0.5, "swiss_roll": 0.5}  # each generator's noise, unless given


def check_score(config: "Config", name: str) -> None:
    """Both scores are log-densities: a toy set drawn without noise lies on a curve and has none."""
    if config.noise_level == 0:
        raise BadInput(f"config error: kde.noise = 0: the {config.dataset} distribution has no density, so the {name!r} score is undefined; give noise > 0")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["moons", "circles", "blobs", "swiss_roll"] = Field("moons", description="scikit-learn's 2-D toy set")
    n: int = Field(100, ge=2, le=1_000_000, description="points per generation (the real data and each synthetic set)")
    n_test: int = Field(500, ge=1, le=1_000_000, description="held-out real points per seed for the metrics")
    bandwidth: float | Literal["scott", "silverman"] = Field("scott", description="kernel width h, or the rule that sets it from the training size")
    noise: float | None = Field(None, ge=0.0, description="the generator's noise (blobs: cluster_std); default per dataset: " + ", ".join(f"{k} {v}" for k, v in NOISE.items()))
    method: Literal["fast", "loop"] = Field("fast", description="every seed of a policy at once, or one seed at a time with a folder per generation")
    verifier_noise: float = Field(0.0, ge=0.0, description="the `verifier` score's shift: verifier_bias + N(0, s²/2·I), s this")
    verifier_bias: float = Field(0.0, description="added to each coordinate of the verifier's shift")

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _positive(cls, v):
        ok = v in ("scott", "silverman") if isinstance(v, str) else isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
        if not ok:
            raise ValueError("must be a positive number, 'scott' or 'silverman'")
        return v

    @property
    def noise_level(self) -> float:
        return NOISE[self.dataset] if self.noise is None else self.noise

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


def curve(dataset: str, noise: float) -> tuple[np.ndarray, float]:
    """Points (G, 2) evenly spread in the parameter of the toy set's noiseless curve (each with mass 1/G), and
    the Gaussian noise: the distribution is their mixture of N(point, noise²I). Blobs: its three centres."""
    if dataset == "blobs":
        return BLOB_CENTRES, noise
    length = {"moons": 2 * math.pi, "circles": 3 * math.pi, "swiss_roll": 90.0}[dataset]  # about, for the grid
    G = max(256, math.ceil(length / (GRID_SPACING * noise)))
    u = (np.arange(G // 2) + 0.5) / (G // 2)  # midpoints of the parameter
    if dataset == "moons":
        t = math.pi * u
        return np.concatenate([np.stack([np.cos(t), np.sin(t)], 1), np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)]), noise
    if dataset == "circles":
        t = 2 * math.pi * u
        ring = np.stack([np.cos(t), np.sin(t)], 1)
        return np.concatenate([ring, 0.5 * ring]), noise
    t = 1.5 * math.pi * (1 + 2 * (np.arange(G) + 0.5) / G)
    return np.stack([t * np.cos(t), t * np.sin(t)], 1), noise


def truth_log_density(dataset: str, noise: float, x: np.ndarray) -> np.ndarray:
    """log p(x) of the toy set's distribution at points x (S, m, 2): (S, m)."""
    centres, sigma = curve(dataset, noise)
    S = x.shape[0]
    sums = log_kernel_sums(x, np.broadcast_to(centres, (S, *centres.shape)), sigma)
    return sums - math.log(len(centres)) - math.log(2 * math.pi * sigma * sigma)


@dataclass
class Points:
    """A dataset of every seed: its parts, arrays (S, size_k, 2), never copied when concatenated, and which
    of their points are real (per part: True, False or a mask (S, size_k))."""

    parts: list
    real: list | None = None  # None: no point is real
    seeds: np.ndarray | None = None  # (S,) the base seeds (a verifier is drawn once per seed)

    @property
    def n(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def real_mask(self) -> np.ndarray:
        """Whether each point is real: (S, n) bool, in the parts' order."""
        S = self.parts[0].shape[0]
        flags = self.real or [False] * len(self.parts)
        return np.concatenate([np.broadcast_to(np.asarray(r, dtype=bool), (S, p.shape[1])) for p, r in zip(self.parts, flags)], axis=1)

    def weights(self, w: float | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Each point's kernel weight (S, n), summing to 1 per seed: w/n_real and (1 − w)/n_syn where a seed
        has both, else 1/n; and which seeds have both (S,). None without a weight or a seed with both."""
        if w is None or self.real is None:
            return None
        real = self.real_mask()
        n_real = real.sum(1, keepdims=True)
        n_syn = self.n - n_real
        both = (n_real > 0) & (n_syn > 0)
        if not both.any():
            return None
        a = np.where(real, w / np.maximum(n_real, 1), (1 - w) / np.maximum(n_syn, 1))
        return np.where(both, a, 1 / self.n), both[:, 0]

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

    def moments(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean (S, 2) and the trace of the covariance (divide by N) (S,) of every seed's points (with
        `weights` (S, N): weighted)."""
        if weights is not None:
            x = np.concatenate(self.parts, axis=1)
            mean = np.einsum("sn,snd->sd", weights, x)
            return mean, np.einsum("sn,sn->s", weights, ((x - mean[:, None, :]) ** 2).sum(-1))
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
    weight: float | None = None  # real_weight: the real points' share of the density

    @property
    def weights_(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Each training point's kernel weight (S, N) and the seeds they weigh (S,); None when all are alike."""
        return self.train.weights(self.weight)


def log_kernel_sums(x: np.ndarray, points: np.ndarray, h: float, log_weights: np.ndarray | None = None) -> np.ndarray:
    """log Σ_j exp(−‖x_i − p_j‖²/(2h²)) for each seed's test points x (S, m, 2) over its points (S, k, 2): (S, m),
    in chunks of seeds (each term times exp(log_weights) (S, k), given those). −‖x − p‖² = 2x·p − ‖p‖² − ‖x‖²,
    and the last term leaves the sum: one matrix product and one exp per pair."""
    S, m, _ = x.shape
    k = points.shape[1]
    out = np.empty((S, m))
    step = max(1, CHUNK // max(m * k, 1))
    for lo in range(0, S, step):
        xs, ps = x[lo : lo + step], points[lo : lo + step]
        a = xs @ ps.swapaxes(1, 2)  # (s, m, k)
        a -= 0.5 * (ps**2).sum(axis=2)[:, None, :]
        if log_weights is not None:
            a += (h * h) * log_weights[lo : lo + step, None, :]
        top = a.max(axis=2)
        a -= top[..., None]
        a *= 1 / (h * h)
        np.exp(a, out=a)
        out[lo : lo + step] = (top - 0.5 * (xs**2).sum(axis=2)) / (h * h) + np.log(a.sum(axis=2))
    return out


class Family:
    batched = True
    weights_real = True

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.vectorised = config.method == "fast"
        self.noise = config.noise_level
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
        return Points([self.draw(seeds, "train", draw, self.config.n)], [True], seeds)

    def size(self, data: Points) -> int:
        return data.n

    def concat(self, datasets: list[Points]) -> Points:
        real = [r for data in datasets for r in (data.real or [False] * len(data.parts))]
        return Points([p for data in datasets for p in data.parts], real if any(np.any(r) for r in real) else None, datasets[0].seeds)

    def take(self, data: Points, indices: np.ndarray) -> Points:
        """The points at `indices` (S, m) of each seed's set, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        real = None if data.real is None else [np.take_along_axis(data.real_mask(), indices, axis=1)]
        return Points([data.at(indices)], real, data.seeds)

    def subsample(self, data: Points, size: int, seed) -> Points:
        return self.take(data, choose(seed, data.n, size))

    def score(self, data: Points, name: str, model: Fitted, reference: Fitted | None, seed) -> np.ndarray:
        """Each point's log-density (S, n) under the toy set's distribution, or shifted by the seed's verifier (SCORES)."""
        check_score(self.config, name)
        x = np.concatenate(data.parts, axis=1)
        if name == "verifier":
            x = x - self.verifier(data.seeds)[:, None, :]
        return truth_log_density(self.config.dataset, self.noise, x)

    def verifier(self, seeds) -> np.ndarray:
        """Each seed's verifier shift verifier_bias + N(0, verifier_noise²/2·I), drawn once: (S, 2)."""
        seeds = np.atleast_1d(np.asarray(seeds, dtype=np.int64))
        c = self.config
        return c.verifier_bias + c.verifier_noise / math.sqrt(2) * normal(stream_keys(seeds, "kde", "verifier"), 2)

    def fit(self, train: Points, seed, workdir: Path | None, real_weight: float | None = None) -> Fitted:
        return Fitted(train, self.config.bandwidth_for(train.n), real_weight)

    def evaluate(self, model: Fitted, test: TestSet, seed, workdir: Path | None) -> dict[str, np.ndarray]:
        if model.weights_ is not None:  # weighted kernels: one pass over every point, each with its log-weight
            weights, h = model.weights_[0], model.bandwidth_
            with np.errstate(divide="ignore"):
                sums = log_kernel_sums(test.x, np.concatenate(model.train.parts, axis=1), h, np.log(weights))
            log_density = sums - math.log(2 * math.pi * h * h)
            mean, trace = model.train.moments(weights)
            return {"test_nll": -log_density.mean(axis=1), "mean_sq_error": np.sum((mean - test.mean) ** 2, axis=1),
                    "trace_ratio": (trace + 2 * h * h) / test.trace}
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
        u = uniform(subkeys(keys, "pick")[:, None], np.arange(size, dtype=np.uint64))
        picks = np.minimum((u * N).astype(np.int64), N - 1)
        if model.weights_ is not None:  # weighted seeds: the first point whose cumulative weight reaches u
            weights, both = model.weights_
            cdf = np.cumsum(weights, axis=1)
            cdf[:, -1] = 1.0
            rows = np.arange(len(keys))[:, None]
            picks = np.where(both[:, None], np.searchsorted((cdf + 2 * rows).ravel(), u + 2 * rows) - N * rows, picks)
        x = model.train.at(picks) + model.bandwidth_ * normal(subkeys(keys, "noise"), 2 * size).reshape(len(keys), size, 2)
        if workdir is not None:
            atomic_save_npz(Path(workdir) / "synthetic.npz", x=x, seeds=like.seeds)
        return Points([x], None, like.seeds)

    def load_sample(self, workdir: Path) -> Points:
        if not (Path(workdir) / "synthetic.npz").exists():  # written before selection existed: points only
            return Points([np.load(Path(workdir) / "synthetic.npy")])
        with np.load(Path(workdir) / "synthetic.npz") as f:
            return Points([f["x"]], None, f["seeds"])

    def save_model(self, model: Fitted, workdir: Path) -> None:
        extra = {} if model.weight is None else {"real": model.train.real_mask(), "weight": model.weight}
        atomic_save_npz(Path(workdir) / "kde.npz", points=np.concatenate(model.train.parts, axis=1), bandwidth=model.bandwidth_, **extra)

    def load_model(self, workdir: Path) -> Fitted:
        with np.load(Path(workdir) / "kde.npz") as f:
            weighted = "weight" in f.files
            return Fitted(Points([f["points"]], [f["real"]] if weighted else None), float(f["bandwidth"]), float(f["weight"]) if weighted else None)


def memory_estimate(config: Config, seeds: int, iterations: int, vectorised: bool) -> int:
    """Bytes a run holds at its peak: every generation's points (the pool), the held-out points and their
    log kernel sums, a saved model's copy of the largest training set, and the chunked distances."""
    S, n = (seeds if vectorised else 1), config.n
    pool = S * iterations * n * 2 * 8
    return 2 * pool + S * config.n_test * 8 * 6 + 8 * 4 * CHUNK + (1 << 27)
