"""What is done to a synthetic set before it enters the pool: keep the candidates a score prefers.

    [select]
    name = "top-fraction"   # none | top-fraction | threshold | k-choice
    score = "verifier"      # a score the family provides (its module's SCORES)
    oversample = 4          # the model draws 4x the synthetic size; the selector keeps the synthetic size

The newest model draws `oversample` × size candidates (k-choice: k × size). Candidate i is a candidate for
example i mod size: for families whose synthetic data keep the real inputs (`Family.keeps_inputs`: linreg
relabels the real design, conformer re-generates the real molecules), the k candidates of example j are k
labels of the same input: the j-th of `Family.inputs(like, size, seed)` where the family says which real
inputs a synthetic set of that size regenerates (conformer: each real conformer, and a random subset for a
remainder, as its own sample does), else real input j mod |real| (a synthetic set larger than the real one,
e.g. replace-grown's, cycles through the real inputs, as linreg's sample does). Each selector keeps at most
one candidate per input; for the other families the grouping is only a bookkeeping of i.i.d. draws.

- top-fraction: the `size` best-scored candidates (for input-keeping families, each input's best of its k);
- threshold: candidates scoring at least `min_score`, the first ones in draw order (each input's first), up to
  `size`; fewer is a failure that states the numbers, unless `allow_short = true`;
- k-choice: for each example, one of its k candidates, chosen with probability ∝ exp(score / temperature)
  (Ferbach et al. 2024's Bradley–Terry curation), by the Gumbel-max trick on the stream's uniforms.

A grouped family (`Family.grouped`: lm, whose sizes count tokens and whose examples are whole stories) is
asked for `oversample` × size units of candidates, and each selector keeps whole examples until they hold
`size` units (plus less than one example, as `subsample` does), taking them in its order of preference:
top-fraction the best-scored first; threshold the passing ones in draw order; k-choice the winners of
consecutive groups of k candidates, in draw order. Kept examples that cannot reach `size` units are a failure
that states the numbers (threshold: unless `allow_short`; k-choice: when the winners are shorter than the
candidates on average, e.g. a score that favours short stories).

Selection is deterministic per (seed, policy, generation): its draws come from the generation's "select"
stream. The metrics gain `select_kept_frac` (kept / candidates), `select_score_kept` and
`select_score_rejected` (mean scores), recorded on the generation whose model drew the candidates.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelcollapse.errors import RunFailed
from modelcollapse.seeding import uniform


class SelectSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["none", "top-fraction", "threshold", "k-choice"] = "none"
    score: str | None = Field(None, min_length=1, description="a score the family provides")
    oversample: int | None = Field(None, ge=1, le=1000, description="candidates per kept example (top-fraction, threshold; default 4)")
    min_score: float | None = Field(None, description="threshold: the lowest score kept")
    k: int | None = Field(None, ge=2, le=1000, description="k-choice: candidates per kept example")
    temperature: float | None = Field(None, gt=0.0, description="k-choice: the softmax temperature of the scores (default 1)")
    allow_short: bool = Field(False, description="threshold: keep fewer than the synthetic size rather than fail")

    @model_validator(mode="after")
    def _consistent(self):
        if self.name == "none":
            return self  # the other keys are ignored, so a sweep can cross "none" with a selector's settings
        given = {k for k in ("score", "oversample", "min_score", "k", "temperature") if getattr(self, k) is not None}
        allowed = {"none": set(), "top-fraction": {"score", "oversample"}, "threshold": {"score", "oversample", "min_score"},
                   "k-choice": {"score", "k", "temperature"}}[self.name]
        if given - allowed:
            raise ValueError(f"{', '.join(sorted(given - allowed))} does not apply to the '{self.name}' selector")
        if self.name != "none" and self.score is None:
            raise ValueError(f"the '{self.name}' selector needs a score")
        if self.name == "threshold" and self.min_score is None:
            raise ValueError("the 'threshold' selector needs min_score")
        if self.allow_short and self.name != "threshold":
            raise ValueError("allow_short applies only to the 'threshold' selector")
        return self

    @property
    def active(self) -> bool:
        return self.name != "none"

    @property
    def candidates_per_example(self) -> int:
        if self.name == "k-choice":
            return self.k or 4
        return self.oversample or 4 if self.active else 1

    @property
    def label(self) -> str:
        """How policy labels name it, e.g. `top-fraction-verifier-x4`, `k-choice-reward-k4-t1`."""
        if not self.active:
            return "none"
        if self.name == "k-choice":
            return f"k-choice-{self.score}-k{self.candidates_per_example}-t{self.temperature or 1.0:g}"
        extra = f"-min{self.min_score:g}" if self.name == "threshold" else ""
        return f"{self.name}-{self.score}-x{self.candidates_per_example}{extra}"


def gumbel(keys, n: int) -> np.ndarray:
    """The first n standard Gumbel draws of each select stream `keys` (k-choice's Gumbel-max trick)."""
    return -np.log(-np.log(uniform(keys, np.arange(n, dtype=np.uint64))))


def select(scores: np.ndarray, size: int, spec: SelectSpec, keys: np.ndarray, per_input: bool):
    """Which candidates to keep, for every seed: scores (S, n) with n = size × candidates_per_example.
    Returns (kept (S, m) indices in draw order, and metrics (S,) each: kept fraction, mean kept and rejected
    scores). m < size only for a threshold with allow_short (one seed at a time, so no ragged batch)."""
    S, n = scores.shape
    k = n // size
    grouped = scores.reshape(S, k, size)  # grouped[s, c, j]: candidate c of example j (index c·size + j)
    if spec.name == "top-fraction" and not per_input:
        kept = np.sort(np.argpartition(-scores, size - 1, axis=1)[:, :size], axis=1)
    elif spec.name == "top-fraction":
        kept = np.argmax(grouped, axis=1) * size + np.arange(size)
    elif spec.name == "k-choice":
        kept = np.argmax(grouped / (spec.temperature or 1.0) + gumbel(keys[:, None], n).reshape(S, k, size), axis=1) * size + np.arange(size)
    else:  # threshold
        passing = scores >= spec.min_score
        if per_input:
            ok = passing.reshape(S, k, size)
            first = np.argmax(ok, axis=1)  # each input's first passing candidate
            have = ok.any(axis=1)
            counts = have.sum(1)
            chosen = [first[s][have[s]] * size + np.flatnonzero(have[s]) for s in range(S)]
        else:
            counts = np.minimum(passing.sum(1), size)
            chosen = [np.flatnonzero(passing[s])[:size] for s in range(S)]
        if counts.min() < size and not spec.allow_short:
            raise RunFailed(f"select: threshold min_score = {spec.min_score:g} kept {counts.min()} of the {size} synthetic "
                            f"examples needed (of {n} candidates; their scores range from {scores.min():.4g} to "
                            f"{scores.max():.4g}); lower min_score, raise oversample, or set allow_short = true")
        if counts.min() != counts.max():
            raise RunFailed("select: a threshold with allow_short kept different numbers for different seeds; run one "
                            "seed at a time (the family's method = \"loop\")")
        kept = np.sort(np.stack(chosen), axis=1)
    mask = np.zeros((S, n), dtype=bool)
    np.put_along_axis(mask, kept, True, axis=1)
    kept_mean = np.where(mask, scores, 0).sum(1) / np.maximum(mask.sum(1), 1)
    rejected_mean = np.where(~mask, scores, 0).sum(1) / np.maximum((~mask).sum(1), 1)
    return kept, {"select_kept_frac": mask.sum(1) / n, "select_score_kept": kept_mean, "select_score_rejected": rejected_mean}


def select_grouped(scores: np.ndarray, sizes: np.ndarray, size: int, spec: SelectSpec, key) -> tuple[np.ndarray, dict]:
    """Which candidates of a grouped family to keep, for one seed: scores (n,) and sizes (n,) (each
    candidate's units), whole candidates until they hold `size` units. Returns (kept indices in draw order,
    metrics as `select` gives them)."""
    n = len(scores)
    if spec.name == "top-fraction":
        order = np.argsort(-scores, kind="stable")
    elif spec.name == "threshold":
        order = np.flatnonzero(scores >= spec.min_score)
    else:  # k-choice among consecutive groups of k candidates (i.i.d. draws, so any grouping is fair)
        k = spec.candidates_per_example
        groups = scores[: n // k * k].reshape(-1, k)
        noise = gumbel(np.uint64(key), groups.size).reshape(groups.shape)
        order = np.argmax(groups / (spec.temperature or 1.0) + noise, axis=1) + k * np.arange(len(groups))
    reached = np.cumsum(sizes[order])
    have = int(reached[-1]) if len(order) else 0
    if have < size and not (spec.name == "threshold" and spec.allow_short):
        how = (f"min_score = {spec.min_score:g}: {len(order)} of {n} candidates pass" if spec.name == "threshold"
               else f"k = {spec.candidates_per_example}: one winner of each group")
        hint = ("lower min_score, raise oversample, or set allow_short = true" if spec.name == "threshold"
                else "the score favours short candidates; use top-fraction")
        raise RunFailed(f"select: {spec.name} kept {have} of the {size} units needed ({how}; scores range from "
                        f"{scores.min():.4g} to {scores.max():.4g}); {hint}")
    kept = np.sort(order[: int(np.searchsorted(reached, size)) + 1])
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    metrics = {"select_kept_frac": mask.mean(), "select_score_kept": scores[mask].mean(),
               "select_score_rejected": scores[~mask].mean() if (~mask).any() else np.nan}
    return kept, {k: np.array([v]) for k, v in metrics.items()}


def synthesize(family, model, size: int, like, seed, select_seed, workdir, spec: SelectSpec | None, reference, n_seeds: int = 1):
    """The synthetic set the newest model adds to the pool: `size` examples drawn by `model`, or, with a
    selection stage, the ones it keeps of `spec.candidates_per_example` × size candidates. Returns the set and
    the selection's metrics (empty without one). The kept indices are saved as `selected.npy` in `workdir`,
    so a resumed run reopens the same set (`reopen`)."""
    if spec is None:
        return family.sample(model, size, like, seed, workdir), {}
    batched = bool(getattr(family, "batched", False))
    per_input = bool(getattr(family, "keeps_inputs", False))
    if per_input:  # k candidates for each of `size` inputs: the family's choice, else the real ones in order, cycled
        first = family.inputs(like, size, seed) if hasattr(family, "inputs") else np.arange(size) % family.size(like)
        like = family.take(like, np.broadcast_to(first, (n_seeds, size)) if batched else first)
    candidates = family.sample(model, size * spec.candidates_per_example, like, seed, workdir)
    scores = np.asarray(family.score(candidates, spec.score, model, reference, select_seed), dtype=float)
    keys = np.asarray(select_seed, dtype=np.uint64).reshape(-1)
    if getattr(family, "grouped", False):  # whole examples up to `size` units (not batched: one seed)
        indices, metrics = select_grouped(scores, family.example_sizes(candidates), size, spec, keys[0])
    else:
        kept, metrics = select(scores.reshape(len(keys), -1), size, spec, keys, per_input)
        indices = kept if batched else kept[0]
    if workdir is not None:
        from modelcollapse.store import atomic_save_npy

        atomic_save_npy(workdir / SELECTED, indices)
    if not (~np.isclose(metrics["select_kept_frac"], 1.0)).any():
        metrics.pop("select_score_rejected")  # nothing was rejected: no mean to report
    return family.take(candidates, indices), (metrics if batched else {k: float(v[0]) for k, v in metrics.items()})


SELECTED = "selected.npy"


def reopen(family, workdir):
    """The synthetic set a finished generation added to the pool, as `synthesize` left it."""
    data = family.load_sample(workdir)
    chosen = workdir / SELECTED
    return family.take(data, np.load(chosen)) if chosen.exists() else data
