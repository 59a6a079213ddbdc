"""Data policies: which data generation n trains on. Each policy is one entry here, and only here.

A policy is a small pydantic model: its `name`, its parameters (validated by its own fields), and three
answers the loop asks of it:
- `training_set(n, pool, ops, seed, fresh_real)`: what generation n trains on, a pure function of the pool;
- `synthetic_size(n, real_size)`: how many examples the newest model samples for generation n;
- `fresh_real`: whether it needs a new real draw each generation (the family must have one to give).
Its `label` names it in paths, metrics and reports (`mix-0.5`); the manifest records every label.

`pool[0]` is the real training set and `pool[k]` (k >= 1) the synthetic set sampled from model k, which
generation k + 1 trains on. Policies only ask the family to measure, concatenate and subsample datasets
(`ops`), so every policy works with every family, a batched family included (its `seed` is then an array of
stream keys, one per seed, and it subsamples every seed's data at once).

A new policy is one class below, decorated with `@register` — or the same in your own module, imported
before the config is read. The config, loop and report find it by its name.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from modelcollapse.selection import SelectSpec

Data = Any


class DataOps(Protocol):
    """What a policy may ask of a family about its datasets."""

    def size(self, data: Data) -> int: ...

    def concat(self, datasets: list[Data]) -> Data: ...

    def subsample(self, data: Data, size: int, seed) -> Data: ...


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    select: SelectSpec | None = Field(None, description="this policy's selection stage (else the config's [select])")
    real_weight: float | None = Field(None, gt=0.0, lt=1.0, description="this policy's share of the loss on real examples")
    fresh_real: ClassVar[bool] = False  # needs a new real training draw each generation

    @property
    def label(self) -> str:
        """The name in metrics.jsonl, run-directory folders and reports: the name, then any parameters, then
        its own selection and real weight (`mix-0.5`, `replace+top-fraction-oracle-x4`, `fresh-0.5+w0.6`)."""
        own = ("name", "select", "real_weight")
        params = [f"{v:g}" if isinstance(v, float) else str(v) for k, v in self if k not in own and v is not None]
        label = "-".join([self.name, *params])
        if self.select is not None:
            label += f"+{self.select.label}"
        if self.real_weight is not None:
            label += f"+w{self.real_weight:g}"
        return label

    def synthetic_size(self, n: int, real_size: int) -> int:
        """How many examples the newest model samples for generation n (n >= 2): by default as many as the
        real training set holds."""
        return real_size

    def training_set(self, n: int, pool: list[Data], ops: DataOps, seed, fresh_real: Callable[[], Data] | None = None) -> Data:
        """The training set of generation n. `seed` drives any subsampling; `fresh_real()` gives new real data."""
        if n == 1:
            return pool[0]  # the first model is fit on real data alone, whatever the policy
        return self.later(n, pool, ops, seed, fresh_real)

    def later(self, n: int, pool: list[Data], ops: DataOps, seed, fresh_real) -> Data:
        raise NotImplementedError


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Make a policy class known to the config by its `name` (a Literal field with a default)."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str) or name in POLICIES and POLICIES[name] is not cls:
        raise ValueError(f"policy {cls.__name__}: needs a name of its own (got {name!r})")
    POLICIES[name] = cls
    return cls


def from_spec(spec) -> Policy:
    """A policy from a config entry: its name, or a table {name = ..., <parameters>}. Raises ValueError (or
    pydantic's ValidationError) naming the problem."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a policy is a name or a table with a name, e.g. \"replace\" or {{name=\"mix\", real_fraction=0.5}} (got {spec!r})")
    cls = POLICIES.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown policy {spec['name']!r}; choose one of {', '.join(POLICIES)}")
    return cls(**spec)


@register
class Replace(Policy):
    """The newest synthetic set only."""

    name: Literal["replace"] = "replace"

    def later(self, n, pool, ops, seed, fresh_real):
        return pool[-1]


@register
class Accumulate(Policy):
    """The real data and every synthetic set so far: n·|real| examples at generation n."""

    name: Literal["accumulate"] = "accumulate"

    def later(self, n, pool, ops, seed, fresh_real):
        return ops.concat(pool)


@register
class ReplaceGrown(Policy):
    """Synthetic only, but as many examples as accumulate trains on, all from the newest model (the paper's
    dataset-size control)."""

    name: Literal["replace-grown"] = "replace-grown"

    def synthetic_size(self, n, real_size):
        return n * real_size

    def later(self, n, pool, ops, seed, fresh_real):
        return pool[-1]


@register
class AccumulateSubsample(Policy):
    """The accumulated pool, subsampled to |real| each generation: fixed compute (Kazdan et al. 2024)."""

    name: Literal["accumulate-subsample"] = "accumulate-subsample"

    def later(self, n, pool, ops, seed, fresh_real):
        return ops.subsample(ops.concat(pool), ops.size(pool[0]), seed)


class _RealFraction(Policy):
    real_fraction: float = Field(gt=0.0, lt=1.0, description="λ, the share of real data per generation (0 is "
                                 "replace, 1 is real data only)")

    def real_part(self, real_size: int) -> int:
        return round(self.real_fraction * real_size)

    def synthetic_size(self, n, real_size):
        return real_size - self.real_part(real_size)  # the rest of |real| is real


@register
class Mix(_RealFraction):
    """λ·|real| examples of the real data and the rest from the newest model."""

    name: Literal["mix"] = "mix"

    def later(self, n, pool, ops, seed, fresh_real):
        real = pool[0]
        return ops.concat([ops.subsample(real, self.real_part(ops.size(real)), seed), pool[-1]])


@register
class Fresh(_RealFraction):
    """Like mix, but the real part is new real data each generation."""

    name: Literal["fresh"] = "fresh"
    fresh_real: ClassVar[bool] = True

    def later(self, n, pool, ops, seed, fresh_real):
        return ops.concat([ops.subsample(fresh_real(), self.real_part(ops.size(pool[0])), seed), pool[-1]])
