"""Many runs from one file: a base config crossed with a grid of overrides, each cell an ordinary run DIR.

    [base]                      # or: base = "path/to/config.toml" (relative to this file)
    name = "linreg-fig7"
    ...
    [grid]
    "linreg.T" = [20, 50, 111]  # any config key; cells are the cross product
    size = [{ "lm.model" = "llama2-12m", "lm.lr" = 1e-3 }, { "lm.model" = "llama2-42m", "lm.lr" = 6e-4 }]
                                # an axis of tables: keys set together, the axis named by its label

The sweep directory:

    DIR/<cell>/                     an ordinary run directory, e.g. DIR/T-20/ (`run`, `report`, resume work on it),
                                    named by its grid values (see `cell_name`)
    DIR/configs/<cell>.toml         the cell's config, as `modelcollapse run` reads it
    DIR/logs/<cell>.log             the cell's output, every attempt appended
    DIR/sweep.json                  every cell: overrides, status, error line, log, seconds
    DIR/results.parquet, .csv       one row per (cell, policy, seed, iteration, metric), a column per grid key
    DIR/.sweep.lock                 held while a sweep runs: a second sweep into DIR is refused

Cells run as child processes (sweep_backends.py), here or on Ray. Running the sweep again skips finished
cells and resumes the others by the ordinary resume of `run`; a finished cell whose metrics.jsonl is missing
or damaged is run again too (its run rebuilds the file from its finished generations). Ctrl-C or SIGTERM
stops the running cells (marked `interrupted`), launches no more (they stay `pending`) and writes the
results table of what is finished.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import os
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from modelcollapse import config as configlib
from modelcollapse import paths, tracking
from modelcollapse.errors import BadInput
from modelcollapse.store import RunDir, RunView, atomic_write_bytes, atomic_write_json, now, read_json
from modelcollapse.sweep_backends import Job, RayCluster, run_local

BACKENDS = ("local", "ray")
SAFE = frozenset(string.ascii_letters + string.digits + ".+-")  # what a grid value keeps in a cell's name
MAX_NAME = 200  # bytes; a cell's files add to it (".<cell>.toml.XXXXXXXX.tmp") within most file systems' 255


@dataclass
class Cell:
    name: str  # folder name, e.g. "T-20"
    overrides: dict  # every key the grid set: {"linreg.T": 20}
    config: configlib.ExperimentConfig
    raw: dict  # the config as given (TOML values only): what configs/<cell>.toml holds
    axes: dict  # the cell's place on each grid axis: {"linreg.T": 20} or {"size": "llama2-12m"}
    status: str = "pending"  # pending | done | failed | bad-input | interrupted
    error: str | None = None  # the line that says why it failed
    seconds: float | None = None
    skipped: bool = False  # already done when this sweep began: not launched again

    @property
    def log(self) -> str:
        return f"logs/{self.name}.log"  # relative to the sweep directory

    @property
    def config_file(self) -> str:
        return f"configs/{self.name}.toml"

    def record(self) -> dict:
        return dict(name=self.name, overrides=self.overrides, axes=self.axes, status=self.status, error=self.error,
                    seconds=self.seconds, skipped=self.skipped, log=self.log, config=self.config_file)


def is_sweep(raw: dict) -> bool:
    return "grid" in raw


def _escape(text: str, safe: frozenset) -> str:
    """Percent-encoding (as in URLs) of every character outside `safe`, '%' included: reversible."""
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _prints_like_a_value(s: str) -> bool:
    """Whether some grid value that is not a string prints as `s` (a number, bool, date, list or table), or
    `s` opens with the quote that marks strings which do."""
    return (s[:1] in ('"', "[", "{") or s in ("True", "False") or bool(re.match(r"\d{4}-\d\d-\d\d|\d\d:\d\d", s))
            or _is_float(s))


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def value_name(v) -> str:
    """A grid value as a cell's name shows it: as it prints when that is plain (20, 0.3, gpt2-9m, True), with
    every other character percent-encoded ("a/b c" -> a%2Fb%20c), and a string that prints like another
    type quoted ("1" -> %221%22), so that 1, 1.0, "1" and true name four cells. '_' is encoded too: it
    separates the axes."""
    return _escape(f'"{v}"' if isinstance(v, str) and _prints_like_a_value(v) else str(v), SAFE)


def cell_name(axes: dict) -> str:
    """The folder of a cell: `<key tail>-<value>` per axis, joined by '_' (T-20, model-gpt2-9m_temperature-0.3).
    Every cell of a sweep has the same axes in the same order and no value holds '_', so the name is unique
    and the values can be read back from it. A name over MAX_NAME bytes is cut and ends with '~' and a hash
    of the whole (sweep.json keeps every cell's values)."""
    name = "_".join(f"{_escape(k.split('.')[-1], SAFE | {'_'})}-{value_name(v)}" for k, v in axes.items())
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 17] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return name


