"""The words of a section, from what the family declares (CLAIM, METRICS, MIN_ITERATIONS): the claim, each
metric's definition, unit and better direction, metric names grouped into panels, and what a run's seeds and
iterations can and cannot show."""

from __future__ import annotations

import os
import re

from modelcollapse.families import DEFAULT_CLAIM, DEFAULT_MIN_ITERATIONS, MetricInfo, metric_info, table_name

from .runs import Run, family_extras


def claim_of(family: str) -> str:
    spec = family_extras(family)
    return spec.claim if spec else DEFAULT_CLAIM


def info(family: str, metric: str) -> MetricInfo | None:
    spec = family_extras(family)
    return spec.metric_info(metric) if spec else metric_info({}, metric)


def unit_of(family: str, metric: str) -> str:
    i = info(family, metric)
    return i.unit if i else ""


def describe(family: str, metric: str) -> str:
    """`metric`: its definition (unit; which way is better), as the family declares it."""
    i = info(family, metric)
    if i is None:
        return f"{metric}: (the {table_name(family)} family declares no definition)"
    unit = f"unit {i.unit}" if i.unit else "no unit"
    return f"{metric}: {i.definition}. [{unit}; {i.direction}]"


def groups(family: str, metrics: list[str]) -> list[tuple[str, list[str]]]:
    """The metrics as panels: names that match one `prefix*` entry of the family's METRICS (or end in
    `_freq_<k>`, for a family that declares none) share one, at the place of the first."""
    spec = family_extras(family)
    patterns = [k for k in (spec.metrics if spec else {}) if k.endswith("*")]
    out: dict[str, list[str]] = {}
    for m in metrics:
        exact = spec is not None and m in spec.metrics
        hits = [] if exact else [k for k in patterns if m.startswith(k[:-1])]
        key = max(hits, key=len) if hits else (re.sub(r"_freq_.*$", "_freq_*", m) if "_freq_" in m and not exact else m)
        out.setdefault(key, []).append(m)
    return [(k, v) if len(v) > 1 or k == v[0] else (v[0], v) for k, v in out.items()]


def group_key(names: list[str]) -> str:
    return os.path.commonprefix(names) + "*" if len(names) > 1 else names[0]


def seed_counts(tables: list[dict]) -> tuple[int, int]:
    """The fewest and most seeds behind any (policy, iteration) point of these metric tables."""
    counts = [len(v) for t in tables for its in t.values() for v in its.values()]
    return (min(counts), max(counts)) if counts else (0, 0)


def seeds_phrase(lo: int, hi: int) -> str:
    """What the numbers beside it are: a mean with its interval only where there are seeds to have one."""
    if hi <= 1:
        return "one seed: no interval"
    over = f"{hi} seeds" if lo == hi else f"{lo}–{hi} seeds (some chains unfinished)"
    return f"mean ± 95% CI over {over}" if lo > 1 else f"mean ± 95% CI over {over}; a single seed's point has none"


def min_iterations(family: str) -> int:
    spec = family_extras(family)
    return spec.min_iterations if spec else DEFAULT_MIN_ITERATIONS


def run_facts(run: Run, iterations_needed: int) -> list[str]:
    """What a run can and cannot show: its seeds and iterations against what the family's claim needs."""
    n_seeds, n_its = len(run.seeds), int(run.config.get("iterations", 0))
    facts = [f"{n_seeds} seed{'s' if n_seeds != 1 else ''}, {n_its} iteration{'s' if n_its != 1 else ''}, "
             f"status {run.manifest.get('status', 'unknown')}."]
    if n_its < iterations_needed:
        facts.append(f"A smoke test: {n_its} iteration{'s' if n_its != 1 else ''}, too few to show the claim "
                     f"(the {run.family_name} family needs at least {iterations_needed}); read its curves as a check "
                     "that the loop runs, not as a result.")
    if n_seeds == 1:
        facts.append("One seed: no interval, so a difference between policies may be seed-to-seed noise.")
    return facts
