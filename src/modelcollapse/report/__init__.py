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

One concern a module: `runs` (run and sweep directories as data, `mean_ci`), `words` (the family's claim and
metric definitions as text), `figures`, `tables`, `doc` (index.html and summary.md side by side), `sections`
(a section per sweep and family, and `write_report`).
"""

from .figures import colors_for, draw_baselines, draw_panel, panels, save
from .runs import Run, mean_ci, theory_for
from .sections import write_report
from .words import groups, seeds_phrase

__all__ = ["Run", "colors_for", "draw_baselines", "draw_panel", "groups", "mean_ci", "panels", "save", "seeds_phrase",
           "theory_for", "write_report"]
