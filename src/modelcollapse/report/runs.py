"""Run directories as data: a run's manifest and metrics.jsonl (as columns, and per metric as policy ->
iteration -> values over seeds), a sweep directory's grid, names unique within a report, the mean with its
95% interval, and what the family declares (its theory among it), loaded when it can be."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from scipy import stats

from modelcollapse.errors import BadInput
from modelcollapse.families import load_family, table_name
from modelcollapse.policies import from_spec
from modelcollapse.selection import SelectSpec
from modelcollapse.store import read_json
from modelcollapse.sweep import read_index


def read_columns(run_dir: Path) -> dict[str, np.ndarray]:
    """metrics.jsonl as columns (policy, seed, iteration, metric, value): a million rows in tens of MB, where
    as many dicts would take gigabytes."""
    import pyarrow as pa
    import pyarrow.json as pajson

    path = Path(run_dir) / "metrics.jsonl"
    names = ("policy", "seed", "iteration", "metric", "value")
    if not path.exists() or path.stat().st_size == 0:
        return {"policy": np.array([], dtype=object), "seed": np.array([], dtype=np.int64), "iteration": np.array([], dtype=np.int64),
                "metric": np.array([], dtype=object), "value": np.array([])}
    try:
        with open(path, "rb") as f:  # opened here: Arrow takes a path as UTF-8, which a path need not be
            table = pajson.read_json(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: {e}") from None
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}


class Run:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.manifest = read_json(path / "manifest.json")
            self.columns = read_columns(path)
        except (ValueError, OSError) as e:
            raise BadInput(f"report: {path} has a corrupt manifest or metrics file ({e})") from None
        cfg = self.manifest.get("config") if isinstance(self.manifest, dict) else None
        if not (isinstance(cfg, dict) and {"name", "family", "policies", "seeds"} <= set(cfg)):
            raise BadInput(f"report: {path / 'manifest.json'} is not a modelcollapse manifest")
        self.n_rows = len(self.columns["value"])
        self._tables: dict = {}
        cfg = self.manifest["config"]
        self.name, self.family, self.config = cfg["name"], cfg["family"], cfg
        self.family_name = table_name(self.family)  # a path or module names the family by its last part
        self.policies = self.manifest.get("policy_labels") or [label_of(p) for p in cfg["policies"]]
        self.seeds = cfg["seeds"]
        self.sweep: SweepDir | None = None  # set when the run is a cell of a sweep directory
        self.label, self.slug = self.name, slug(self.name)  # unique among a report's runs once name_runs ran
        self.axes: dict = {}  # its place on each grid axis, when it is a sweep cell

    def table(self, metric: str) -> dict[str, dict[int, np.ndarray]]:
        """policy -> iteration -> values over seeds (in seed order)."""
        if metric not in self._tables:
            c = self.columns
            mask = c["metric"] == metric
            policy, iteration, seed, value = c["policy"][mask], c["iteration"][mask], c["seed"][mask], c["value"][mask]
            out: dict = {}
            for p in dict.fromkeys(policy):
                m = policy == p
                its, seeds, vals = iteration[m], seed[m], value[m]
                order = np.lexsort((seeds, its))
                its, vals = its[order], vals[order]
                cuts = np.flatnonzero(np.diff(its)) + 1
                out[p] = {int(g[0]): v for g, v in zip(np.split(its, cuts), np.split(vals, cuts))}
            self._tables[metric] = out
        return self._tables[metric]

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.columns["metric"].tolist()))

    def by_seed(self, metric: str, policy: str, iteration: int) -> dict[int, float]:
        """seed -> value of one metric, policy and iteration (for differences paired by seed)."""
        c = self.columns
        m = (c["iteration"] == iteration) & (c["metric"] == metric) & (c["policy"] == policy)
        return dict(zip(c["seed"][m].tolist(), c["value"][m].tolist()))


class SweepDir:
    """A sweep directory: its grid keys and values, and the runs of the cells that have started."""

    def __init__(self, path: Path):
        index = read_index(path / "sweep.json")
        self.path, self.name = path, index["name"]
        self.slug = slug(self.name)
        cells = index["cells"]
        axes = [c.get("axes") or c["overrides"] for c in cells]  # a linked axis is one key here
        self.keys = list(axes[0])
        self.values = {k: list(dict.fromkeys(json.dumps(a[k]) for a in axes)) for k in self.keys}
        self.runs = []
        for c, a in zip(cells, axes):
            if (path / c["name"] / "manifest.json").exists():
                run = Run(path / c["name"])
                run.sweep, run.axes = self, a
                self.runs.append(run)

    def short(self, key: str) -> str:
        """`lm.temperature` -> `temperature`, unless another grid key ends the same way."""
        tail = key.split(".")[-1]
        return tail if sum(k.split(".")[-1] == tail for k in self.keys) == 1 else key

    def title(self, run: Run) -> str:
        return ", ".join(f"{self.short(k)}={v}" for k, v in run.axes.items())

    def slot(self, run: Run) -> int:
        """The run's panel: row-major over (first key, second key) for a two-key grid, else grid order."""
        if len(self.keys) == 2:
            a, b = (self.values[k].index(json.dumps(run.axes[k])) for k in self.keys)
            return a * len(self.values[self.keys[1]]) + b
        return self.runs.index(run)