def sweep_base(path: Path, raw: dict) -> dict:
    """The base config of a sweep: its [base] table, or the config file (or other sweep's base) it names."""
    base = raw.get("base")
    if isinstance(base, str):
        base = configlib.read_toml(Path(path).parent / base)
        base = base.get("base") if is_sweep(base) else base
    if not isinstance(base, dict):
        raise BadInput(f"sweep {path}: 'base' must be a table or the path of a config or sweep file")
    return base


def load_sweep(path: Path, overrides: list[str] = ()) -> tuple[str, list[Cell]]:
    raw = configlib.read_toml(path)
    if not is_sweep(raw) and "family" in raw:
        raise BadInput(f"{path} is a run config (it has no [grid] table), not a sweep file: run it with "
                       f"`modelcollapse run {path}`")
    unknown = set(raw) - {"base", "grid"}
    if unknown:
        raise BadInput(f"sweep {path}: unknown key(s) {sorted(unknown)}; a sweep has only 'base' and 'grid'")
    base = sweep_base(path, raw)
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise BadInput(f"sweep {path}: 'grid' must map config keys to non-empty lists of values")
    for label, values in grid.items():
        linked = [isinstance(v, dict) for v in values]
        if any(linked) and not (all(linked) and all(v and list(v) == list(values[0]) for v in values)):
            raise BadInput(f"sweep {path}: grid axis {label!r} mixes tables and values, or its tables set different keys")
    base.setdefault("name", Path(path).stem)
    base = configlib.apply_overrides(base, list(overrides))
    cells = []
    for values in itertools.product(*grid.values()):
        axes, chosen = {}, {}
        for k, v in zip(grid, values):
            linked = isinstance(v, dict)  # a table of keys, the axis valued by its first
            axes[k] = next(iter(v.values())) if linked else v
            chosen.update(v if linked else {k: v})
        name = cell_name(axes)
        raw_cell = copy.deepcopy(base)
        for k, v in chosen.items():
            configlib.set_key(raw_cell, k, v)
        raw_cell["name"] = f"{base['name']} {name}"
        try:
            cfg = configlib.from_dict(raw_cell)
        except BadInput as e:
            raise BadInput(f"sweep cell {name}: {e}") from None
        cells.append(Cell(name, chosen, cfg, raw_cell, axes))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise BadInput(f"sweep {path}: grid values {seen[cell.name].axes} and {cell.axes} would share the cell "
                           f"{cell.name!r}; make the values differ in more than their type")
        seen[cell.name] = cell
    return base["name"], cells


