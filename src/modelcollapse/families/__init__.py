"""Model families: a model class together with its data, and the contract every family keeps.

A family is one module (or package). `load_family(name)` finds it — a built-in name (`linreg`, `lm`, ...), an
importable module (`my_package.my_module`) or a path to a `.py` file — and reads what it declares, once:

- `Config` (required): a pydantic model for the config's table named after the module's last name
  (`[linreg]`, `[my_module]`). Every option of the family and its default lives here and is validated here.
- `Family` (required): built as `Family(config, device=..., cache_dir=...)`, with the methods of
  `FamilyProtocol` below.
- optional, module level: `PRIMARY_METRIC` (the metric the report leads with), `theory(config, policy,
  iterations)` (exact expectations per iteration, `{metric: array}`, or None where there is none),
  `export(gen_dir, out_dir)` (a generation's model in its field's format), `check_data_parallel(config,
  world)` (the family trains data-parallel; raises BadInput when it cannot be split over `world` processes),
  `memory_estimate(config, seeds, iterations, vectorised)` (bytes a run will hold at its peak, so one that
  cannot fit in memory is refused before it starts), `SCORES` ({name: what it measures}, the scores
  `Family.score` gives a selection stage), `check_score(config, name)` (raises BadInput when the score
`name` is undefined under `config`, so a config asking for it is refused before anything runs),
`report_figures(run_dir, out_dir)` (the family's own figures of a
  run, drawn from its run directory into out_dir: a list of (title, PNG file name)).
- optional, module level, for the report's words: `CLAIM` (one or two sentences: what a run of the family
  tests, e.g. "replace grows, accumulate stays bounded"), `METRICS` ({name: (definition, unit, better)}, a
  name may end in `*` to cover a family of names such as `class_freq_*`; `better` is "lower", "higher", or
  where the best value lies, e.g. "1 (the truth's spread)", or "" where no direction is better),
  `REFERENCE` (the paper's numbers where the family has an analogue) and `MIN_ITERATIONS` (the fewest
  model-fitting iterations at which the claim can show; a run with fewer is reported as a smoke test).
  A family that declares none gets `DEFAULT_CLAIM`, no definitions and MIN_ITERATIONS = 2.

Optional on `Family`, for the selection stage and weighting (selection.py): `score(data, name, model,
reference, seed)` (a score per example, higher is better; `model` drew the data, `reference` is generation
1's model), `take(data, indices)` (the examples at those indices, in order), `keeps_inputs = True` (synthetic
examples relabel the real inputs, so the k candidates of example j are k outputs for input j — `sample` is
then asked for candidates of `size` inputs: `like`'s in order, cycled when `size` exceeds them, or the ones
an optional `inputs(like, size, seed)` names, the indices of `like` its own `sample` would regenerate),
`weights_real = True` (its `fit` takes `real_weight`, the share of the loss carried by real examples). A
grouped family that selects also gives `example_sizes(data)`, the units each example holds (lm: each story's
tokens), so a selection keeps whole examples up to the synthetic size in units.

The loop, report and command line ask the `FamilyModule` that `load_family` returns; none of them looks
inside a family for other names.

Datasets are opaque to the loop and the policies: they only ask the family for `size`, `concat` and
`subsample`. Seeds come in with every call (scikit-learn's `random_state` habit), each derived by the loop
from (seed, policy, generation, purpose), so that a generation's result does not depend on the order in which
chains run or on whether the run was resumed.

A batched family (`Family.batched = True`) runs many seeds in one call: `real_data` takes an array of base
seeds, every other call an array of stream keys (`seeding.stream_keys`), one per seed; its datasets and
models hold every seed; `evaluate` returns an array per metric. With `vectorised` true the loop gives it every
seed of a policy at once, as one unit of the run directory; otherwise one seed at a time (arrays of one),
with a folder per generation like any other family. `modelcollapse.testing.check_family` checks all of this.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ClassVar, Protocol

from pydantic import BaseModel

from modelcollapse.errors import BadInput

Data = Any
Model = Any
BUILTIN = ("linreg", "gaussian", "categorical", "kde", "lm", "vae", "conformer")


class DataUnavailable(BadInput):
    """The family cannot provide what was asked (e.g. fresh real data beyond what it ships)."""


class FamilyProtocol(Protocol):
    batched: ClassVar[bool]  # optional, default False: every call takes all seeds at once (see above)
    vectorised: bool  # optional, default False: a batched family that wants every seed of a policy in one call
    grouped: ClassVar[bool]  # optional, default False: `size` counts units that come in groups (lm: tokens in
    # documents), and `subsample` keeps whole groups: `size` units plus less than one group

    def real_data(self, split: str, seed, draw: int = 0) -> Data:
        """Real data: split "train" or "test". `draw` > 0 asks for the draw-th further, independent real
        training set (the `fresh` policy); raise DataUnavailable if the family has no more."""

    def size(self, data: Data) -> int:
        """How many examples `data` holds, in the unit the policies count (rows, documents, images)."""

    def concat(self, datasets: list[Data]) -> Data: ...

    def subsample(self, data: Data, size: int, seed) -> Data:
        """`size` examples drawn without replacement."""

    def fit(self, train: Data, seed, workdir: Path | None) -> Model:
        """A freshly initialised model fit on `train`. May checkpoint into `workdir` and resume from there.
        A fit that declares a `previous` parameter is given the previous generation's folder (None in
        generation 1 and in a vectorised run), whose saved model `load_model` reopens: a family can continue
        from its predecessor's weights instead of starting afresh."""

    def evaluate(self, model: Model, test: Data, seed, workdir: Path | None) -> dict[str, Any]:
        """Named metrics on real held-out data; may write artefacts a reader opens (samples.png, samples.txt)."""

    def sample(self, model: Model, size: int, like: Data, seed, workdir: Path | None) -> Data:
        """`size` synthetic examples from `model`, written under `workdir` (None: keep them in memory, for a
        vectorised run). `like` is the real training set, for families whose synthetic data keeps the real
        inputs (linreg keeps X, conformer keeps graphs)."""

    def load_sample(self, workdir: Path) -> Data:
        """Reopen what `sample` wrote in `workdir` (used when a run resumes)."""

    def save_model(self, model: Model, workdir: Path) -> None: ...

    def load_model(self, workdir: Path) -> Model: ...


