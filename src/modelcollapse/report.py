"""Figures, tables and words from run directories alone (manifest.json + metrics.jsonl + per-generation samples).

Each section opens with what it tests: the family's CLAIM, the paper's numbers where it has an analogue
(REFERENCE), what the runs can and cannot show (seeds; fewer iterations than the family's MIN_ITERATIONS make a
smoke test), a link to each run's config, and each metric shown with its definition, unit and which way is
better (the family's METRICS). Then, for every metric: mean over seeds per iteration with a 95% t-interval, one
line per policy, one panel per run, and the exact expectation dashed (drawn above the data) wherever the
family's `theory` gives one. A sweep directory gets faceted figures instead: per metric, a panel per cell
titled by its overrides, laid out rows x columns when the grid has two keys (so a sweep over T draws the
paper's Fig. 7), and a table of the cells. Sample images and texts that generations saved are laid out policy
by generation. summary.md holds the same words and tables.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import unicodedata
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
import tomli_w  # noqa: E402

from modelcollapse import paths  # noqa: E402
from modelcollapse.errors import BadInput  # noqa: E402
from modelcollapse.families import DEFAULT_CLAIM, DEFAULT_MIN_ITERATIONS, MetricInfo, load_family, metric_info, table_name  # noqa: E402
from modelcollapse.policies import from_spec  # noqa: E402
from modelcollapse.selection import SelectSpec  # noqa: E402
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


# -- words ---------------------------------------------------------------------------------------------------


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


def band_phrase(lo: int, hi: int) -> str:
    """How a figure's lines were drawn from its seeds (see draw_panel)."""
    if hi <= 1:
        return "Lines: one seed each, so no interval."
    if hi <= FEW_SEEDS:
        return f"Lines: the mean of {hi} seeds; faint lines: each seed (too few seeds for a useful interval)."
    return f"Lines: the mean over {lo if lo == hi else f'{lo}–{hi}'} seeds; bands: its 95% t-interval."


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


def write_config(run: Run, out: Path) -> str:
    """The run's resolved config as TOML in the report (`modelcollapse run` reads it); its path in the report."""
    def plain(value):  # TOML has no null: an unset option is its default
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [plain(v) for v in value if v is not None]
        return value

    config = plain(run.config)
    if config.get("seeds") == list(range(len(config.get("seeds", [])))):
        config["seeds"] = len(config["seeds"])  # seeds 0..n-1, as a config writes them
    rel = f"configs/{run.slug}.toml"
    note = f"# The config of the run in {run.path}, as its manifest.json records it (every option resolved).\n"
    text = note + tomli_w.dumps(config)
    (out / "configs").mkdir(exist_ok=True)
    (out / rel).write_text(text, errors="backslashreplace")
    return rel


