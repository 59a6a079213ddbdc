"""The experiment config: a TOML file plus `--set key=value` overrides, validated once, here.

Top-level keys are shared by every family; the table named after the family (`[linreg]`, `[lm]`, ...) is
validated by that family's own `Config`. Every error is a `BadInput` with one line naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator

from modelcollapse import policies
from modelcollapse.errors import BadInput
from modelcollapse.paths import regular_file
from modelcollapse.families import FamilyModule, load_family
from modelcollapse.policies import Policy
from modelcollapse.selection import SelectSpec

RESOURCE_KEYS = ("cpus", "gpus")  # scheduling only: outside the config hash
# Bounds no machine could run past: a list of 10**12 seeds would not fit in memory, let alone finish.
MAX_SEEDS, MAX_ITERATIONS, MAX_CPUS, MAX_GPUS = 10**6, 10**5, 10**4, 10**3
MAX_DEPTH = 64  # tables and lists nested deeper than any config needs (Python's own parsers recurse on them)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("experiment", min_length=1, description="a name for the run, shown in reports; runs/<name> by default")
    family: str = Field(description="the model family: a built-in name, an importable module or a .py file")
    policies: list[SerializeAsAny[Policy]] = Field(min_length=1, description="each runs as its own chain")
    iterations: int = Field(ge=1, le=MAX_ITERATIONS, description="model-fitting iterations; 1 = fit on real data only")
    seeds: list[int] = Field(max_length=MAX_SEEDS, description="an int n means seeds 0..n-1; a list names them")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus: int = Field(1, ge=1, le=MAX_CPUS, description="CPUs a sweep reserves for this run on Ray (its threads there)")
    gpus: float = Field(0.0, ge=0.0, le=MAX_GPUS, description="GPUs a sweep reserves for this run on Ray; a fraction shares one")
    select: SelectSpec | None = Field(None, description="the selection stage every synthetic set goes through (selection.py)")
    real_weight: float | None = Field(None, gt=0.0, lt=1.0, description="the share of the training loss on real examples")
    _family_config: Any = PrivateAttr(None)
    _family_module: Any = PrivateAttr(None)

    @property
    def family_config(self):
        """The validated `[<family>]` table: an instance of the family module's `Config`."""
        return self._family_config

    @property
    def family_module(self) -> FamilyModule:
        return self._family_module

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        # the default run directory is runs/<name>: a name must not lead out of it or into a subfolder
        if "/" in v or "\\" in v or v in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must be a plain name: no '/', '\\' or control characters, and not '.' or '..'")
        return v

    @field_validator("policies", mode="before")
    @classmethod
    def _policy_entries(cls, v):
        """Each entry becomes the Policy its name registers (policies.py), validated by that class."""
        return [policies.from_spec(spec) for spec in v] if isinstance(v, list) else v

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
            if not 1 <= v <= MAX_SEEDS:
                raise ValueError(f"must be between 1 and {MAX_SEEDS:,} (split more seeds over several runs)")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, v):
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("must be distinct non-negative ints, at least one")
        return v

    def selection(self, policy: Policy) -> SelectSpec | None:
        """The selection stage of `policy`'s synthetic sets: its own, else the config's; None when none."""
        spec = policy.select or self.select
        return spec if spec is not None and spec.active else None

    def weight(self, policy: Policy) -> float | None:
        """The share of `policy`'s training loss carried by real examples (None: every example alike)."""
        return policy.real_weight if policy.real_weight is not None else self.real_weight

    def resolved(self) -> dict:
        """The whole config as plain data, family table included: what the manifest stores and hashes. Keys
        added since runs were first recorded are left out while unset, so old runs keep their hash."""
        out = self.model_dump(mode="json", exclude={k for k in ("select", "real_weight") if getattr(self, k) is None})
        out["policies"] = [p.model_dump(mode="json", exclude_none=True) for p in self.policies]
        out[self.family_module.table] = self.family_config.model_dump(mode="json")
        return out

    def labels(self) -> list[str]:
        """Each policy's label, as paths, metrics and reports name it."""
        return [p.label for p in self.policies]

    def hash(self) -> str:
        """What the run computes, not where: the resource keys stay out, so old run dirs still resume."""
        what = {k: v for k, v in self.resolved().items() if k not in RESOURCE_KEYS}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


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
    except RecursionError:
        raise BadInput(f"--set {key.strip()}: the value is nested too deep") from None
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
    path = regular_file(path, "config file")
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise BadInput(f"config file {path} nests tables or lists too deeply") from None


