"""Figures and tables from run directories alone (manifest.json + metrics.jsonl + per-generation samples).

For every family and metric: mean over seeds per iteration with a 95% t-interval, one line per policy, one
panel per run, and the exact expectation dashed wherever the family's `theory` gives one for that metric
and policy. A sweep directory gets faceted figures
instead: per metric, a panel per cell titled by its overrides, laid out rows x columns when the grid has two
keys (so a sweep over T draws the paper's Fig. 7), and a table of the cells. Sample images and texts that
generations saved are laid out policy by generation.
"""

from __future__ import annotations

import html
import json
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from modelcollapse import paths  # noqa: E402
from modelcollapse.errors import BadInput  # noqa: E402
from modelcollapse.families import load_family, table_name  # noqa: E402
from modelcollapse.policies import from_spec  # noqa: E402
from modelcollapse.store import read_json  # noqa: E402
from modelcollapse.sweep import read_index  # noqa: E402


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


class SweepDir:
    """A sweep directory: its grid keys and values, and the runs of the cells that have started."""

    def __init__(self, path: Path):
        index = read_index(path / "sweep.json")
        self.path, self.name = path, index["name"]
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


def family_extras(family: str):
    """A family's declaration (primary metric, theory), when it can be loaded (the report needs only run dirs)."""
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
    curves = spec.theory(spec.Config(**run.config[spec.table]), from_spec(specs[policy]), iterations)
    return None if curves is None else curves.get(metric)


FEW_SEEDS = 3
BASELINE_COLOURS = ("#7f7f7f", "#8c564b", "#e377c2", "#bcbd22")


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


def draw_panel(ax, run: Run, metric: str, legend: bool = True) -> None:
    """Mean over seeds per iteration with its 95% interval (each seed's line instead, faint, for up to
    FEW_SEEDS seeds), a line per policy, theory dashed, the family's trivial baselines dotted."""
    table = run.table(metric)
    lows, highs = [], []
    for i, policy in enumerate(p for p in run.policies if p in table):
        color = f"C{i}"
        its = sorted(table[policy])
        m, h = np.array([mean_ci(table[policy][n]) for n in its]).T
        lows.append(m.min())
        highs.append(m.max())
        style = "o-" if len(its) <= 30 else "-"
        n_seeds = len(table[policy][its[0]])
        ax.plot(its, m, style, color=color, ms=3, label=f"{policy} (n={n_seeds})")
        if n_seeds <= FEW_SEEDS:  # a t-interval on 2 or 3 seeds is mostly its t quantile (12.7 for 2): show the seeds
            for k in range(n_seeds):
                ax.plot(its, [table[policy][n][k] if k < len(table[policy][n]) else np.nan for n in its], "-", color=color, lw=0.7, alpha=0.35)
        else:
            ax.fill_between(its, m - h, m + h, color=color, alpha=0.2)
        theory = theory_for(run, policy, metric, max(its))
        if theory is not None:
            ax.plot(range(1, len(theory) + 1), theory, "--", color=color, lw=1.2, label=f"{policy} theory")
    draw_baselines(ax, run, metric)
    if lows and min(lows) > 0 and max(highs) / min(lows) > 30:
        ax.set_yscale("log")  # replace's linear growth would flatten accumulate's curve into the axis
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("model-fitting iteration")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def panels(n: int, ncols: int, size=(4.6, 3.6)):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric(runs: list[Run], metric: str, path: Path) -> None:
    """One metric, a panel per run (a sweep over T draws the paper's Fig. 7)."""
    fig, axes = panels(len(runs), 3)
    for ax, run in zip(axes, runs):
        draw_panel(ax, run, metric)
        ax.set_title(run.name, fontsize=10)
    save(fig, path)


def plot_run_metrics(run: Run, metrics: list[str], path: Path) -> None:
    """Every other metric of one run, a small panel each."""
    fig, axes = panels(len(metrics), 4, size=(3.6, 2.8))
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        draw_panel(ax, run, metric, legend=i == 0)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(run.name, fontsize=10)
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
    legend = True
    for run in sweep.runs:
        if metric in run.metrics():
            ax = axes[sweep.slot(run)]
            ax.axis("on")
            draw_panel(ax, run, metric, legend=legend)
            ax.set_title(sweep.title(run), fontsize=10)
            legend = False
    fig.suptitle(f"{sweep.name}: {metric}", fontsize=11)
    save(fig, path)


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
    """Each metric at the last iteration, a column per policy."""
    policies = [p for p in run.policies if any(p in run.table(m) for m in metrics)]
    body = []
    for metric in metrics:
        table = run.table(metric)
        body.append([metric, *last_values(table, policies)])
    return ["metric (last iteration)", *policies], body


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


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def samples_section(run: Run, out: Path, index: int) -> str:
    """Sample grids (samples.png) and texts (samples.txt) of the first seed, policy by generation."""
    seed = run.seeds[0]
    parts = []
    for policy in run.policies:
        gens = sorted(run.path.glob(f"{policy}/seed-{seed}/gen-*"), key=lambda p: int(p.name.split("-")[1]))
        images, texts = [], []
        for g in gens:
            if (g / "samples.png").exists():
                dest = out / "samples" / f"run{index}-{policy}-{g.name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(g / "samples.png", dest)
                images.append(f'<figure><img src="samples/{dest.name}" width="220"><figcaption>{g.name}</figcaption></figure>')
            if (g / "samples.txt").exists():
                text = (g / "samples.txt").read_text(errors="replace")[:1500]
                texts.append(f"<details><summary>{g.name}</summary><pre>{html.escape(text)}</pre></details>")
        if images or texts:
            parts.append(f"<h4>{html.escape(policy)} (seed {seed})</h4><div class='row'>{''.join(images)}</div>{''.join(texts)}")
    return "".join(parts)