class Doc:
    """The report's HTML body and summary.md, written side by side so that both carry the same words.
    A piece of text is a str, or a (text, href) pair for a link."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []

    @staticmethod
    def _inline(parts) -> tuple[str, str]:
        h, m = [], []
        for part in parts:
            if isinstance(part, tuple):
                text, href = part
                h.append(f"<a href='{html.escape(href)}'>{html.escape(text, quote=False)}</a>")
                m.append(f"[{text}]({href})")
            else:
                h.append(html.escape(part, quote=False))  # text, not an attribute: quotes stay readable
                m.append(part)
        return "".join(h), "".join(m)

    def heading(self, level: int, *parts) -> None:
        h, m = self._inline(parts)
        self.html.append(f"<h{level}>{h}</h{level}>")
        self.md += ["#" * level + " " + m, ""]

    def para(self, *parts, cls: str | None = None, lead: str = "") -> None:
        h, m = self._inline(parts)
        attr = f" class='{cls}'" if cls else ""
        self.html.append(f"<p{attr}>{f'<b>{html.escape(lead, quote=False)}</b> ' if lead else ''}{h}</p>")
        self.md += [(f"**{lead}** " if lead else "") + m, ""]

    def items(self, rows: list[list]) -> None:
        """A bulleted list, each row a list of parts."""
        if rows:
            pairs = [self._inline(r) for r in rows]
            self.html.append("<ul>" + "".join(f"<li>{h}</li>" for h, _ in pairs) + "</ul>")
            self.md += [f"- {m}" for _, m in pairs] + [""]

    def figure(self, png: str, alt: str, caption: str) -> None:
        self.html.append(f"<figure><a href='{html.escape(png)}'><img src='{html.escape(png)}' alt='{html.escape(alt)}' "
                         f"style='max-width:100%'></a><figcaption>{html.escape(caption, quote=False)}</figcaption></figure>")
        self.md += [f"![{alt}]({png})", "", f"*{caption}*", ""]

    def table(self, caption: str, header: list[str], body: list[list[str]]) -> None:
        self.html.append(f"<p class='caption'>{html.escape(caption, quote=False)}</p>{html_table(header, body)}")
        self.md += [f"**{caption}**", "", markdown(header, body), ""]


def intro(doc: Doc, family: str, runs: list[Run], out: Path) -> None:
    """What a section tests and what its runs can show: claim, the paper's numbers, each run's config and facts."""
    spec = family_extras(family)
    doc.para(claim_of(family), cls="claim", lead="Claim.")
    if spec is not None and spec.reference:
        doc.para(spec.reference, cls="reference", lead="The paper.")
    rows = []
    for r in runs:
        rows.append([f"{r.label}: ", ("config", write_config(r, out)), f" (run directory {r.path}). ", " ".join(run_facts(r, min_iterations(family)))])
    doc.items(rows)


def define(doc: Doc, family: str, metrics: list[str]) -> None:
    """Each metric shown (a group of names such as class_freq_* once), with its definition, unit and direction."""
    lines = []
    for key, names in groups(family, metrics):
        lines.append([describe(family, names[0]).replace(names[0], key, 1)])
    doc.items(lines)


# -- figures -------------------------------------------------------------------------------------------------


FEW_SEEDS = 3
THEORY = dict(ls=(0, (4, 2)), lw=1.6, zorder=4)  # dashed, above the data lines, so a theory that fits still shows
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
        if 1 < n_seeds <= FEW_SEEDS:  # a t-interval on 2 or 3 seeds is mostly its t quantile (12.7 for 2): show the seeds
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


def group_key(names: list[str]) -> str:
    return os.path.commonprefix(names) + "*" if len(names) > 1 else names[0]


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


# -- tables --------------------------------------------------------------------------------------------------


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


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


# -- samples -------------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Sampled text as valid text for a page: a control character (NUL, 0x03, DEL, C1, ...) becomes a visible
    `\\xNN` escape; tabs and newlines stay. U+FFFD, where the model's bytes were not UTF-8, stays as it is."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs") else
                   f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


def samples_section(run: Run, out: Path) -> str:
    """Sample grids (samples.png, each linked to its full size) and texts (samples.txt) of the first seed,
    policy by generation."""
    seed = run.seeds[0]
    parts, odd = [], False
    for policy in run.policies:
        gens = sorted(run.path.glob(f"{policy}/seed-{seed}/gen-*"), key=lambda p: int(p.name.split("-")[1]))
        images, texts = [], []
        for g in gens:
            if (g / "samples.png").exists():
                dest = out / "samples" / f"{run.slug}-{slug(policy)}-{g.name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(g / "samples.png", dest)
                src = f"samples/{dest.name}"
                images.append(f"<figure><a href='{html.escape(src)}'><img src='{html.escape(src)}' width='220'></a>"
                              f"<figcaption>{g.name} (click for full size)</figcaption></figure>")
            if (g / "samples.txt").exists():
                raw = (g / "samples.txt").read_text(errors="replace")[:1500]
                text = printable(raw)
                odd |= text != raw or "\ufffd" in raw
                texts.append(f"<details><summary>{g.name}</summary><pre>{html.escape(text)}</pre></details>")
        if images or texts:
            parts.append(f"<h4>{html.escape(policy)} (seed {seed})</h4><div class='row'>{''.join(images)}</div>{''.join(texts)}")
    if odd:
        parts.insert(0, "<p class='caption'>In the texts, \ufffd marks bytes the model sampled that are not UTF-8 text "
                        "(a byte-level tokenizer can emit part of a character) and \\xNN a control character.</p>")
    return "".join(parts)


def add_family_figures(shown: list[Run], doc: Doc, out: Path) -> None:
    """The figures a family draws of its own runs (its `report_figures`), in a folder named after the run."""
    for r in shown:
        spec = family_extras(r.family)
        if spec is None or spec.report_figures is None:
            continue
        for title, png in spec.report_figures(r.path, out / r.slug):
            doc.heading(3, f"{r.label}: {title}")
            doc.figure(f"{r.slug}/{png}", title, f"Drawn by the {r.family_name} family from {r.path}.")


def add_samples(shown: list[Run], doc: Doc, out: Path) -> None:
    for r in shown:
        section = samples_section(r, out)
        if section:
            doc.html.append(f"<h3>samples: {html.escape(r.label)}</h3>{section}")
            doc.md += [f"### samples: {r.label}", "", "(in index.html)", ""]


# -- sections ------------------------------------------------------------------------------------------------


def primary_first(runs: list[Run], primary: str | None) -> list[str]:
    """Every metric of the runs, in the order they appear, the family's primary metric first."""
    return sorted(dict.fromkeys(m for r in runs for m in r.metrics()), key=lambda m: m != primary)