@contextlib.contextmanager
def sweep_lock(out: Path):
    """Hold DIR/.sweep.lock for the whole sweep; a second sweep into DIR is bad input. The loser of a race
    for a new DIR removes nothing: the DIR is the winner's."""
    paths.make_dir(out)
    try:
        lock = open(out / ".sweep.lock", "a")
    except OSError as e:
        raise BadInput(f"--out {out}: cannot write in it ({e.strerror or e})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"--out {out} is in use by another sweep") from None
        yield


def run_sweep(path: Path, out: Path, overrides: list[str] = (), workers: int | None = None, backend: str = "local",
              address: str | None = None, progress: bool = True, track: str | None = None) -> list[tuple[Cell, str]]:
    """Run every cell not done yet; a failed cell is recorded and the others go on. Returns (cell, status)
    pairs. Everything that makes it bad input is found before anything is written, so nothing needs undoing.
    On KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI) the running cells are stopped and recorded as
    `interrupted`, the results table is written, and the interrupt goes on up."""
    if backend not in BACKENDS:
        raise BadInput(f"--backend: must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if address and backend != "ray":
        raise BadInput("--address joins a Ray cluster: use it with --backend ray")
    if workers is not None and workers < 1:
        raise BadInput(f"--workers: must be at least 1 (got {workers})")
    if address and workers:
        raise BadInput("--workers sizes a local Ray instance; the cluster at --address schedules by its own CPUs")
    name, cells = load_sweep(path, overrides)
    out = paths.out_dir(Path(out).absolute())
    if (out / "sweep.json").exists():
        read_index(out / "sweep.json")
    for cell in cells:  # refuse foreign DIRs before any cell runs
        RunDir.check(out / cell.name, cell.config.hash())
    env = {k: v for k, v in os.environ.items() if k.startswith("MODELCOLLAPSE_")} | tracking.sweep_env(track, name, out)
    jobs = [Job(c.name, str(out / c.config_file), str(out / c.name), str(out / c.log),
                str(Path.cwd()), c.config.cpus, c.config.gpus, env) for c in cells]
    cluster = RayCluster(address, workers, jobs) if backend == "ray" else contextlib.nullcontext()
    with cluster, sweep_lock(out):  # the cluster's checks come first: they are bad input too
        for cell in cells:
            cell.skipped, damage = finished(out / cell.name)
            cell.status = "done" if cell.skipped else "pending"
            if damage:
                print(f"{cell.name}: done, but {damage}: running it again to rebuild it from its finished generations",
                      file=sys.stderr)
            atomic_write_bytes(out / cell.config_file, tomli_w.dumps(cell.raw).encode())
        (out / "logs").mkdir(exist_ok=True)
        write_index(out, name, path, backend, cells)
        by_name = {c.name: c for c in cells}
        todo = [job for job in jobs if not by_name[job.name].skipped]

        def done(job: Job, result: dict) -> None:
            cell = by_name[job.name]
            cell.status, cell.error, cell.seconds = result["status"], result["error"], result["seconds"]
            write_index(out, name, path, backend, cells)
            if progress and cell.status != "interrupted":  # the interrupt itself is reported once, by the CLI
                ended = sum(c.status != "pending" and not c.skipped for c in cells)
                why = f": {cell.error}" if cell.error else ""
                print(f"[{ended}/{len(todo)}] {cell.name}: {cell.status}{why} ({cell.seconds or 0:.1f}s)", file=sys.stderr)

        try:
            if backend == "ray":
                cluster.run(todo, done)
            else:
                run_local(todo, workers or 1, done)
        except KeyboardInterrupt:  # the backend has stopped its cells and recorded them
            write_index(out, name, path, backend, cells)
            write_results(out, cells)
            raise
        write_results(out, cells)
    return [(c, c.status) for c in cells]


def write_index(out: Path, name: str, path: Path, backend: str, cells: list[Cell]) -> None:
    atomic_write_json(out / "sweep.json", {"name": name, "sweep_file": str(Path(path).absolute()), "backend": backend,
                                           "updated": now(), "cells": [c.record() for c in cells]})


def read_index(path: Path) -> dict:
    """DIR/sweep.json, or BadInput naming it when it is not what write_index writes."""
    try:
        index = read_json(path)
        ok = (isinstance(index, dict) and isinstance(index.get("name"), str) and isinstance(index.get("cells"), list)
              and index["cells"] and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in index["cells"]))
    except (OSError, ValueError) as e:
        ok, index = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise BadInput(f"{path} is not a sweep index (got {str(index)[:60]!r}); move it away and run the sweep "
                       "again to rewrite it from the cells")
    return index


def metric_rows(run_dir: Path, torn_tail: bool = False) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] when there is none yet); ValueError naming the first damaged
    line. With `torn_tail`, a last line cut short (a run killed while appending it) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_bytes().decode(errors="replace")
    lines = text.split("\n")
    if torn_tail and not text.endswith("\n"):
        lines = lines[:-1]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not all(k in row for k in COLUMNS):
            raise ValueError(f"{path} line {i} is damaged")
        rows.append(row)
    return rows


