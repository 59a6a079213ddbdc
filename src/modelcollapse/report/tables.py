"""The tables, as a header and rows of strings: a metric per iteration with its exact expectation, every
metric at the last iteration, differences paired by seed, a sweep's cells; each value the mean ± 95% CI over
seeds."""

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


REFERENCE = "accumulate"  # the policy the paired differences are taken against, where a run has it


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    """a − b over the seeds both have, mean ± 95% CI; "" where fewer than two seeds pair."""
    common = [s for s in a if s in b]
    if len(common) < 2:
        return ""
    m, h = mean_ci([a[s] - b[s] for s in common])
    return f"{m:+.4g} ± {h:.2g}"


def paired_table(run: Run, metrics: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Per metric, differences paired by seed (every policy runs the same seeds): each policy's rise from
    iteration 1 to its last, and each other policy minus accumulate at the last iteration. None for a run
    with fewer than two seeds, whose differences have no interval."""
    if len(run.seeds) < 2:
        return None
    policies = [p for p in run.policies if any(p in run.table(m) for m in metrics)]
    others = [p for p in policies if p != REFERENCE] if REFERENCE in policies else []
    body = []
    for metric in metrics:
        table = run.table(metric)
        last = {p: run.by_seed(metric, p, max(table[p])) if table.get(p) else {} for p in policies}
        rises = [paired(last[p], run.by_seed(metric, p, min(table[p]))) if table.get(p) else "" for p in policies]
        body.append([metric, *rises, *(paired(last[p], last[REFERENCE]) for p in others)])
    return ["metric (paired by seed)", *(f"{p}: last − first" for p in policies), *(f"{p} − {REFERENCE} (last)" for p in others)], body
