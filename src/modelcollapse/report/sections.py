"""A report's sections, and the report: a section per sweep and per family of the runs outside sweeps, each
opening with its words and a link to each run's config, then its figures and tables, then the family's own
figures and the samples that generations saved."""

from __future__ import annotations

import html
import shutil
from collections import defaultdict
from pathlib import Path

import tomli_w

from modelcollapse import paths
from modelcollapse.errors import BadInput
from modelcollapse.families import table_name

from .doc import Doc, printable
from .figures import band_phrase, numeric_axis, plot_axis, plot_facets, plot_metric, plot_run_metrics
from .runs import Run, SweepDir, family_extras, find_runs, name_runs, primary_metric, slug
from .tables import final_table, paired_table, summary_table, sweep_table
from .words import claim_of, describe, groups, min_iterations, run_facts, seed_counts, seeds_phrase, unit_of


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
            pairs = paired_table(r, [primary, *(m for m in others if m in r.metrics())])
            if pairs:
                doc.table(f"{r.label}: changes and differences paired by seed (the same seeds under every policy), mean ± "
                          f"95% CI; an interval that excludes 0 is a difference beyond seed-to-seed noise", *pairs)
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
    doc.write(out)
    return out