def finished(run_dir: Path) -> tuple[bool, str | None]:
    """(whether a cell's run is done and whole, what is wrong when it is done but not whole). Whole: its
    metrics.jsonl holds exactly the rows of its finished generations, as a run leaves it."""
    try:
        manifest = read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        return False, None  # not started, or a manifest the cell's own run will report
    if not isinstance(manifest, dict) or manifest.get("status") != "done":
        return False, None
    if not (run_dir / "metrics.jsonl").is_file():
        return False, f"{run_dir / 'metrics.jsonl'} is missing"
    view = RunView(run_dir, {}, "")  # reads the run's finished units, writes nothing
    try:
        rows = metric_rows(run_dir)
        units = [view.finished(p.parent) for p in run_dir.glob("*/**/metrics.json")]
        if any(u is None for u in units):
            raise ValueError(f"a generation's metrics.json in {run_dir} is damaged")
    except ValueError as e:  # BadInput too: a unit's recorded file that changed
        return False, str(e)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    if Counter(map(key, rows)) != Counter(key(r) for u in units for r in u):
        return False, f"{run_dir / 'metrics.jsonl'} does not hold the rows of its finished generations"
    return True, None


COLUMNS = ("policy", "seed", "iteration", "metric", "value")


def write_results(out: Path, cells: list[Cell]) -> None:
    """DIR/results.parquet and .csv from every cell's metrics.jsonl (whatever the cell's status: its rows
    are finished generations), the overridden keys as columns. A damaged file is named, never skipped; only
    the torn last line of a cell that did not finish is left out (its next run rebuilds the file)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    keys = list(cells[0].overrides)
    cols: dict[str, list] = {k: [] for k in ("cell", *keys, *COLUMNS)}
    for cell in cells:
        try:
            rows = metric_rows(out / cell.name, torn_tail=cell.status != "done")
        except ValueError as e:
            raise BadInput(f"{e}; run the sweep again (the cell's run rebuilds it from its finished generations)") from None
        for row in rows:
            cols["cell"].append(cell.name)
            for k in keys:
                cols[k].append(cell.overrides[k])
            for k in COLUMNS:
                cols[k].append(row[k])
    types = {"cell": pa.string(), "policy": pa.string(), "seed": pa.int64(), "iteration": pa.int64(),
             "metric": pa.string(), "value": pa.float64()}
    table = pa.table({k: pa.array(v, types[k]) if k in types else _column(v) for k, v in cols.items()})
    for suffix, write in ((".parquet", pq.write_table), (".csv", pacsv.write_csv)):
        sink = pa.BufferOutputStream()
        write(table, sink)
        atomic_write_bytes(out / f"results{suffix}", sink.getvalue().to_pybytes())


def _column(values: list):
    """A grid key's column: its own type where Arrow has one, else text (lists and tables as JSON)."""
    import pyarrow as pa

    if not any(isinstance(v, (list, dict)) for v in values):
        with contextlib.suppress(pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array(values)
    return pa.array([v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())