def primary_first(runs: list[Run], primary: str | None) -> list[str]:
    """Every metric of the runs, in the order they appear, the family's primary metric first."""
    return sorted(dict.fromkeys(m for r in runs for m in r.metrics()), key=lambda m: m != primary)


def add_family_figures(shown: list[Run], runs: list[Run], out: Path, body: list[str], md: list[str]) -> None:
    """The figures a family draws of its own runs (its `report_figures`), files prefixed by the run's number."""
    for r in shown:
        spec = family_extras(r.family)
        if spec is None or spec.report_figures is None:
            continue
        folder = out / f"run{runs.index(r)}"
        for title, png in spec.report_figures(r.path, folder):
            src = f"{folder.name}/{png}"
            body.append(f"<h3>{html.escape(r.name)}: {html.escape(title)}</h3><img src='{src}' style='max-width:100%'>")
            md += [f"### {r.name}: {title}", "", f"![{title}]({src})", ""]


def add_samples(shown: list[Run], runs: list[Run], out: Path, body: list[str]) -> None:
    """The sample galleries of `shown`, numbered by their place among all the report's `runs`."""
    for r in shown:
        section = samples_section(r, out, runs.index(r))
        if section:
            body.append(f"<h3>samples: {html.escape(r.name)}</h3>{section}")


def sweep_section(sweep: SweepDir, index: int, runs: list[Run], out: Path, body: list[str], md: list[str]) -> None:
    """A sweep: per metric (the family's primary first) a faceted figure and a table of the cells."""
    primary = primary_metric(sweep.runs[0].family) if sweep.runs else None
    metrics = primary_first(sweep.runs, primary)
    body.append(f"<h2>sweep {html.escape(sweep.name)} ({html.escape(str(sweep.path))})</h2>")
    md += [f"## sweep {sweep.name}", ""]
    for metric in metrics:
        png = f"sweep{index}-{metric}.png"
        plot_facets(sweep, metric, out / png)
        header, rows = sweep_table(sweep, metric)
        body.append(f"<h3>{html.escape(metric)}</h3><img src='{png}' style='max-width:100%'>{html_table(header, rows)}")
        md += [f"### {metric}", "", f"![{metric}]({png})", "", markdown(header, rows), ""]
    add_samples(sweep.runs, runs, out, body)


def write_report(dirs: list[Path], out: Path) -> Path:
    out = paths.out_dir(out)
    runs = find_runs(dirs)
    if not any(r.n_rows for r in runs):
        raise BadInput("report: the run directories hold no metrics yet")
    paths.make_dir(out)
    md, body = ["# modelcollapse report", ""], []
    for i, sweep in enumerate(dict.fromkeys(r.sweep for r in runs if r.sweep)):
        sweep_section(sweep, i, runs, out, body, md)
    by_family: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.sweep is None:
            by_family[r.family].append(r)
    for family, fruns in by_family.items():
        primary = primary_metric(family)
        metrics = primary_first(fruns, primary)
        family = fruns[0].family_name  # files and headings: a family given as a path is named by its module
        body.append(f"<h2>{html.escape(family)}</h2>")
        md += [f"## {family}", ""]
        others = metrics[1:] if metrics and metrics[0] == primary else metrics
        if primary in metrics:
            png = f"{family}-{primary}.png"
            plot_metric([r for r in fruns if primary in r.metrics()], primary, out / png)
            body.append(f"<h3>{html.escape(primary)}</h3><img src='{png}' style='max-width:100%'>")
            md += [f"### {primary}", "", f"![{primary}]({png})", ""]
            for r in fruns:
                if primary in r.metrics():
                    header, rows = summary_table(r, primary)
                    caption = f"{r.name}: {primary}, mean ± 95% CI over {len(r.seeds)} seed(s) ({r.manifest.get('status')})"
                    body.append(f"<p>{html.escape(caption)}</p>{html_table(header, rows)}")
                    md += [f"**{caption}**", "", markdown(header, rows), ""]
        for r in fruns:
            mine = [m for m in others if m in r.metrics()]
            if not mine:
                continue
            png = f"{family}-run{runs.index(r)}-metrics.png"
            plot_run_metrics(r, mine, out / png)
            header, rows = final_table(r, mine)
            caption = f"{r.name}: every other metric"
            body.append(f"<h3>{html.escape(caption)}</h3><img src='{png}' style='max-width:100%'>{html_table(header, rows)}")
            md += [f"### {caption}", "", f"![{caption}]({png})", "", markdown(header, rows), ""]
        add_family_figures(fruns, runs, out, body, md)
        add_samples(fruns, runs, out, body)
    (out / "summary.md").write_text("\n".join(md) + "\n", errors="backslashreplace")  # paths need not be UTF-8
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.row{display:flex;flex-wrap:wrap}"
             "figure{margin:4px}pre{white-space:pre-wrap;font-size:12px}")
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>modelcollapse report</title><style>{style}</style>"
        f"</head><body><h1>modelcollapse report</h1><p>{len(runs)} run(s): "
        f"{html.escape(', '.join(str(r.path) for r in runs))}</p>{''.join(body)}</body></html>\n", errors="backslashreplace"
    )
    return out
