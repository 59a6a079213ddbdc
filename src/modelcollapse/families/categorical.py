"""A categorical distribution refit to its own draws, generation after generation: the Wright–Fisher model of
population genetics, and the unigram model of text (Shumailov et al. 2024; Kazdan, Schaeffer et al. 2024).

Truth: K outcomes with probabilities ∝ i^(−s) (Zipf, the default, since word frequencies are; s = 0 is
uniform) or a given vector. Each generation fits p̂ = (c + α)/(N + Kα) to the counts c of its N training draws
(α = `smoothing`, 0 by default: the maximum-likelihood frequencies) and draws n outcomes from the fit.
Metrics of the fit p̂ against the truth p: `entropy` −Σp̂ log p̂ (nats), `gini_simpson` 1 − Σp̂², `lost` the
outcomes with p̂ = 0 (the truth gives every outcome p > 0), `tail_mass` the fitted mass of the outcomes that
make up the truth's last 10% of mass, `tv` ½Σ|p̂ − p| and `kl` KL(p̂ ‖ p) = Σ p̂ log(p̂/p) (nats). KL runs
from the fit to the truth because KL(p ‖ p̂) is infinite from the first lost outcome on (and a non-finite
metric would stop the chain); KL(p̂ ‖ p) is finite, and zero only when p̂ = p.

The family is batched and a dataset is its count vector (draws are exchangeable, and every fit needs only
counts): a sample of n draws is n uniforms per seed mapped through the fit's cumulative counts, a subsample
of m draws without replacement is m distinct positions of the dataset (`seeding.choose`) mapped the same way,
so every dataset is a pure function of its streams.

Selection and weighting (issue 13): a synthetic set's draws exist one by one too (`Counts.outcomes`
recomputes each draw's outcome from the model and stream that drew it), so a selection stage scores them:
`reward`, the reward r of the draw's outcome (`reward = "head"`, the default: r_i = 1 − i/(K − 1), favouring
the first, most probable outcomes; `"tail"`: r_i = i/(K − 1); or K numbers), and `verifier`, a noisy reward
r + N(0, verifier_noise²) per outcome, drawn once per seed. The metric `reward` is the fit's expected reward
Σ p̂_i r_i. A dataset keeps its real counts apart (within an outcome, a subsample's first positions are its
real draws), so `real_weight` w fits the weighted counts p̂ = w·c_real/n_real + (1 − w)·c_syn/n_syn (smoothed
as the plain counts are), and the sampler draws from those probabilities by their cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import xlogy

from modelcollapse import theory as closed_forms
from modelcollapse.seeding import choose, normal, stream_keys, uniform
from modelcollapse.store import atomic_save_npz

PRIMARY_METRIC = "gini_simpson"  # the Wright–Fisher heterozygosity: exact under every policy
CLAIM = ("The Wright–Fisher model (Kazdan, Schaeffer et al. 2024, a follow-up to the paper): a categorical "
         "distribution refit to its own draws loses outcomes for good under replace, its diversity decaying as "
         "(1 − 1/n)^t, and keeps them when the draws accumulate beside the real data. The dashed lines are the "
         "exact expectations (docs/theory.md).")
METRICS = {
    "gini_simpson": ("1 − Σp̂²: the chance that two draws from the fit differ", "", "the truth's value (collapse lowers it)"),
    "entropy": ("−Σ p̂ log p̂, the fit's entropy", "nats", "the truth's value (collapse lowers it)"),
    "lost": ("outcomes the fit gives probability 0 (the truth gives every outcome some)", "outcomes", "lower"),
    "tail_mass": ("the fit's mass on the outcomes that make up the truth's last 10% of mass", "", "0.1 (the truth's)"),
    "tv": ("½Σ|p̂ − p|, the total-variation distance from the truth", "", "lower"),
    "kl": ("KL(p̂ ‖ p) from the fit to the truth", "nats", "lower"),
    "reward": ("Σ p̂_i r_i, the fit's expected reward (`reward`: head, tail or K numbers)", "", "what a curation by the reward raises"),
}
MIN_ITERATIONS = 10  # diversity decays by about 1/n per iteration: tens of iterations for n = 50
SCORES = {
    "reward": "the reward r of the draw's outcome (`reward`: head, tail or K numbers)",
    "verifier": "a noisy reward: r + N(0, verifier_noise²) per outcome, drawn once per seed",
}
CHUNK = 1 << 15  # draws (or positions) handled at once: a chunk of seeds stays in the CPU cache, 2× faster than all at once
TAIL = 0.1  # tail_mass watches the outcomes that make up the truth's last 10% of mass


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(100, ge=2, le=1_000_000, description="number of outcomes K")
    n: int = Field(100, ge=1, le=10_000_000, description="draws per generation (the real data and each synthetic set)")
    zipf: float = Field(1.0, ge=0.0, le=100.0, description="Zipf exponent s of the truth, p_i ∝ i^(−s); 0 is uniform")
    probs: list[float] | None = Field(None, description="the true probabilities instead (K positive numbers summing to 1)")
    smoothing: float = Field(0.0, ge=0.0, description="additive smoothing α of the fit: (c + α)/(N + Kα)")
    reward: Literal["head", "tail"] | list[float] = Field("head", description="the reward r of each outcome: "
                                                          "\"head\" r_i = 1 − i/(K − 1), \"tail\" r_i = i/(K − 1), or K numbers")
    verifier_noise: float = Field(0.0, ge=0.0, description="the `verifier` score: r + N(0, s²) per outcome, drawn once per seed, s this")
    method: Literal["fast", "loop"] = Field("fast", description="every seed of a policy at once, or one seed at a time with a folder per generation")

    @model_validator(mode="after")
    def _check(self):
        if self.probs is not None:
            p = np.asarray(self.probs, dtype=float)
            if "k" in self.model_fields_set and self.k != len(p):
                raise ValueError(f"k = {self.k} but probs has {len(p)} entries; give one of them")
            if len(p) < 2 or not np.all(np.isfinite(p)) or p.min() <= 0 or abs(p.sum() - 1) > 1e-6:
                raise ValueError("probs must be at least 2 positive numbers summing to 1 (an outcome of probability 0 is no outcome)")
            if "zipf" in self.model_fields_set:
                raise ValueError("give zipf or probs, not both")
        if isinstance(self.reward, list) and (len(self.reward) != self.K or not np.all(np.isfinite(self.reward))):
            raise ValueError(f"reward must be \"head\", \"tail\" or K = {self.K} finite numbers (got {len(self.reward)} numbers)")
        return self

    @property
    def rewards(self) -> np.ndarray:
        """The reward r of each outcome (K,)."""
        if isinstance(self.reward, list):
            return np.asarray(self.reward, dtype=float)
        head = 1 - np.arange(self.K) / (self.K - 1)
        return head if self.reward == "head" else 1 - head

    @property
    def truth(self) -> np.ndarray:
        """The true probabilities p (K,)."""
        if self.probs is not None:
            p = np.asarray(self.probs, dtype=float)
        else:
            p = np.arange(1, self.k + 1, dtype=float) ** -self.zipf
        return p / p.sum()

    @property
    def K(self) -> int:
        return len(self.probs) if self.probs is not None else self.k


def tail_of(p: np.ndarray) -> np.ndarray:
    """The outcomes that make up p's last 10% of mass: the fewest least probable outcomes holding at least 10%
    of it (on a tie, later outcomes first). A boolean mask (K,)."""
    order = np.argsort(-p, kind="stable")[::-1]
    before = np.cumsum(p[order]) - p[order]
    tail = np.zeros(len(p), dtype=bool)
    tail[order] = before < TAIL - 1e-12
    return tail


@dataclass
class Counts:
    """A dataset of every seed: how many of its `n` draws fell on each outcome, (S, K); how many of those are
    real draws (None: none); and, for a set a model drew, that model and stream, from which each draw's
    outcome is recomputed (`outcomes`)."""

    counts: np.ndarray
    n: int
    real: np.ndarray | None = None
    seeds: np.ndarray | None = None  # (S,) the base seeds (a verifier is drawn once per seed)
    drawn_by: tuple | None = None  # (Fitted, keys): a sample's model and stream

    def outcomes(self) -> np.ndarray:
        """Each draw's outcome, in draw order: (S, n), kept (a selection scores them, then takes some). Only
        a set a model drew has them."""
        if getattr(self, "_outcomes", None) is None:
            model, keys = self.drawn_by
            out = np.empty((len(keys), self.n), dtype=np.int64)
            step = max(1, CHUNK // max(self.n, 1))
            for lo in range(0, len(keys), step):
                out[lo : lo + step] = model.draw(uniform(keys[lo : lo + step, None], np.arange(self.n, dtype=np.uint64)), slice(lo, lo + step))
            self._outcomes = out
        return self._outcomes


@dataclass
class Fitted:
    counts_: np.ndarray  # (S, K): the training counts
    n_: int  # N, the training draws
    alpha: float
    real_: np.ndarray | None = None  # (S, K): the real draws among them, for a weighted fit
    weight: float | None = None  # real_weight: the real draws' share of the fit

    @property
    def p_(self) -> np.ndarray:
        """The fitted probabilities (S, K): the (weighted) counts, smoothed."""
        K = self.counts_.shape[1]
        return (self.weighted() + self.alpha) / (self.n_ + K * self.alpha)

    @property
    def both_(self) -> np.ndarray:
        """Which seeds' fits are weighted: a weight, and real and synthetic draws to weigh (S,)."""
        if self.weight is None:
            return np.zeros(len(self.counts_), dtype=bool)
        n_real = self.real_.sum(1)
        return (n_real > 0) & (n_real < self.n_)

    def weighted(self) -> np.ndarray:
        """The counts, or with a weight w, N·(w·c_real/n_real + (1 − w)·c_syn/n_syn) where a seed has both."""
        both = self.both_
        if not both.any():
            return self.counts_
        real = self.real_.astype(float)
        n_real = real.sum(1, keepdims=True)
        w = self.weight
        mixed = self.n_ * (w * real / np.maximum(n_real, 1) + (1 - w) * (self.counts_ - real) / np.maximum(self.n_ - n_real, 1))
        return np.where(both[:, None], mixed, self.counts_)

    def draw(self, u: np.ndarray, seeds=slice(None)) -> np.ndarray:
        """The outcomes (s, m) of uniforms u (s, m) in (0, 1] for the seeds `seeds` of this fit, as `sample`
        maps them: through the training draws' positions (unweighted) or the cumulative probabilities. One
        search over every seed at once, each seed's table shifted past the last one's."""
        c = self.counts_[seeds]
        s, K = c.shape
        rows = np.arange(s)[:, None]
        N, alpha = self.n_, self.alpha
        v = u * (N + K * alpha)
        at = np.minimum(v.astype(np.int64), N - 1)  # a training draw's position (v = N itself: the last one)
        out = np.searchsorted((np.cumsum(c, axis=1) + (N + 1) * rows).ravel(), at + (N + 1) * rows, side="right") - K * rows
        if alpha > 0:
            out = np.where(v < N, out, np.minimum(((v - N) / alpha).astype(np.int64), K - 1))
        both = self.both_[seeds]
        if both.any():  # weighted seeds: the first outcome whose cumulative probability reaches u
            cdf = np.cumsum(self.p_[seeds], axis=1)
            cdf[:, -1] = 1.0
            out = np.where(both[:, None], np.searchsorted((cdf + 2 * rows).ravel(), u + 2 * rows) - K * rows, out)
        return out


