"""The figures: per metric, the mean over seeds per iteration with its 95% interval (or each seed, for a
few), a line per policy, a panel per run (or per sweep cell), the exact expectation dashed above the data and
the family's trivial baselines dotted, one legend beside the panels."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from .runs import Run, SweepDir, family_extras, mean_ci, theory_for  # noqa: E402
from .words import group_key, unit_of  # noqa: E402

FEW_SEEDS = 2  # up to this many seeds, each seed's line instead of a band: t(0.975, 1 df) = 12.7 makes a 2-seed band
# mostly its quantile; from 3 seeds (t = 4.3) the band is the interval the tables print
THEORY = dict(ls=(0, (4, 2)), lw=1.6, zorder=4)  # dashed, above the data lines, so a theory that fits still shows
BASELINE_COLOURS = ("#7f7f7f", "#8c564b", "#e377c2", "#bcbd22")


def band_phrase(lo: int, hi: int) -> str:
    """How a figure's lines were drawn from its seeds (see draw_panel)."""
    if hi <= 1:
        return "Lines: one seed each, so no interval."
    if hi <= FEW_SEEDS:
        return f"Lines: the mean of {hi} seeds; faint lines: each seed (too few seeds for a useful interval)."
    return f"Lines: the mean over {lo if lo == hi else f'{lo}–{hi}'} seeds; bands: its 95% t-interval."


def draw_baselines(ax, run: Run, metric: str) -> None:
    """The family's trivial baselines for `metric` as labelled dotted horizontal lines, when its module has
    `baselines(config, cache_dir) -> {metric: {name: value}}` (read once per run, from the manifest's config)."""
    spec = family_extras(run.family)
    if spec is None or not hasattr(spec.module, "baselines"):
        return
    if not hasattr(run, "baselines"):
        from modelcollapse.families.common import cache_dir

        try:
            run.baselines = spec.module.baselines(spec.Config(**run.config.get(spec.table, {})), cache_dir())
        except ValueError:  # BadInput too: e.g. the data file is gone; the curves are drawn without baselines
            run.baselines = {}
    for k, (name, value) in enumerate(run.baselines.get(metric, {}).items()):
        ax.axhline(value, ls=":", lw=1.3, color=BASELINE_COLOURS[k % len(BASELINE_COLOURS)], label=name)


def colors_for(runs: list[Run]) -> dict[str, str]:
    """One colour per policy across a figure, so that one legend serves every panel."""
    return {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(p for r in runs for p in r.policies))}


