"""The tables, as a header and rows of strings: a metric per iteration with its exact expectation, every
metric at the last iteration, a sweep's cells; each value the mean ± 95% CI over seeds."""

from __future__ import annotations

from .runs import Run, SweepDir, mean_ci, theory_for
from .words import unit_of


def last_values(table: dict, policies: list[str]) -> list[str]:
    """Each policy's value at its last iteration, mean ± 95% CI over seeds ("" where it has none)."""
    cells = []
    for p in policies:
        if table.get(p):
            m, h = mean_ci(table[p][max(table[p])])
            cells.append(f"{m:.4g} ± {h:.2g}" if h else f"{m:.4g}")
        else:
            cells.append("")
    return cells


def sweep_table(sweep: SweepDir, metric: str) -> tuple[list[str], list[list[str]]]:
    """A row per cell: its overrides, then each policy's metric at the last iteration (mean ± 95% CI)."""
    runs = [r for r in sweep.runs if metric in r.metrics()]
    policies = list(dict.fromkeys(p for r in runs for p in r.policies if p in r.table(metric)))
    body = []
    for run in runs:
        table = run.table(metric)
        body.append([run.path.name, *(str(run.axes[k]) for k in sweep.keys), *last_values(table, policies)])
    return ["cell", *map(sweep.short, sweep.keys), *(f"{p} (last iteration)" for p in policies)], body


def final_table(run: Run, metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """Each metric at the last iteration, with its unit, a column per policy."""
    policies = [p for p in run.policies if any(p in run.table(m) for m in metrics)]
    body = []
    for metric in metrics:
        table = run.table(metric)
        body.append([metric, unit_of(run.family, metric), *last_values(table, policies)])
    return ["metric (last iteration)", "unit", *policies], body


def summary_table(run: Run, metric: str) -> tuple[list[str], list[list[str]]]:
    table = run.table(metric)
    policies = [p for p in run.policies if p in table]
    its = sorted({n for p in policies for n in table[p]})
    header = ["iteration"]
    theories = {}
    for p in policies:
        header.append(f"{p}")
        t = theory_for(run, p, metric, max(its))
        if t is not None:
            theories[p] = t
            header.append(f"{p} theory")
    body = []
    for n in its:
        row = [str(n)]
        for p in policies:
            vals = table[p].get(n)
            if vals is not None and len(vals):
                m, h = mean_ci(vals)
                row.append(f"{m:.4g} ± {h:.2g}" if h else f"{m:.4g}")
            else:
                row.append("")
            if p in theories:
                row.append(f"{theories[p][n - 1]:.4g}")
        body.append(row)
    return header, body
