"""The experiment config: a TOML file plus `--set key=value` overrides, validated once, here.

Top-level keys are shared by every family; the table named after the family (`[linreg]`, `[lm]`, ...) is
validated by that family's own `Config`. Every error is a `BadInput` with one line naming the key.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from modelcollapse.errors import BadInput

RESOURCE_KEYS = ("cpus", "gpus")  # scheduling only: outside the config hash
POLICY_NAMES = ("replace", "accumulate", "replace-grown", "accumulate-subsample", "mix", "fresh")


class PolicySpec(BaseModel):
    """One data policy. `mix` and `fresh` need `real_fraction` (λ): the share of real data per generation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["replace", "accumulate", "replace-grown", "accumulate-subsample", "mix", "fresh"]
    real_fraction: float | None = Field(None, gt=0.0, lt=1.0)  # 0 is replace, 1 is real data only

    @model_validator(mode="after")
    def _fraction_only_where_used(self):
        if self.name in ("mix", "fresh") and self.real_fraction is None:
            raise ValueError(f"policy '{self.name}' needs real_fraction, e.g. {{name=\"{self.name}\", real_fraction=0.5}}")
        if self.name not in ("mix", "fresh") and self.real_fraction is not None:
            raise ValueError(f"policy '{self.name}' takes no real_fraction")
        return self

    @property
    def label(self) -> str:
        """The name used in metrics.jsonl and as the run directory's folder, e.g. `mix-0.5`."""
        return self.name if self.real_fraction is None else f"{self.name}-{self.real_fraction:g}"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("experiment", min_length=1, description="a name for the run, shown in reports")
    family: str = Field(description="the model family: a module in modelcollapse.families")
    policies: list[PolicySpec] = Field(min_length=1, description="each runs as its own chain")
    iterations: int = Field(ge=1, description="model-fitting iterations; 1 = fit on real data only")
    seeds: list[int] = Field(description="an int n means seeds 0..n-1; a list names them")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus: int = Field(1, ge=1, description="CPUs a sweep reserves for this run on Ray (its threads there)")
    gpus: float = Field(0.0, ge=0.0, description="GPUs a sweep reserves for this run on Ray; a fraction shares one")
    _family_config: Any = PrivateAttr(None)

    @property
    def family_config(self):
        """The validated `[<family>]` table: an instance of the family module's `Config`."""
        return self._family_config

    @field_validator("policies", mode="before")
    @classmethod
    def _policy_strings(cls, v):
        if isinstance(v, list):
            return [{"name": p} if isinstance(p, str) else p for p in v]
        return v

    @field_validator("policies")
    @classmethod
    def _distinct_policies(cls, v):
        labels = [p.label for p in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"policies are listed twice: {labels}")
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v):
        if isinstance(v, bool):
            raise ValueError("must be a positive int or a list of ints")
        if isinstance(v, int):
            if v < 1:
                raise ValueError("must be at least 1")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, v):
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("must be distinct non-negative ints, at least one")
        return v

    def resolved(self) -> dict:
        """The whole config as plain data, family table included: what the manifest stores and hashes."""
        out = self.model_dump(mode="json")
        out["policies"] = [p.model_dump(mode="json", exclude_none=True) for p in self.policies]
        out[self.family] = self.family_config.model_dump(mode="json")
        return out

    def hash(self) -> str:
        """What the run computes, not where: the resource keys stay out, so old run dirs still resume."""
        what = {k: v for k, v in self.resolved().items() if k not in RESOURCE_KEYS}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def family_module(name: str):
    """The module of family `name`, or BadInput if there is none."""
    if not name.replace("_", "").isalnum():
        raise BadInput(f"config error: family: unknown family {name!r}")
    try:
        return importlib.import_module(f"modelcollapse.families.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("modelcollapse.families"):
            raise BadInput(f"config error: family: unknown family {name!r}") from None
        raise


def _one_line(err: ValidationError, prefix: str = "") -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after", "function-before"))
    key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"config error: {key}: unknown key"
    if e["type"] == "missing":
        return f"config error: {key}: missing"
    return f"config error: {key}: {msg} (got {e['input']!r})"


def parse_override(item: str) -> tuple[str, Any]:
    """`lm.n_layer=4` -> ("lm.n_layer", 4). Values are TOML values; a bare word is a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {item!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def set_key(raw: dict, key: str, value: Any) -> dict:
    """Set a dotted key (`lm.n_layer`) in a raw config dict, making tables on the way."""
    node = raw
    *tables, leaf = key.split(".")
    for part in tables:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BadInput(f"config error: {key}: {part} is not a table")
    node[leaf] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item)
        set_key(raw, key, value)
    return raw


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise BadInput(f"config path is a directory, not a file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"config file {path} is not valid TOML: {e}") from None


def from_dict(raw: dict) -> ExperimentConfig:
    """Validate a config dict (top-level keys and the family's table). Raises BadInput with one line."""
    raw = dict(raw)
    family = raw.get("family")
    if not isinstance(family, str):
        raise BadInput("config error: family: missing" if family is None else f"config error: family: must be a string (got {family!r})")
    module = family_module(family)
    table = raw.pop(family, {})
    if not isinstance(table, dict):
        raise BadInput(f"config error: {family}: must be a table")
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as e:
        raise BadInput(_one_line(e)) from None
    except TypeError as e:
        raise BadInput(f"config error: {e}") from None
    try:
        cfg._family_config = module.Config(**table)
    except ValidationError as e:
        raise BadInput(_one_line(e, prefix=f"{family}.")) from None
    return cfg


def load(path: Path, overrides: list[str] = ()) -> ExperimentConfig:
    raw = read_toml(path)
    raw.setdefault("name", Path(path).stem)
    return from_dict(apply_overrides(raw, list(overrides)))


def resolve_device(device: str) -> str:
    """"auto" is CUDA when present, else the CPU; asking for CUDA where there is none is bad input."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("config error: device: 'cuda' was asked for but no CUDA device is available")
    return device