DEFAULT_CLAIM = ("The paper's claim for a model-fitting loop: when each generation's synthetic data replaces the "
                 "training data, the test metric worsens every iteration; when it accumulates beside the real data, "
                 "the metric stays bounded.")
DEFAULT_MIN_ITERATIONS = 2  # one iteration is a fit on real data alone: no loop to see


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is, for a reader of the report: a short definition, its unit and which way is better."""

    definition: str
    unit: str  # "nats/token", "Å", "" for a pure number
    better: str  # "lower", "higher", where the best value lies ("1 (the truth's spread)"), or "" for no direction

    @property
    def direction(self) -> str:
        if self.better in ("lower", "higher"):
            return f"{self.better} is better"
        return f"best: {self.better}" if self.better else "no better direction"


# Metrics the loop adds to any family's (a selection stage's, selection.py).
COMMON_METRICS = {
    "select_kept_frac": MetricInfo("share of the newest model's candidates the selection kept", "", ""),
    "select_score_kept": MetricInfo("mean selection score of the kept candidates", "the score's unit", ""),
    "select_score_rejected": MetricInfo("mean selection score of the rejected candidates", "the score's unit", ""),
}


METHODS = ("real_data", "size", "concat", "subsample", "fit", "evaluate", "sample", "load_sample", "save_model", "load_model")


@dataclass(frozen=True)
class FamilyModule:
    """A family as the toolkit sees it: its names, how it is configured and built, what it optionally offers."""

    name: str  # as the config's `family` gives it
    table: str  # the config table holding its options: the module's last name
    module: ModuleType
    Config: type[BaseModel]
    Family: type
    primary_metric: str | None = None
    theory: Callable[[BaseModel, Any, int], dict | None] | None = None
    export: Callable[[Path, Path], Path] | None = None
    check_data_parallel: Callable[[BaseModel, int], None] | None = None
    memory_estimate: Callable[[BaseModel, int, int, bool], int] | None = None
    report_figures: Callable[[Path, Path], list[tuple[str, str]]] | None = None
    check_score: Callable[[BaseModel, str], None] | None = None
    scores: dict = None  # name -> what it measures: the scores `Family.score` gives a selection stage
    claim: str = DEFAULT_CLAIM
    metrics: dict = None  # name (or a pattern ending in *) -> MetricInfo
    reference: str | None = None
    min_iterations: int = DEFAULT_MIN_ITERATIONS

    def __post_init__(self):
        for name in ("scores", "metrics"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, {})

    def metric_info(self, metric: str) -> MetricInfo | None:
        """The family's words for `metric` (an exact name first, then a `prefix*` pattern), or None."""
        return metric_info(self.metrics, metric)

    def build(self, config: BaseModel, device: str, cache_dir: Path):
        return self.Family(config, device=device, cache_dir=cache_dir)