def compact(counts: np.ndarray, n: int) -> np.ndarray:
    """Counts in the smallest unsigned type that holds n: the loop keeps every generation's set in its pool."""
    return counts.astype(np.min_scalar_type(n))


def _tally(S: int, K: int, category: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.bincount((rows * K + category).ravel(), minlength=S * K).reshape(S, K)


def tally_positions(counts: np.ndarray, positions: np.ndarray, N: int, real: np.ndarray | None = None):
    """How many of each seed's `positions` (S, m) in 0..N−1 fall on each outcome, its N draws laid out outcome
    by outcome (the first c_0 positions are outcome 0's, and so on): counts (S, K). Integers only: the hits
    per position, their running sum, read at each outcome's end. In chunks of seeds. Given `real` (S, K), the
    real draws among `counts` (the first real_k positions of each outcome's), also how many of those fall."""
    S, K = counts.shape
    out = np.empty((S, K), dtype=np.int64)
    real_out = None if real is None else np.empty((S, K), dtype=np.int64)
    step = max(1, CHUNK // (N + 1))
    for lo in range(0, S, step):
        c, pos = counts[lo : lo + step], positions[lo : lo + step]
        s = len(c)
        hits = np.bincount((pos + np.arange(s)[:, None] * N).ravel(), minlength=s * N).reshape(s, N)
        before = np.zeros((s, N + 1), dtype=np.int64)  # before[:, j]: hits at positions < j
        np.cumsum(hits, axis=1, out=before[:, 1:])
        ends = np.cumsum(c, axis=1, dtype=np.int64)
        at_ends = np.take_along_axis(before, ends, axis=1)
        out[lo : lo + step] = np.diff(at_ends, axis=1, prepend=0)
        if real is not None:
            starts = ends - c
            real_out[lo : lo + step] = np.take_along_axis(before, starts + real[lo : lo + step], axis=1) - np.take_along_axis(before, starts, axis=1)
    return out if real is None else (out, real_out)


class Family:
    batched = True
    weights_real = True

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.vectorised = config.method == "fast"
        self.p = config.truth
        self.cdf = np.cumsum(self.p)
        self.cdf[-1] = 1.0  # uniforms reach 1: the last outcome takes whatever rounding left
        self.tail = tail_of(self.p)
        self.rewards = config.rewards
        self._pool: tuple[list, Counts] | None = None  # the last concatenation, extended when the pool grows

    def real_data(self, split: str, seed, draw: int = 0) -> Counts | np.ndarray:
        """n draws from the truth per seed; "test" is the truth itself, which every metric compares with."""
        if split == "test":
            return self.p
        seeds = np.atleast_1d(np.asarray(seed, dtype=np.int64))
        S, K, n = len(seeds), self.config.K, self.config.n
        keys = stream_keys(seeds, "categorical", "real", draw)
        counts = np.empty((S, K), dtype=np.int64)
        step = max(1, CHUNK // n)
        for lo in range(0, S, step):
            u = uniform(keys[lo : lo + step, None], np.arange(n, dtype=np.uint64))
            category = np.searchsorted(self.cdf, u)  # the first outcome whose cumulative probability reaches u
            counts[lo : lo + step] = _tally(len(u), K, category, np.arange(len(u))[:, None])
        counts = compact(counts, n)
        return Counts(counts, n, real=counts, seeds=seeds)

    def size(self, data: Counts) -> int:
        return data.n

    def concat(self, datasets: list[Counts]) -> Counts:
        done, total = self._pool or ([], None)
        if not (total is not None and len(done) < len(datasets) and all(a is b for a, b in zip(done, datasets))):
            done, total = [], Counts(0, 0)  # the pool only grows: else add what is new to the last sum
        for d in datasets[len(done) :]:
            real = total.real if d.real is None else d.real.astype(np.int64) + (0 if total.real is None else total.real)
            total = Counts(total.counts + d.counts.astype(np.int64), total.n + d.n, real, d.seeds if d.seeds is not None else total.seeds)
        self._pool = (list(datasets), total)
        return total

    def subsample(self, data: Counts, size: int, seed) -> Counts:
        positions = choose(seed, data.n, size)
        if data.real is None:
            return Counts(compact(tally_positions(data.counts, positions, data.n), size), size, seeds=data.seeds)
        counts, real = tally_positions(data.counts, positions, data.n, data.real.astype(np.int64))
        return Counts(compact(counts, size), size, compact(real, size), data.seeds)

    def take(self, data: Counts, indices: np.ndarray) -> Counts:
        """The draws at `indices` (S, m) of a set a model drew (what a selection keeps)."""
        picked = np.take_along_axis(data.outcomes(), np.asarray(indices, dtype=np.int64), axis=1)
        S, m = picked.shape
        return Counts(compact(_tally(S, data.counts.shape[1], picked, np.arange(S)[:, None]), m), m, seeds=data.seeds)

    def score(self, data: Counts, name: str, model: Fitted, reference: Fitted | None, seed) -> np.ndarray:
        """The reward of each draw's outcome (S, n), or the seed's noisy verifier reward (SCORES)."""
        outcomes = data.outcomes()
        if name == "reward":
            return self.rewards[outcomes]
        return np.take_along_axis(self.verifier(data.seeds), outcomes, axis=1)

    def verifier(self, seeds) -> np.ndarray:
        """Each seed's verifier reward r + N(0, verifier_noise²) per outcome, drawn once: (S, K)."""
        seeds = np.atleast_1d(np.asarray(seeds, dtype=np.int64))
        K = self.config.K
        return self.rewards + self.config.verifier_noise * normal(stream_keys(seeds, "categorical", "verifier"), K)

    def fit(self, train: Counts, seed, workdir: Path | None, real_weight: float | None = None) -> Fitted:
        """The (smoothed) frequencies; with `real_weight` w, of the weighted counts (see Fitted.weighted)."""
        if real_weight is None:
            return Fitted(train.counts.astype(np.int64), train.n, self.config.smoothing)
        real = np.zeros_like(train.counts, dtype=np.int64) if train.real is None else train.real.astype(np.int64)
        return Fitted(train.counts.astype(np.int64), train.n, self.config.smoothing, real, real_weight)

    def evaluate(self, model: Fitted, p: np.ndarray, seed, workdir: Path | None) -> dict[str, np.ndarray]:
        p_hat = model.p_
        plogp = xlogy(p_hat, p_hat).sum(axis=1)  # 0 log 0 = 0
        return {
            "gini_simpson": 1 - np.einsum("sk,sk->s", p_hat, p_hat),
            "entropy": -plogp,
            "lost": np.count_nonzero(p_hat == 0, axis=1).astype(float),
            "tail_mass": p_hat @ self.tail.astype(float),
            "tv": 0.5 * np.abs(p_hat - p).sum(axis=1),
            "kl": plogp - p_hat @ np.log(p),
            "reward": p_hat @ self.rewards,
        }

    def sample(self, model: Fitted, size: int, like: Counts, seed, workdir: Path | None) -> Counts:
        """`size` draws from p̂ = (c + α)/(N + Kα) per seed: v uniform on (0, N + Kα] is a training draw's
        position when v < N (that draw's outcome, mass c_k/(N + Kα) each) and outcome ⌊(v − N)/α⌋ after."""
        keys = np.asarray(seed, dtype=np.uint64)
        S, K = model.counts_.shape
        N, alpha = model.n_, model.alpha
        counts = np.zeros((S, K), dtype=np.int64)
        step = max(1, CHUNK // max(size, 1))
        for lo in range(0, S, step):
            if model.both_[lo : lo + step].any():  # weighted probabilities: by their cumulative sums
                u = uniform(keys[lo : lo + step, None], np.arange(size, dtype=np.uint64))
                counts[lo : lo + step] = _tally(len(u), K, model.draw(u, slice(lo, lo + step)), np.arange(len(u))[:, None])
                continue
            c = model.counts_[lo : lo + step]
            v = uniform(keys[lo : lo + step, None], np.arange(size, dtype=np.uint64)) * (N + K * alpha)
            if alpha == 0:  # v = N itself (a uniform of 1) is the last position
                counts[lo : lo + step] = tally_positions(c, np.minimum(v.astype(np.int64), N - 1), N)
                continue
            drawn = v < N
            counts[lo : lo + step] = tally_positions(c, np.where(drawn, v.astype(np.int64), N), N + 1)  # N: a slot past every outcome
            rows = np.broadcast_to(np.arange(len(c))[:, None], v.shape)
            counts[lo : lo + step] += _tally(len(c), K, np.minimum(((v[~drawn] - N) / alpha).astype(np.int64), K - 1), rows[~drawn])
        data = Counts(compact(counts, size), size, seeds=like.seeds, drawn_by=(model, keys))
        if workdir is not None:  # with the model and stream that drew it, so each draw can be recomputed
            atomic_save_npz(Path(workdir) / "synthetic.npz", counts=data.counts, n=size, keys=keys, seeds=like.seeds,
                            **{f"model_{k}": v for k, v in model_arrays(model).items()})
        return data

    def load_sample(self, workdir: Path) -> Counts:
        with np.load(Path(workdir) / "synthetic.npz") as f:
            if "keys" not in f.files:  # written before selection existed: the counts only
                return Counts(f["counts"], int(f["n"]))
            model = from_arrays({k.removeprefix("model_"): f[k] for k in f.files if k.startswith("model_")})
            return Counts(f["counts"], int(f["n"]), seeds=f["seeds"], drawn_by=(model, f["keys"]))

    def save_model(self, model: Fitted, workdir: Path) -> None:
        atomic_save_npz(Path(workdir) / "categorical.npz", **model_arrays(model))

    def load_model(self, workdir: Path) -> Fitted:
        with np.load(Path(workdir) / "categorical.npz") as f:
            return from_arrays(dict(f))


def model_arrays(model: Fitted) -> dict:
    """A fit as arrays for an .npz file (`from_arrays` reads them back)."""
    out = dict(counts=compact(model.counts_, model.n_), n=model.n_, alpha=model.alpha)
    if model.weight is not None:
        out |= dict(real=compact(model.real_, model.n_), weight=model.weight)
    return out


def from_arrays(f: dict) -> Fitted:
    weighted = "weight" in f
    return Fitted(f["counts"].astype(np.int64), int(f["n"]), float(f["alpha"]),
                  f["real"].astype(np.int64) if weighted else None, float(f["weight"]) if weighted else None)


def memory_estimate(config: Config, seeds: int, iterations: int, vectorised: bool) -> int:
    """Bytes a run holds at its peak: every generation's counts in the pool (the smallest integer type that
    holds n), the pool's sum, a fit's arrays and the chunked draws."""
    S, K = (seeds if vectorised else 1), config.K
    held = np.dtype(np.min_scalar_type(config.n)).itemsize
    return S * K * (held * iterations + 8 * 8) + 8 * 6 * CHUNK + (1 << 27)


_THEORY: dict = {}
THEORY_CACHE = 64  # (config, policy, iterations) results kept


def theory(config: Config, policy, iterations: int) -> dict[str, np.ndarray] | None:
    """Exact expectations: gini_simpson in closed form under every built-in policy when α = 0 (second moments
    of one-hot vectors); every metric by propagating one outcome's count where that costs at most
    theory.CHAIN_BUDGET; with a k-choice selection on the reward (or a noiseless verifier) under replace or
    fresh, every metric by propagating the whole count vector, where that costs at most
    theory.CURATION_BUDGET (see docs/theory.md). None with any other selection or a real weight. Cached:
    the report asks once per metric."""
    key = (config.model_dump_json(), policy.model_dump_json(), iterations)
    if key not in _THEORY:
        p = config.truth
        if policy.select is not None or policy.real_weight is not None:
            chain = curated(config, policy, iterations)
        else:
            chain = closed_forms.categorical_chain(policy, p, tail_of(p), config.n, config.smoothing, iterations, reward=config.rewards) or {}
            if config.smoothing == 0:
                moments = closed_forms.second_moments(policy, config.n, iterations, ddof=0)
                if moments is not None:
                    chain["gini_simpson"] = (1 - np.sum(p**2)) * moments[0]
        if len(_THEORY) >= THEORY_CACHE:
            _THEORY.pop(next(iter(_THEORY)))
        _THEORY[key] = chain or None
    return _THEORY[key]


def curated(config: Config, policy, iterations: int) -> dict[str, np.ndarray] | None:
    """The count-vector chain of a k-choice selection on the reward, where there is one."""
    spec = policy.select
    exact_score = spec is not None and (spec.score == "reward" or config.verifier_noise == 0)
    if policy.real_weight is not None or spec.name != "k-choice" or not exact_score:
        return None
    p = config.truth
    return closed_forms.curation_chain(policy, p, tail_of(p), config.rewards, config.n, config.smoothing,
                                       spec.candidates_per_example, spec.temperature or 1.0, iterations)