def find_runs(dirs: list[Path]) -> list[Run]:
    runs = []
    for d in map(Path, dirs):
        if (d / "manifest.json").exists():
            runs.append(Run(d))
        elif (d / "sweep.json").exists():
            try:
                runs += SweepDir(d).runs
            except BadInput:
                raise
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise BadInput(f"report: {d / 'sweep.json'} is corrupt ({type(e).__name__}: {e})") from None
        elif d.is_dir() and (cells := sorted(p.parent for p in d.glob("*/manifest.json"))):
            runs += [Run(c) for c in cells]
        else:
            raise BadInput(f"report: {d} is not a run directory (no manifest.json in it or its subfolders)")
    return runs


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single seed)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def label_of(spec: dict) -> str:
    """A policy's label from its config entry (manifests before labels were recorded)."""
    try:
        return from_spec(spec).label
    except ValueError:
        return spec["name"] if "real_fraction" not in spec else f"{spec['name']}-{spec['real_fraction']:g}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def name_runs(runs: list[Run]) -> dict[str, str]:
    """Give each run a display `label` and a file-name `slug` that no other run of the report shares: its
    config name; a sweep's cells their sweep's name and overrides; runs of one name their folder's name too.
    Sweeps (`sweep.slug`) and family sections (returned, by family) prefix figures `<prefix>-<metric>.png`:
    their prefixes are unique among themselves."""
    runs_taken: set = set()
    figures_taken: set = set()

    def unique(base: str, taken: set) -> str:
        out, k = base, 2
        while out in taken:
            out, k = f"{base}-{k}", k + 1
        taken.add(out)
        return out

    for sweep in dict.fromkeys(r.sweep for r in runs if r.sweep is not None):
        sweep.slug = unique(slug(sweep.name), figures_taken)
    names = [r.name for r in runs if r.sweep is None]
    for r in runs:
        if r.sweep is not None:
            r.label = f"{r.sweep.name} [{r.sweep.title(r)}]"
            r.slug = unique(f"{r.sweep.slug}-{slug(r.path.name)}", runs_taken)
        else:
            r.label = r.name if names.count(r.name) == 1 else f"{r.name} ({r.path.name})"
            r.slug = unique(slug(r.label), runs_taken)
    families = {r.family: r.family_name for r in runs if r.sweep is None}
    return {f: unique(slug(name), figures_taken) for f, name in families.items()}


def family_extras(family: str):
    """A family's declaration (primary metric, theory, words), when it can be loaded (the report needs only run dirs)."""
    try:
        return load_family(family)
    except (BadInput, ImportError):
        return None


def primary_metric(family: str) -> str | None:
    spec = family_extras(family)
    return spec.primary_metric if spec else None


def theory_for(run: Run, policy: str, metric: str, iterations: int):
    """The family's exact expectation of `metric` under `policy`, per iteration, or None where it has none."""
    spec = family_extras(run.family)
    if spec is None or spec.theory is None:
        return None
    specs = {label_of(p): p for p in run.config["policies"]}
    if policy not in specs:
        return None
    curves = spec.theory(spec.Config(**run.config[spec.table]), effective_policy(from_spec(specs[policy]), run.config), iterations)
    return None if curves is None else curves.get(metric)


def effective_policy(policy, config: dict):
    """The policy as it ran: the config's own [select] and real_weight where the policy sets none, and no
    selection where it is "none" (a family's theory must see both to know whether it has a curve)."""
    update = {}
    if policy.select is None and config.get("select") is not None:
        update["select"] = SelectSpec(**config["select"])
    if policy.real_weight is None and config.get("real_weight") is not None:
        update["real_weight"] = config["real_weight"]
    policy = policy.model_copy(update=update)
    return policy if policy.select is None or policy.select.active else policy.model_copy(update={"select": None})