def metric_info(metrics: dict, metric: str) -> MetricInfo | None:
    """`metric`'s entry in `metrics` or COMMON_METRICS: its exact name first, then the longest `prefix*`."""
    for table in (metrics, COMMON_METRICS):
        if metric in table:
            return table[metric]
        patterns = [k for k in table if k.endswith("*") and metric.startswith(k[:-1])]
        if patterns:
            return table[max(patterns, key=len)]
    return None


def _words(name: str, module: ModuleType) -> dict:
    """What the family says about itself for the report (CLAIM, METRICS, REFERENCE, MIN_ITERATIONS), checked."""
    out = {}
    claim, reference = getattr(module, "CLAIM", None), getattr(module, "REFERENCE", None)
    for key, value in (("CLAIM", claim), ("REFERENCE", reference)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise BadInput(f"config error: family: {name!r}: {key} must be a non-empty string")
    if claim is not None:
        out["claim"] = claim
    out["reference"] = reference
    metrics = getattr(module, "METRICS", {})
    if not isinstance(metrics, dict):
        raise BadInput(f"config error: family: {name!r}: METRICS must map metric names to (definition, unit, better)")
    for key, value in metrics.items():
        if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise BadInput(f"config error: family: {name!r}: METRICS[{key!r}] must be (definition, unit, better), three strings")
    out["metrics"] = {k: MetricInfo(*v) for k, v in metrics.items()}
    least = getattr(module, "MIN_ITERATIONS", DEFAULT_MIN_ITERATIONS)
    if isinstance(least, bool) or not isinstance(least, int) or least < 1:
        raise BadInput(f"config error: family: {name!r}: MIN_ITERATIONS must be an int >= 1")
    out["min_iterations"] = least
    return out


def table_name(name: str) -> str:
    """The config table (and display name) of the family a `family` value names: the module's last name."""
    return Path(name).stem if name.endswith(".py") else name.split(".")[-1]


def _import(name: str) -> tuple[ModuleType, str]:
    """The module a `family` value names, and its table name."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise BadInput(f"config error: family: no such file {name!r}")
        stem = path.stem
        if not stem.isidentifier():
            raise BadInput(f"config error: family: {name!r}: the file name must be a Python identifier (it names the config table)")
        key = f"modelcollapse_user_family.{stem}.{abs(hash(str(path.resolve())))}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[key]
                raise BadInput(f"config error: family: {name!r} failed to import: {type(e).__name__}: {e}") from None
        return sys.modules[key], stem
    if not all(part.isidentifier() for part in name.split(".")):
        raise BadInput(f"config error: family: unknown family {name!r}; a built-in name ({', '.join(BUILTIN)}), a module or a .py file")
    qualified = f"modelcollapse.families.{name}" if name in BUILTIN else name
    try:
        return importlib.import_module(qualified), name.split(".")[-1]
    except ModuleNotFoundError as e:
        if e.name and qualified.startswith(e.name):
            raise BadInput(f"config error: family: unknown family {name!r}; a built-in name ({', '.join(BUILTIN)}), a module or a .py file") from None
        raise


_LOADED: dict[str, FamilyModule] = {}


def load_family(name: str) -> FamilyModule:
    """The family `name` (built-in, module or .py path) with what it declares. BadInput if it is none."""
    if name in _LOADED:
        return _LOADED[name]
    module, table = _import(name)
    config_cls, family_cls = getattr(module, "Config", None), getattr(module, "Family", None)
    if not (inspect.isclass(config_cls) and issubclass(config_cls, BaseModel)):
        raise BadInput(f"config error: family: {name!r} has no Config (a pydantic BaseModel for its [{table}] table)")
    if not inspect.isclass(family_cls):
        raise BadInput(f"config error: family: {name!r} has no Family class")
    missing = [m for m in METHODS if not callable(getattr(family_cls, m, None))]
    if missing:
        raise BadInput(f"config error: family: {name!r}: Family lacks {', '.join(missing)}")
    optional = {k: getattr(module, k, None) for k in ("theory", "export", "check_data_parallel", "memory_estimate", "report_figures", "check_score")}
    for k, f in optional.items():
        if f is not None and not callable(f):
            raise BadInput(f"config error: family: {name!r}: {k} must be a function")
    scores = getattr(module, "SCORES", {})
    if not isinstance(scores, dict):
        raise BadInput(f"config error: family: {name!r}: SCORES must map score names to what they measure")
    spec = FamilyModule(name, table, module, config_cls, family_cls, getattr(module, "PRIMARY_METRIC", None), **optional,
                        scores=scores, **_words(name, module))
    _LOADED[name] = spec
    return spec