def sweep_section(sweep: SweepDir, doc: Doc, out: Path) -> None:
    """A sweep: its words, then per metric (the family's primary first) a faceted figure and a table of the cells."""
    family = sweep.runs[0].family
    metrics = primary_first(sweep.runs, primary_metric(family))
    over = ", ".join(sweep.short(k) for k in sweep.keys)
    doc.heading(2, f"{sweep.name}: a {table_name(family)} sweep over {over}")
    doc.para(f"Sweep directory {sweep.path}; a panel per cell.")
    intro(doc, family, sweep.runs, out)
    define(doc, family, metrics)
    for metric in metrics:
        png = f"{sweep.slug}-{slug(metric)}.png"
        plot_facets(sweep, metric, out / png)
        header, rows = sweep_table(sweep, metric)
        lo, hi = seed_counts([r.table(metric) for r in sweep.runs])
        doc.heading(3, metric)
        doc.figure(png, metric, band_phrase(lo, hi))
        key = numeric_axis(sweep)
        if key is not None:  # the last iteration against the swept number, too
            against = f"{sweep.slug}-{slug(metric)}-vs-{slug(sweep.short(key))}.png"
            plot_axis(sweep, key, metric, out / against)
            doc.figure(against, f"{metric} against {sweep.short(key)}", f"{metric} at each cell's last iteration against "
                       f"{sweep.short(key)}: mean and 95% interval per policy; the exact expectation dashed where there is one.")
        doc.table(f"{metric} at each cell's last iteration, {seeds_phrase(lo, hi)}", header, rows)
    add_samples(sweep.runs, doc, out)


def family_section(family: str, fruns: list[Run], doc: Doc, out: Path, figures: str) -> None:
    """Runs of one family outside any sweep: its words, the primary metric a panel per run with a table per
    run, then each run's other metrics."""
    primary = primary_metric(family)
    metrics = primary_first(fruns, primary)
    name = fruns[0].family_name  # files and headings: a family given as a path is named by its module
    doc.heading(2, f"{name}: {', '.join(r.label for r in fruns)}")
    intro(doc, family, fruns, out)
    define(doc, family, metrics)
    others = metrics[1:] if metrics and metrics[0] == primary else metrics
    if primary in metrics:
        shown = [r for r in fruns if primary in r.metrics()]
        png = f"{figures}-{slug(primary)}.png"
        plot_metric(shown, primary, out / png)
        lo, hi = seed_counts([r.table(primary) for r in shown])
        doc.heading(3, primary)
        doc.figure(png, primary, band_phrase(lo, hi))
        unit = unit_of(family, primary)
        for r in shown:
            header, rows = summary_table(r, primary)
            doc.table(f"{r.label}: {primary}{f' ({unit})' if unit else ''}, {seeds_phrase(*seed_counts([r.table(primary)]))}",
                      header, rows)
    for r in fruns:
        mine = [m for m in others if m in r.metrics()]
        if not mine:
            continue
        png = f"{r.slug}-metrics.png"
        plot_run_metrics(r, groups(family, mine), out / png)
        header, rows = final_table(r, mine)
        lo, hi = seed_counts([r.table(m) for m in mine])
        doc.heading(3, f"{r.label}: every other metric")
        doc.figure(png, f"{r.label}: every other metric", band_phrase(lo, hi))
        doc.table(f"{r.label}: each metric at the last iteration, {seeds_phrase(lo, hi)}", header, rows)
    add_family_figures(fruns, doc, out)
    add_samples(fruns, doc, out)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.row{display:flex;flex-wrap:wrap}"
         "figure{margin:4px}figcaption,.caption{font-size:13px;color:#444}pre{white-space:pre-wrap;font-size:12px}"
         ".claim{background:#eef4fb;padding:6px}.reference{background:#f6f6f6;padding:6px}")


def write_report(dirs: list[Path], out: Path) -> Path:
    out = paths.out_dir(out)
    runs = find_runs(dirs)
    if not any(r.n_rows for r in runs):
        raise BadInput("report: the run directories hold no metrics yet")
    paths.make_dir(out)
    family_slugs = name_runs(runs)
    doc = Doc()
    doc.heading(1, "modelcollapse report")
    doc.para(f"{len(runs)} run(s): {', '.join(str(r.path) for r in runs)}. Every section opens with the claim it "
             "tests, what its runs can show, and the metrics it draws; each run's config is one click away.")
    for sweep in dict.fromkeys(r.sweep for r in runs if r.sweep):
        sweep_section(sweep, doc, out)
    by_family: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.sweep is None:
            by_family[r.family].append(r)
    for family, fruns in by_family.items():
        family_section(family, fruns, doc, out, family_slugs[family])
    (out / "summary.md").write_text("\n".join(doc.md) + "\n", errors="backslashreplace")  # paths need not be UTF-8
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>modelcollapse report</title><style>{STYLE}</style>"
        f"</head><body>{''.join(doc.html)}</body></html>\n", errors="backslashreplace"
    )
    return out
