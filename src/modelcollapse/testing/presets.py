"""Do the quick presets' headers state what their commands print? (issue 15)

    python -m modelcollapse.testing.presets lm vae conformer    # names of configs/quick/ presets; none: all of STATED

A quick preset's header states figures of its run: a metric of a policy at an iteration, either the mean over
seeds (to `digits` significant digits, trailing zeros kept) or the mean ± the half-width of its 95% t-interval
(two digits), as the report prints them. STATED holds, per preset, the phrases of its header that carry figures,
with a `{}` where each figure stands, and the figures in that order. The checker reruns each named preset into
a temporary directory (one thread, as `modelcollapse reproduce` runs it; a sweep: the one cell its header
quotes), reads the number at each `{}` of the header and compares it with the run's, formatted alike. It prints
a line per mismatch and exits 1, or exits 0 when every figure matches. tests/test_presets.py runs the cheap
presets (seconds each) through the same code; the LM, VAE and conformer ones take minutes, so run this before
changing what they print.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from modelcollapse import config as configlib

QUICK = Path(configlib.__file__).parent / "configs" / "quick"
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"


@dataclass(frozen=True)
class Figure:
    """A metric of a policy at an iteration, as a header states it."""

    metric: str
    policy: str
    iteration: int
    digits: int = 3
    ci: bool = False  # mean ± 95% CI half-width, else the mean alone

    def pattern(self) -> str:
        return f"({NUMBER} ± {NUMBER})" if self.ci else f"({NUMBER})"

    def printed(self, rows: list[dict]) -> str:
        """The run's figure, formatted as the header states it."""
        from modelcollapse.report import mean_ci

        values = [r["value"] for r in rows if (r["metric"], r["policy"], r["iteration"]) == (self.metric, self.policy, self.iteration)]
        if not values:
            return "nothing"
        m, h = mean_ci(values)
        return significant(m, self.digits) + (f" ± {significant(h, 2)}" if self.ci else "")

    def describe(self) -> str:
        return f"{self.metric} of {self.policy} at iteration {self.iteration}"


def significant(x: float, digits: int) -> str:
    """`digits` significant digits, trailing zeros kept (0.890, 0.0019), no bare trailing point (140, not 140.)."""
    return f"{x:#.{digits}g}".rstrip(".")


@dataclass(frozen=True)
class Phrase:
    """Words of a header with a `{}` where each figure stands (line breaks and runs of spaces read as one space)."""

    text: str
    figures: tuple[Figure, ...]

    def pattern(self) -> str:
        """The phrase as a regular expression with a group where each figure stands."""
        words = [re.escape(w) for w in " ".join(self.text.split()).split("{}")]
        return words[0] + "".join(f.pattern() + w for f, w in zip(self.figures, words[1:]))


@dataclass(frozen=True)
class Stated:
    phrases: tuple[Phrase, ...]
    cell: dict | None = None  # a sweep: the overrides of the one cell its header quotes


def chain(metric: str, policy: str, iterations: range, digits: int) -> tuple[Figure, ...]:
    """The means of one metric and policy over consecutive iterations (one seed: "5.168 → 5.601 → 5.662")."""
    return tuple(Figure(metric, policy, i, digits) for i in iterations)