def draw_panel(ax, run: Run, metric: str, colors: dict[str, str]) -> None:
    """Mean over seeds per iteration with its 95% interval (each seed's line instead, faint, for up to
    FEW_SEEDS seeds; a line alone for one seed), a line per policy, the exact expectation dashed above it, the
    family's trivial baselines dotted."""
    table = run.table(metric)
    lows, highs, drew_theory = [], [], False
    for policy in (p for p in run.policies if p in table):
        color = colors[policy]
        its = sorted(table[policy])
        m, h = np.array([mean_ci(table[policy][n]) for n in its]).T
        lows.append(m.min())
        highs.append(m.max())
        style = "o-" if len(its) <= 30 else "-"
        n_seeds = max(len(table[policy][n]) for n in its)
        ax.plot(its, m, style, color=color, ms=3, zorder=2, label=f"{policy} ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
        if 1 < n_seeds <= FEW_SEEDS:
            for k in range(n_seeds):
                ax.plot(its, [table[policy][n][k] if k < len(table[policy][n]) else np.nan for n in its], "-", color=color, lw=0.7, alpha=0.35, zorder=1)
        elif n_seeds > FEW_SEEDS:
            ax.fill_between(its, m - h, m + h, color=color, alpha=0.2, lw=0, zorder=1)
        theory = theory_for(run, policy, metric, max(its))
        if theory is not None:
            ax.plot(range(1, len(theory) + 1), theory, color=darker(color), **THEORY)
            drew_theory = True
    if drew_theory:  # one legend entry for every policy's theory line
        ax.plot([], [], color="0.3", label="dashed: exact expectation", **THEORY)
    draw_baselines(ax, run, metric)
    if lows and min(lows) > 0 and max(highs) / min(lows) > 30:
        ax.set_yscale("log")  # replace's linear growth would flatten accumulate's curve into the axis
    finish(ax, run.family, metric)


def draw_group(ax, run: Run, names: list[str], colors: dict[str, str]) -> None:
    """Several metrics of one kind (class_freq_0..9) in one panel: each name's mean, a thin line per name in
    its policy's colour."""
    for policy in run.policies:
        for k, name in enumerate(names):
            per_it = run.table(name).get(policy)
            if per_it:
                its = sorted(per_it)
                label = f"{policy} (a line per {group_key(names)})" if k == 0 else None
                ax.plot(its, [np.mean(per_it[n]) for n in its], "-", color=colors[policy], lw=0.9, alpha=0.75, label=label)
    finish(ax, run.family, names[0], group_key(names))


def finish(ax, family: str, metric: str, shown: str | None = None) -> None:
    """Axis labels: the iteration, and the metric (`shown`: a group's name instead) with its unit."""
    unit, shown = unit_of(family, metric), shown or metric
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("model-fitting iteration")
    ax.set_ylabel(f"{shown} ({unit})" if unit else shown, fontsize=8)
    ax.grid(alpha=0.3)


def darker(color: str) -> tuple:
    r, g, b = matplotlib.colors.to_rgb(color)
    return (0.6 * r, 0.6 * g, 0.6 * b)


def panels(n: int, ncols: int, size=(4.6, 3.6)):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols + 2.2, size[1] * nrows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def save(fig, path: Path) -> None:
    """With one legend for every panel, outside them on the right, so that it covers no data."""
    seen: dict = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric(runs: list[Run], metric: str, path: Path) -> None:
    """One metric, a panel per run (a sweep over T draws the paper's Fig. 7)."""
    fig, axes = panels(len(runs), 3)
    colors = colors_for(runs)
    for ax, run in zip(axes, runs):
        draw_panel(ax, run, metric, colors)
        ax.set_title(run.label, fontsize=10)
    save(fig, path)


def plot_run_metrics(run: Run, metric_groups: list[tuple[str, list[str]]], path: Path) -> None:
    """Every other metric of one run, a small panel each (a group of names such as class_freq_* in one)."""
    fig, axes = panels(len(metric_groups), 4, size=(3.6, 2.8))
    colors = colors_for([run])
    for ax, (key, names) in zip(axes, metric_groups):
        if len(names) > 1:
            draw_group(ax, run, names, colors)
            ax.set_title(f"{key} ({len(names)} metrics, means)", fontsize=9)
        else:
            draw_panel(ax, run, names[0], colors)
            ax.set_title(key, fontsize=9)
    fig.suptitle(run.label, fontsize=10)
    save(fig, path)


def plot_facets(sweep: SweepDir, metric: str, path: Path) -> None:
    """One metric of a sweep: a panel per cell titled by its overrides; rows x columns for two grid keys."""
    if len(sweep.keys) == 2:
        nrows, ncols = (len(sweep.values[k]) for k in sweep.keys)
        fig, axes = panels(nrows * ncols, ncols)
    else:
        fig, axes = panels(len(sweep.runs), 3)
    for ax in axes:
        ax.axis("off")  # cells with no run (or not this metric) stay blank
    colors = colors_for(sweep.runs)
    for run in sweep.runs:
        if metric in run.metrics():
            ax = axes[sweep.slot(run)]
            ax.axis("on")
            draw_panel(ax, run, metric, colors)
            ax.set_title(sweep.title(run), fontsize=10)
    fig.suptitle(f"{sweep.name}: {metric}", fontsize=11)
    save(fig, path)


def numeric_axis(sweep: SweepDir) -> str | None:
    """The sweep's one grid key, when it has one and every value is a number."""
    if len(sweep.keys) != 1:
        return None
    values = [json.loads(v) for v in sweep.values[sweep.keys[0]]]
    return sweep.keys[0] if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else None


def plot_axis(sweep: SweepDir, key: str, metric: str, path: Path) -> None:
    """One metric at the last iteration against the sweep's numeric axis: each policy's mean with its 95%
    interval per cell, and the family's exact expectation dashed where it has one."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    policies = list(dict.fromkeys(p for r in sweep.runs for p in r.policies if p in r.table(metric)))
    shown = []
    for i, policy in enumerate(policies):
        x, mean, half, theory = [], [], [], []
        for run in sorted(sweep.runs, key=lambda r: r.axes[key]):
            series = run.table(metric).get(policy)
            if not series:
                continue
            last = max(series)
            m, h = mean_ci(series[last])
            x.append(run.axes[key]), mean.append(m), half.append(h)
            t = theory_for(run, policy, metric, last)
            theory.append(np.nan if t is None else t[-1])
        color = f"C{i}"
        ax.errorbar(x, mean, yerr=half, marker="o", ms=3, capsize=2, color=color, label=policy)
        if np.isfinite(theory).any():
            ax.plot(x, theory, "--", color=color, lw=1.2, label=f"{policy} theory")
        shown += mean
    if shown and min(shown) > 0 and max(shown) / min(shown) > 30:
        ax.set_yscale("log")  # as draw_panel: values decades apart
    ax.grid(alpha=0.3)
    ax.set_xlabel(sweep.short(key))
    ax.set_ylabel(f"{metric} (last iteration)")
    ax.set_title(f"{sweep.name}: {metric}", fontsize=10)
    ax.legend(fontsize=7)
    save(fig, path)
