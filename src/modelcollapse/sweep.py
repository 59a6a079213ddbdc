"""Many runs from one file: a base config crossed with a grid of overrides, each cell an ordinary run DIR.

    [base]                      # or: base = "path/to/config.toml" (relative to this file)
    name = "linreg-fig7"
    ...
    [grid]
    "linreg.T" = [20, 50, 111]  # any config key; cells are the cross product

Cells run one after another into DIR/<cell>/, e.g. DIR/T-20/; running the sweep again resumes them.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

from modelcollapse import config as configlib
from modelcollapse.errors import BadInput
from modelcollapse.store import atomic_write_json


@dataclass
class Cell:
    name: str  # folder name, e.g. "T-20"
    overrides: dict  # {"linreg.T": 20}
    config: configlib.ExperimentConfig


def is_sweep(raw: dict) -> bool:
    return "grid" in raw


def _value_name(v) -> str:
    return str(v).replace("/", "_").replace(" ", "")


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
    unknown = set(raw) - {"base", "grid"}
    if unknown:
        raise BadInput(f"sweep {path}: unknown key(s) {sorted(unknown)}; a sweep has only 'base' and 'grid'")
    base = sweep_base(path, raw)
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise BadInput(f"sweep {path}: 'grid' must map config keys to non-empty lists of values")
    base.setdefault("name", Path(path).stem)
    base = configlib.apply_overrides(base, list(overrides))
    cells = []
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(grid, values))
        name = "_".join(f"{k.split('.')[-1]}-{_value_name(v)}" for k, v in chosen.items())
        raw_cell = copy.deepcopy(base)
        for k, v in chosen.items():
            configlib.set_key(raw_cell, k, v)
        raw_cell["name"] = f"{base['name']} {name}"
        try:
            cfg = configlib.from_dict(raw_cell)
        except BadInput as e:
            raise BadInput(f"sweep cell {name}: {e}") from None
        cells.append(Cell(name, chosen, cfg))
    return base["name"], cells


def run_sweep(path: Path, out: Path, overrides: list[str] = (), progress: bool | None = None) -> list[tuple[Cell, str]]:
    """Run every cell; a failed cell is recorded and the others go on. Returns (cell, status) pairs."""
    from modelcollapse.loop import run_experiment
    from modelcollapse.store import RunDir

    name, cells = load_sweep(path, overrides)
    for cell in cells:  # refuse foreign DIRs before any cell runs
        RunDir.check(Path(out) / cell.name, cell.config.hash())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for cell in cells:
        try:
            run_experiment(cell.config, out / cell.name, progress=progress)
            results.append((cell, "done"))
        except BadInput:
            raise
        except Exception as e:  # one failed cell does not stop the others
            results.append((cell, f"failed: {type(e).__name__}: {e}"))
    atomic_write_json(
        out / "sweep.json",
        {"name": name, "cells": [{"name": c.name, "overrides": c.overrides, "status": s} for c, s in results]},
    )
    return results