_THREE = ("replace", "accumulate", "accumulate-subsample")
STATED = {
    "gaussian.toml": Stated((
        Phrase("trace_ratio at iteration 40 is {} (exact 0.446) for replace, {} (0.968) for accumulate and {} (0.944) "
               "for accumulate-subsample", tuple(Figure("trace_ratio", p, 40, 3, ci=True) for p in _THREE)),
    )),
    "categorical.toml": Stated((
        Phrase("at iteration 30, gini_simpson {} (exact 0.502) · {} (0.890) · {} (0.869)",
               tuple(Figure("gini_simpson", p, 30, 3, ci=True) for p in _THREE)),
        Phrase("lost outcomes {} (46.87) · {} (27.71, its iteration-1 value) · {} (35.17)",
               tuple(Figure("lost", p, 30, 4) for p in _THREE)),
    )),
    "kde.toml": Stated((
        Phrase("on moons at iteration 20, {}, {} and {} nats", tuple(Figure("test_nll", p, 20, 3, ci=True) for p in _THREE)),
    ), cell={"kde.dataset": "moons"}),
    "linreg-fig7.toml": Stated((
        Phrase("at T = 50 and iteration 20, test_error {} (exact 5.13) for replace, {} (0.409) for accumulate and {} (0.922) "
               "for replace-grown", tuple(Figure("test_error", p, 20, 3, ci=True) for p in ("replace", "accumulate", "replace-grown"))),
    ), cell={"linreg.T": 50}),
    "linreg-loop.toml": Stated((
        Phrase("From {} at iteration 1", (Figure("test_error", "replace", 1, 3, ci=True),)),
        Phrase("test_error at iteration 8 is {} (exact 2.05) for replace, {} (0.392) for accumulate, {} (0.697) for "
               "replace-grown, {} for accumulate-subsample, {} for mix-0.5 and {} for fresh-0.5",
               tuple(Figure("test_error", p, 8, 3, ci=True)
                     for p in ("replace", "accumulate", "replace-grown", "accumulate-subsample", "mix-0.5", "fresh-0.5"))),
    )),
    "lm.toml": Stated((
        Phrase("replace rises {} → {} → {}", chain("test_ce", "replace", range(1, 4), 4)),
        Phrase("accumulate stays below iteration 1, {} → {} → {}", chain("test_ce", "accumulate", range(1, 4), 4)),
    )),
    "vae.toml": Stated((
        Phrase("replace's test_nelbo {} → {} → {} nats", chain("test_nelbo", "replace", range(1, 4), 3)),
        Phrase("its recall {} → {} → {}", chain("recall", "replace", range(1, 4), 2)),
        Phrase("accumulate's test_nelbo {} → {} → {}", chain("test_nelbo", "accumulate", range(1, 4), 3)),
    )),
    "conformer.toml": Stated((
        *(Phrase(f"{metric} replace {{}} / {{}} / {{}}, accumulate {{}} / {{}} / {{}}",
                 chain(metric, "replace", range(1, 4), 3) + chain(metric, "accumulate", range(1, 4), 3))
          for metric in ("test_loss", "rdkit_valid_frac")),
    )),
}


def header(path: Path) -> str:
    """A preset's opening comment as one line with single spaces (a number may sit at a line's end)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return " ".join(" ".join(lines).split())


def compare(name: str, text: str, rows: list[dict]) -> list[str]:
    """A line per figure of STATED[name] that the header `text` states differently from the run's `rows`."""
    lines = []
    for phrase in STATED[name].phrases:
        found = re.search(phrase.pattern(), text)
        if found is None:
            said = phrase.text.format(*(f.printed(rows) for f in phrase.figures))
            lines.append(f"{name}: the header lacks the phrase {phrase.text!r}; this run prints {said!r}")
            continue
        for figure, stated in zip(phrase.figures, found.groups()):
            if stated != (printed := figure.printed(rows)):
                lines.append(f"{name}: {figure.describe()}: the header states {stated}, this run prints {printed}")
    return lines


def rerun(name: str, out: Path, progress: bool = False) -> list[dict]:
    """Run the quick preset `name` (a sweep: its stated cell) into `out`; its metric rows."""
    from modelcollapse.loop import run_experiment
    from modelcollapse.store import read_metrics
    from modelcollapse.sweep import is_sweep, load_sweep

    path = QUICK / name
    if is_sweep(configlib.read_toml(path)):
        cell = STATED[name].cell
        [cfg] = [configlib.from_dict(c.raw) for c in load_sweep(path)[1] if all(c.overrides.get(k) == v for k, v in cell.items())]
    else:
        cfg = configlib.load(path)
    return read_metrics(run_experiment(cfg, out, progress=progress))


def main(argv: list[str] | None = None) -> int:
    from modelcollapse.procs import set_threads

    parser = argparse.ArgumentParser(prog="python -m modelcollapse.testing.presets", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"quick presets to check (default: {', '.join(s[:-5] for s in STATED)})")
    args = parser.parse_args(argv)
    names = [n if n.endswith(".toml") else f"{n}.toml" for n in args.names] or list(STATED)
    unknown = [n for n in names if n not in STATED]
    if unknown:
        parser.error(f"no stated figures for {', '.join(unknown)}; have {', '.join(STATED)}")
    set_threads(1)  # as the headers were measured; more threads may change the last digits
    mismatches = []
    for name in names:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            rows = rerun(name, Path(tmp) / "run", progress=True)
        found = compare(name, header(QUICK / name), rows)
        print(f"{name}: {'as stated' if not found else 'differs'} ({time.monotonic() - start:.0f} s)", flush=True)
        for line in found:
            print(line, flush=True)
        mismatches += found
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