def check_values(raw: dict) -> None:
    """Refuse what TOML allows but no experiment means: inf and nan, and nesting deeper than MAX_DEPTH.
    Walked without recursion, so a deep config is refused here rather than by a RecursionError later."""
    todo = [(k, v, 1) for k, v in raw.items()]
    while todo:
        key, value, depth = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"config error: {key}: must be a finite number (got {value})")
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadInput(f"config error: {key}: nested more than {MAX_DEPTH} deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo += [(f"{key}.{k}", v, depth + 1) for k, v in items]


def from_dict(raw: dict) -> ExperimentConfig:
    """Validate a config dict (top-level keys and the family's table). Raises BadInput with one line."""
    check_values(raw)
    raw = dict(raw)
    family = raw.get("family")
    if not isinstance(family, str):
        raise BadInput("config error: family: missing" if family is None else f"config error: family: must be a string (got {family!r})")
    spec = load_family(family)
    if isinstance(raw.get("policies"), list):
        raw["policies"] = [_policy(i, entry) for i, entry in enumerate(raw["policies"])]
    table = raw.pop(spec.table, {})
    if not isinstance(table, dict):
        raise BadInput(f"config error: {spec.table}: must be a table")
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as e:
        raise BadInput(_one_line(e)) from None
    except TypeError as e:
        raise BadInput(f"config error: {e}") from None
    try:
        cfg._family_config = spec.Config(**table)
    except ValidationError as e:
        raise BadInput(_one_line(e, prefix=f"{spec.table}.")) from None
    cfg._family_module = spec
    _check_capabilities(cfg)
    return cfg


def _check_capabilities(cfg: ExperimentConfig) -> None:
    """A selection needs scores the family provides (and `score`/`take`); a real weight a family that weights."""
    spec, family = cfg.family_module, cfg.family_module.Family
    for i, policy in enumerate(cfg.policies):
        where = f"policies.{i}.select" if policy.select is not None else "select"
        chosen = cfg.selection(policy)
        if chosen is not None:
            needs = ("score", "take") + (("example_sizes",) if getattr(family, "grouped", False) else ())
            if not all(callable(getattr(family, m, None)) for m in needs):
                raise BadInput(f"config error: {where}: the {spec.table} family cannot select synthetic data (it has no {'/'.join(needs)})")
            if chosen.score not in spec.scores:
                have = ", ".join(spec.scores) or "none"
                raise BadInput(f"config error: {where}.score: the {spec.table} family provides no score {chosen.score!r}; it has {have}")
            if spec.check_score is not None:
                spec.check_score(cfg.family_config, chosen.score)
        if cfg.weight(policy) is not None and not getattr(family, "weights_real", False):
            where = f"policies.{i}.real_weight" if policy.real_weight is not None else "real_weight"
            raise BadInput(f"config error: {where}: the {spec.table} family cannot weight real against synthetic examples")


def _policy(i: int, entry) -> Policy:
    """One `policies` entry as the Policy its name registers, or BadInput naming the entry and the problem."""
    try:
        return policies.from_spec(entry)
    except ValidationError as e:
        raise BadInput(_one_line(e, prefix=f"policies.{i}.")) from None
    except ValueError as e:
        raise BadInput(f"config error: policies.{i}: {e}") from None


def load(path: Path, overrides: list[str] = ()) -> ExperimentConfig:
    raw = read_toml(path)
    if "grid" in raw:  # what makes a sweep file (sweep.is_sweep)
        raise BadInput(f"{path} is a sweep file (it has a [grid] table), not a run config: run it with "
                       f"`modelcollapse sweep {path} --out DIR`")
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
