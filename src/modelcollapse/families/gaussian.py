"""A multivariate Gaussian refit to its own samples, generation after generation (Shumailov et al. 2024;
Kazdan, Schaeffer et al. 2024, "Collapse or Thrive?").

Truth N(μ₀, Σ₀) in d dimensions (μ₀ = 0 and Σ₀ = σ²I unless given). Each generation fits the mean and the
covariance SS/N (`estimator = "mle"`, as the field does) or SS/(N − 1) (`"unbiased"`), SS the scatter about
the mean, and samples n points from the fit. Metrics compare the fit with the truth in closed form:
`mean_sq_error` ‖μ − μ₀‖², `trace_ratio` tr Σ / tr Σ₀, `det_ratio` det Σ / det Σ₀, `kl` KL(N₀ ‖ N) and `w2`
the Wasserstein-2 distance between the two Gaussians (the distance, not its square).

The family is batched (every call takes every seed) and keeps statistics, not points. A generated set of s
points from N(m, LLᵀ) is a `Block`: with s ≥ d + 1 its mean is drawn as m + Lz/√s and its scatter as
W = (LA)(LA)ᵀ, A the Bartlett factor of a Wishart_d(s − 1, I) (d chi-square and d(d−1)/2 normal draws), so a
block costs O(d²) draws whatever s. Its single points exist too, for a subsample: given the mean x̄ and
W = L_W L_Wᵀ, n i.i.d. Gaussian points are x̄ + U L_Wᵀ row by row, U uniform on the d-frames orthogonal to
the all-ones vector and independent of (x̄, W) (their density depends on the points through x̄ and W only).
U = G_c R⁻¹ with G_c a centred Gaussian matrix from a stream of its own and RᵀR = G_cᵀG_c, so point i is
x̄ + L_W R⁻ᵀ(g_i − ḡ): recomputable alone once ḡ and R are known (one pass over that block's draws, kept).
A set of s ≤ d points is drawn point by point instead.

Selection and weighting (issue 13): scores `likelihood`, log N(x; μ₀, Σ₀) of each synthetic point under the
truth, and `verifier`, its log-density under a shifted copy of the truth, N(μ₀ + b + s/√d·z, Σ₀) with
z ~ N(0, I) drawn once per seed (`verifier_bias` b, added to each coordinate, and `verifier_noise` s). A
dataset knows which of its points are real (a subsample too), so `real_weight` w fits weighted moments: the
real points carry a share w and the synthetic ones 1 − w, whatever their counts: μ = w x̄_r + (1 − w) x̄_s and
Σ = [w SS_r/n_r + (1 − w) SS_s/n_s + w(1 − w)(x̄_r − x̄_s)(x̄_r − x̄_s)ᵀ] / c, the weighted scatter about μ,
c = 1 (mle) or 1 − w²/n_r − (1 − w)²/n_s (unbiased: the reliability-weights correction, which is N/(N − 1)
when w = n_r/N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import gammainccinv

from modelcollapse import theory as closed_forms
from modelcollapse.seeding import choose, normal, normal_at, stream_keys, subkeys, uniform
from modelcollapse.store import atomic_save_npz

PRIMARY_METRIC = "trace_ratio"  # the spread collapsing is the Gaussian's collapse; exact under every policy
CLAIM = ("Kazdan, Schaeffer et al. 2024 (a follow-up to the paper): a Gaussian refit to its own samples loses "
         "its spread under replace (the fitted covariance shrinks towards 0, geometrically in expectation) and "
         "keeps it when the samples accumulate beside the real data. The dashed lines are the exact expectations "
         "(docs/theory.md).")
METRICS = {
    "trace_ratio": ("tr Σ̂ / tr Σ₀: the fitted spread relative to the truth's", "", "1 (the truth's spread)"),
    "mean_sq_error": ("‖μ̂ − μ₀‖²: how far the fitted mean has drifted from the truth's", "(units of x)²", "lower"),
    "det_ratio": ("det Σ̂ / det Σ₀: the fitted volume relative to the truth's", "", "1 (the truth's volume)"),
    "kl": ("KL(N₀ ‖ N̂) from the truth to the fit", "nats", "lower"),
    "w2": ("the Wasserstein-2 distance between the truth and the fit", "units of x", "lower"),
}
MIN_ITERATIONS = 10  # replace loses about 1/n of the spread per iteration: n = 50 needs tens of iterations to show
SCORES = {
    "likelihood": "log N(x; μ₀, Σ₀): the point's log-density under the truth",
    "verifier": "log N(x; μ_v, Σ₀), μ_v = μ₀ + verifier_bias + N(0, verifier_noise²/d·I) drawn once per seed",
}
CHUNK = 1 << 21  # draws (or gathered matrix entries) held at once: bounds memory for thousands of seeds


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d: int = Field(10, ge=1, le=1000, description="dimension")
    n: int = Field(100, ge=2, le=10_000_000, description="points per generation (the real data and each synthetic set)")
    sigma2: float = Field(1.0, gt=0.0, description="Σ₀ = σ²I, unless `cov` is given")
    mean: list[float] | None = Field(None, description="μ₀ (d numbers); default 0")
    cov: list[list[float]] | None = Field(None, description="Σ₀ (d×d, symmetric positive definite); default σ²I")
    estimator: Literal["mle", "unbiased"] = Field("mle", description="covariance SS/N (the field's) or SS/(N − 1)")
    method: Literal["fast", "loop"] = Field("fast", description="every seed of a policy at once, or one seed at a time with a folder per generation")
    verifier_noise: float = Field(0.0, ge=0.0, description="the `verifier` score's mean: μ₀ + verifier_bias + N(0, s²/d·I), s this")
    verifier_bias: float = Field(0.0, description="added to each coordinate of the verifier's mean")

    @model_validator(mode="after")
    def _check(self):
        if self.n < self.d + 1:
            raise ValueError(f"n must be at least d + 1 = {self.d + 1}, or the fitted covariance is singular (n={self.n}, d={self.d})")
        if self.mean is not None and len(self.mean) != self.d:
            raise ValueError(f"mean must have d = {self.d} entries (got {len(self.mean)})")
        if self.cov is not None:
            if "sigma2" in self.model_fields_set:
                raise ValueError("give sigma2 or cov, not both")
            cov = np.asarray(self.cov, dtype=float)
            if cov.shape != (self.d, self.d) or not np.allclose(cov, cov.T) or not np.all(np.isfinite(cov)):
                raise ValueError(f"cov must be a symmetric d×d matrix of numbers, d = {self.d} (got shape {cov.shape})")
            if np.linalg.eigvalsh(cov).min() <= 0:
                raise ValueError("cov must be positive definite")
        return self

    @property
    def ddof(self) -> int:
        return 0 if self.estimator == "mle" else 1


@dataclass
class Truth:
    """N(μ₀, Σ₀): what every metric compares a fit with (the family's "test" data; it holds no draws)."""

    mean: np.ndarray  # (d,)
    chol: np.ndarray  # (d, d), L₀L₀ᵀ = Σ₀
    trace: float
    logdet: float


def bartlett(keys: np.ndarray, dof: int, d: int) -> np.ndarray:
    """A (S, d, d) with AAᵀ ~ Wishart_d(dof, I), dof ≥ d: chi-square roots on the diagonal, normals below it
    (Bartlett 1933). The chi-squares are inverse-CDF draws of one uniform each."""
    S = len(keys)
    chi2 = 2 * gammainccinv((dof - np.arange(d)) / 2, uniform(subkeys(keys, "chi2")[:, None], np.arange(d)))
    A = np.zeros((S, d, d))
    A[:, np.arange(d), np.arange(d)] = np.sqrt(chi2)
    rows, cols = np.tril_indices(d, -1)
    if len(rows):
        A[:, rows, cols] = normal(subkeys(keys, "below"), len(rows))
    return A


class Block:
    """`size` points per seed from N(mean, chol·cholᵀ), drawn from the streams `keys`, kept as their count,
    mean x̄ and the scatter's factor L_W (see the module docstring); `points` recomputes any of them. A set of
    s ≤ d points keeps its fit's (mean, chol) instead, to draw its points one by one."""

    def __init__(self, mean: np.ndarray, chol: np.ndarray, keys: np.ndarray, size: int, real: bool = False):
        self.keys, self.size, self.real = np.asarray(keys, dtype=np.uint64), int(size), real
        S, d = mean.shape
        self.d = d
        self.wishart = self.size >= d + 1
        self._shape = None
        if self.wishart:
            self.mean = self.chol = None  # the points need only x̄, L_W and the shape stream
            z = normal(subkeys(self.keys, "mean"), d)
            self.xbar = mean + np.einsum("sde,se->sd", chol, z) / math.sqrt(self.size)
            self.lw = chol @ bartlett(self.keys, self.size - 1, d)  # the scatter's Cholesky factor
        else:
            self.mean, self.chol, self.lw = mean, chol, None
            x = self.points(np.repeat(np.arange(S), self.size), np.tile(np.arange(self.size), S)).reshape(S, self.size, d)
            self.xbar, self._scatter = _moments(x)

    @property
    def count(self) -> int:
        return self.size

    @property
    def scatter(self) -> np.ndarray:
        return self.lw @ self.lw.swapaxes(1, 2) if self.wishart else self._scatter

    def shape(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys of G, ḡ (S, d), M = L_W R⁻ᵀ (S, d, d)): point i is x̄ + M(g_i − ḡ). One pass over G, kept."""
        if self._shape is None:
            S, d = self.xbar.shape
            keys = subkeys(self.keys, "shape")
            gbar, gram = np.empty((S, d)), np.empty((S, d, d))
            step = max(1, CHUNK // (self.size * d))
            for lo in range(0, S, step):
                G = normal(keys[lo : lo + step], self.size * d).reshape(-1, self.size, d)
                gbar[lo : lo + step] = G.mean(axis=1)
                Gc = G - gbar[lo : lo + step, None, :]
                gram[lo : lo + step] = Gc.swapaxes(1, 2) @ Gc
            R_T = np.linalg.cholesky(gram)  # Rᵀ, lower
            M = np.linalg.solve(R_T.swapaxes(1, 2), self.lw.swapaxes(1, 2)).swapaxes(1, 2)  # L_W R⁻ᵀ: solve R Mᵀ = L_Wᵀ
            self._shape = (keys, gbar, M)
        return self._shape

    def points(self, s: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Point i[l] of seed s[l], for each l: (L, d)."""
        d = self.d
        j = np.arange(d, dtype=np.uint64)
        index = i.astype(np.uint64)[:, None] * np.uint64(d) + j
        if self.wishart:
            keys, gbar, M = self.shape()
            return self.xbar[s] + _apply(M, s, normal_at(keys[s][:, None], index) - gbar[s])
        return self.mean[s] + _apply(self.chol, s, normal_at(self.keys[s][:, None], index))


@dataclass
class Rows:
    """Explicit points (S, m, d): what a subsample or a selection keeps, and which of them are real (S, m)."""

    x: np.ndarray
    real: np.ndarray | bool = False

    def __post_init__(self):
        self.xbar, self.scatter = _moments(self.x)

    @property
    def count(self) -> int:
        return self.x.shape[1]

    def points(self, s: np.ndarray, i: np.ndarray) -> np.ndarray:
        return self.x[s, i]


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (S, d) and scatter (S, d, d) of points (S, m, d); zeros for m = 0."""
    S, m, d = x.shape
    xbar = x.mean(axis=1) if m else np.zeros((S, d))
    xc = x - xbar[:, None, :]
    return xbar, xc.swapaxes(1, 2) @ xc


def _masked_moments(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count (S,), mean (S, d) and scatter (S, d, d) of each seed's points (S, m, d) where mask (S, m)."""
    count = mask.sum(1)
    xbar = (x * mask[..., None]).sum(1) / np.maximum(count, 1)[:, None]
    xc = (x - xbar[:, None, :]) * mask[..., None]
    return count, xbar, xc.swapaxes(1, 2) @ xc


def _combine(acc, count, xbar, scatter):
    """Chan et al.'s pooled (count, mean, scatter) of two groups, per seed (counts may differ by seed or be 0)."""
    N, mean, total_scatter = acc
    total = N + count
    f = np.where(total > 0, count / np.maximum(total, 1), 0.0)  # the new group's share
    delta = xbar - mean
    total_scatter = total_scatter + scatter + (N * f)[:, None, None] * np.einsum("sd,se->sde", delta, delta)
    return total, mean + f[:, None] * delta, total_scatter


def _apply(M: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """M[s[l]] @ v[l] for each l, gathering M in chunks: (L, d)."""
    d = M.shape[1]
    out = np.empty_like(v)
    step = max(1, CHUNK // (d * d))
    for lo in range(0, len(s), step):
        out[lo : lo + step] = np.einsum("lde,le->ld", M[s[lo : lo + step]], v[lo : lo + step])
    return out


@dataclass
class Sorted:
    values: np.ndarray  # the seed of each position, sorted by part
    order: np.ndarray  # where each came from in the flattened positions


def by_part(sizes: list[int], positions: np.ndarray) -> tuple[Sorted, np.ndarray, np.ndarray]:
    """The positions (S, m) of concatenated parts of `sizes`, grouped by part (a stable sort, so each part's
    positions keep their order): (their seeds and where they came from, their parts, their place in their part)."""
    S, m = positions.shape
    ends = np.cumsum(sizes)
    part = np.searchsorted(ends, positions, side="right").ravel()
    order = np.argsort(part, kind="stable")
    part = part[order]
    local = positions.ravel()[order] - (ends - np.asarray(sizes))[part]
    return Sorted(order // m, order), part, local


@dataclass
class Sample:
    """A dataset of every seed: its parts (Blocks and Rows), never copied when concatenated."""

    parts: list
    seeds: np.ndarray | None = None  # (S,) the base seeds (a verifier is drawn once per seed)

    @property
    def n(self) -> int:
        return sum(p.count for p in self.parts)

    def real_at(self, positions: np.ndarray) -> np.ndarray:
        """Whether the points at `positions` (S, m) are real: (S, m) bool."""
        real = np.zeros(positions.shape, dtype=bool)
        start = 0
        for p in self.parts:
            inside = (positions >= start) & (positions < start + p.count)
            if isinstance(p, Rows) and np.ndim(p.real):
                real |= inside & np.take_along_axis(p.real, np.clip(positions - start, 0, p.count - 1), axis=1)
            elif p.real:
                real |= inside
            start += p.count
        return real

    def side_moments(self) -> dict:
        """{"real"/"syn": (count (S,), mean (S, d), scatter (S, d, d))} of its real and its synthetic points."""
        S, d = self.parts[0].xbar.shape
        out = {side: (np.zeros(S), np.zeros((S, d)), np.zeros((S, d, d))) for side in ("real", "syn")}
        for p in self.parts:
            if isinstance(p, Rows) and np.ndim(p.real):
                for side, mask in (("real", p.real), ("syn", ~p.real)):
                    out[side] = _combine(out[side], *_masked_moments(p.x, mask))
            elif p.count:
                side = "real" if p.real else "syn"
                out[side] = _combine(out[side], np.full(S, float(p.count)), p.xbar, p.scatter)
        return out

    def points_at(self, positions: np.ndarray) -> np.ndarray:
        """The points at `positions` (S, m) of each seed's concatenated parts: (S, m, d)."""
        S, m = positions.shape
        out = np.empty((S * m, self.parts[0].xbar.shape[1]))
        seed, part, local = by_part([p.count for p in self.parts], positions)
        bounds = np.searchsorted(part, np.arange(len(self.parts) + 1))
        for k, p in enumerate(self.parts):
            pick = slice(bounds[k], bounds[k + 1])
            if bounds[k + 1] > bounds[k]:
                out[seed.order[pick]] = p.points(seed.values[pick], local[pick])
        return out.reshape(S, m, -1)

    def moments(self, start=None) -> tuple[int, np.ndarray, np.ndarray]:
        """(N, mean (S, d), scatter (S, d, d)) of the whole set, combined part by part (Chan et al. 1979);
        `start` is (k, N, mean, scatter) of its first k parts, when those are known."""
        k, N, mean, scatter = start or (0, 0, 0.0, 0.0)
        for p in self.parts[k:]:
            if p.count == 0:
                continue
            total = N + p.count
            delta = p.xbar - mean
            scatter = scatter + p.scatter + (N * p.count / total) * np.einsum("sd,se->sde", delta, delta)
            mean = mean + (p.count / total) * delta
            N = total
        return N, mean, scatter


@dataclass
class Fitted:
    mean_: np.ndarray  # (S, d)
    chol_: np.ndarray  # (S, d, d): the fitted covariance is chol_ chol_ᵀ


def cholesky(A: np.ndarray) -> np.ndarray:
    """Batched Cholesky; a seed whose matrix is not numerically positive definite gets NaN (its chain stops)."""
    try:
        return np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        out = np.full_like(A, np.nan)
        for s in range(len(A)):
            try:
                out[s] = np.linalg.cholesky(A[s])
            except np.linalg.LinAlgError:
                pass
        return out


class Family:
    batched = True
    weights_real = True

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.vectorised = config.method == "fast"
        d = config.d
        cov = np.asarray(config.cov, dtype=float) if config.cov is not None else config.sigma2 * np.eye(d)
        chol = np.linalg.cholesky(cov)
        self.truth = Truth(np.asarray(config.mean or np.zeros(d), dtype=float), chol, float(np.trace(cov)),
                           float(2 * np.log(np.diag(chol)).sum()))
        self._fitted: tuple | None = None  # (parts, moments) of the last training set

    def real_data(self, split: str, seed, draw: int = 0) -> Sample | Truth:
        if split == "test":
            return self.truth
        seeds = np.atleast_1d(np.asarray(seed, dtype=np.int64))
        S, d = len(seeds), self.config.d
        mean, chol = np.broadcast_to(self.truth.mean, (S, d)), np.broadcast_to(self.truth.chol, (S, d, d))
        return Sample([Block(mean, chol, stream_keys(seeds, "gaussian", "real", draw), self.config.n, real=True)], seeds)

    def size(self, data: Sample) -> int:
        return data.n

    def concat(self, datasets: list[Sample]) -> Sample:
        return Sample([p for data in datasets for p in data.parts], datasets[0].seeds)

    def take(self, data: Sample, indices: np.ndarray) -> Sample:
        """The points at `indices` (S, m) of each seed's set, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Sample([Rows(data.points_at(indices), data.real_at(indices))], data.seeds)

    def subsample(self, data: Sample, size: int, seed) -> Sample:
        return self.take(data, choose(seed, data.n, size))

    def score(self, data: Sample, name: str, model: Fitted, reference: Fitted | None, seed) -> np.ndarray:
        """Each point's log-density (S, n) under the truth or the seed's verifier (SCORES)."""
        x = data.points_at(np.broadcast_to(np.arange(data.n), (len(data.seeds), data.n)))
        mean = self.truth.mean if name == "likelihood" else self.verifier(data.seeds)[:, None, :]
        z = np.linalg.solve(self.truth.chol, (x - mean).reshape(-1, self.config.d).T).T.reshape(x.shape)
        return -0.5 * (z**2).sum(-1) - 0.5 * self.truth.logdet - 0.5 * self.config.d * math.log(2 * math.pi)

    def verifier(self, seeds) -> np.ndarray:
        """Each seed's verifier mean μ₀ + verifier_bias + N(0, verifier_noise²/d·I), drawn once: (S, d)."""
        seeds = np.atleast_1d(np.asarray(seeds, dtype=np.int64))
        c = self.config
        return self.truth.mean + c.verifier_bias + c.verifier_noise / math.sqrt(c.d) * normal(stream_keys(seeds, "gaussian", "verifier"), c.d)

    def fit(self, train: Sample, seed, workdir: Path | None, real_weight: float | None = None) -> Fitted:
        """Mean and covariance; with `real_weight`, weighted moments (the module's docstring) for the seeds
        whose set has real and synthetic points."""
        if real_weight is not None:
            weighted = self.weighted_fit(train, real_weight)
            if weighted is not None:
                return weighted
        start = None
        if self._fitted is not None:  # a training set that extends the last one (accumulate): add its new parts
            parts, moments = self._fitted
            if len(parts) <= len(train.parts) and all(a is b for a, b in zip(parts, train.parts)):
                start = (len(parts), *moments)
        N, mean, scatter = train.moments(start)
        self._fitted = (list(train.parts), (N, mean, scatter))
        denominator = N - self.config.ddof
        only = train.parts[0] if len(train.parts) == 1 else None
        if isinstance(only, Block) and only.wishart:  # one generated set: its scatter's factor is at hand, exactly
            return Fitted(mean, only.lw / math.sqrt(denominator))
        return Fitted(mean, cholesky(scatter / denominator))

    def weighted_fit(self, train: Sample, w: float) -> Fitted | None:
        """The weighted moments' fit, the plain one for seeds whose set lacks either side; None if all do."""
        sides = train.side_moments()
        (n_r, m_r, ss_r), (n_s, m_s, ss_s) = sides["real"], sides["syn"]
        both = (n_r > 0) & (n_s > 0)
        if not both.any():
            return None
        N, mean, scatter = train.moments()
        cov = scatter / (N - self.config.ddof)
        r, s = np.maximum(n_r, 1)[:, None, None], np.maximum(n_s, 1)[:, None, None]
        delta = m_r - m_s
        weighted = w * ss_r / r + (1 - w) * ss_s / s + w * (1 - w) * np.einsum("sd,se->sde", delta, delta)
        if self.config.ddof:
            weighted = weighted / (1 - w**2 / r - (1 - w) ** 2 / s)
        mean = np.where(both[:, None], w * m_r + (1 - w) * m_s, mean)
        return Fitted(mean, cholesky(np.where(both[:, None, None], weighted, cov)))

    def evaluate(self, model: Fitted, truth: Truth, seed, workdir: Path | None) -> dict[str, np.ndarray]:
        d, L, L0 = self.config.d, model.chol_, truth.chol
        delta = model.mean_ - truth.mean
        mse = np.sum(delta**2, axis=1)
        trace = np.sum(L**2, axis=(1, 2))
        logdet = 2 * np.sum(np.log(np.abs(np.diagonal(L, axis1=1, axis2=2))), axis=1)
        Linv_L0 = np.linalg.solve(L, np.broadcast_to(L0, L.shape))  # tr Σ⁻¹Σ₀ = ‖L⁻¹L₀‖²_F
        Linv_delta = np.linalg.solve(L, delta[..., None])[..., 0]
        kl = 0.5 * (np.sum(Linv_L0**2, axis=(1, 2)) + np.sum(Linv_delta**2, axis=1) - d + logdet - truth.logdet)
        # W2² = ‖δ‖² + tr Σ + tr Σ₀ − 2 tr (Σ₀^½ Σ Σ₀^½)^½; L₀ᵀΣL₀ has the eigenvalues of Σ₀^½ Σ Σ₀^½
        ok = np.isfinite(L).all(axis=(1, 2))  # a failed fit (NaN) stops its chain; it has no eigenvalues
        nuclear = np.full(len(L), np.nan)
        B = L[ok].swapaxes(1, 2) @ L0
        nuclear[ok] = np.sqrt(np.maximum(np.linalg.eigvalsh(B.swapaxes(1, 2) @ B), 0.0)).sum(axis=1)
        w2 = np.sqrt(np.maximum(mse + trace + truth.trace - 2 * nuclear, 0.0))
        return {"trace_ratio": trace / truth.trace, "mean_sq_error": mse, "det_ratio": np.exp(logdet - truth.logdet),
                "kl": kl, "w2": w2}

    def sample(self, model: Fitted, size: int, like: Sample, seed, workdir: Path | None) -> Sample:
        keys = np.asarray(seed, dtype=np.uint64)
        if workdir is not None:
            atomic_save_npz(Path(workdir) / "synthetic.npz", mean=model.mean_, chol=model.chol_, keys=keys, size=size, seeds=like.seeds)
        return Sample([Block(model.mean_, model.chol_, keys, size)], like.seeds)

    def load_sample(self, workdir: Path) -> Sample:
        with np.load(Path(workdir) / "synthetic.npz") as f:
            return Sample([Block(f["mean"], f["chol"], f["keys"], int(f["size"]))], f["seeds"] if "seeds" in f.files else None)

    def save_model(self, model: Fitted, workdir: Path) -> None:
        atomic_save_npz(Path(workdir) / "gaussian.npz", mean=model.mean_, chol=model.chol_)

    def load_model(self, workdir: Path) -> Fitted:
        with np.load(Path(workdir) / "gaussian.npz") as f:
            return Fitted(f["mean"], f["chol"])


def memory_estimate(config: Config, seeds: int, iterations: int, vectorised: bool) -> int:
    """Bytes a run holds at its peak: per seed, x̄ and L_W of every set in the pool (and, once subsampled, its
    d×d shape), a subsample's points, a few d×d matrices of the fit, and the chunked draws."""
    S, d, n = (seeds if vectorised else 1), config.d, config.n
    return 8 * (S * iterations * (2 * d * d + 2 * d) + 6 * S * n * d + 8 * S * d * d) + 16 * CHUNK + (1 << 27)


def theory(config: Config, policy, iterations: int) -> dict[str, np.ndarray] | None:
    """Exact expectations: trace_ratio and mean_sq_error under every built-in policy (second moments), with a
    real weight under mix and fresh; det_ratio and kl under replace and replace-grown (the Wishart chain);
    nothing for w2, nor with a selection."""
    moments = closed_forms.second_moments(policy, config.n, iterations, config.ddof)
    if moments is None:
        return None
    tr0 = float(np.trace(np.asarray(config.cov))) if config.cov is not None else config.sigma2 * config.d
    out = {"trace_ratio": moments[0], "mean_sq_error": tr0 * moments[1]}
    out.update(closed_forms.wishart_chain(policy, config.d, config.n, iterations, config.ddof) or {})
    return out
