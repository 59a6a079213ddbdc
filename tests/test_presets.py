"""Every shipped preset (configs/<scale>/ and configs/sweeps/) is a valid config or sweep file."""

from pathlib import Path

import pytest

from modelcollapse import config as configlib
from modelcollapse.sweep import is_sweep, load_sweep

CONFIGS = Path(configlib.__file__).parent / "configs"
PRESETS = sorted(CONFIGS.glob("*/*.toml"))


def test_every_scale_has_presets():
    assert {p.parent.name for p in PRESETS} == {"quick", "cpu", "paper", "sweeps"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_loads(path):
    if is_sweep(configlib.read_toml(path)):
        assert load_sweep(path)[1]
    else:
        assert configlib.load(path).iterations >= 1


def header(path: Path) -> str:
    """A preset's opening comment as one line (a number may sit at a line's end)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


# The cheap quick presets (seconds each) and the numbers their headers state: (metric, policy) at the last
# iteration, printed as the header prints them — the mean to `digits` significant digits, trailing zeros kept,
# then "± " and the 95% t-interval's half-width to two ("ci"), or the mean alone.
STATED = {
    "gaussian.toml": (None, [("trace_ratio", p, 3, "ci") for p in ("replace", "accumulate", "accumulate-subsample")]),
    "categorical.toml": (None, [("gini_simpson", p, 3, "ci") for p in ("replace", "accumulate", "accumulate-subsample")]
                         + [("lost", p, 4, "mean") for p in ("replace", "accumulate", "accumulate-subsample")]),
    "kde.toml": ({"kde.dataset": "moons"}, [("test_nll", p, 3, "ci") for p in ("replace", "accumulate", "accumulate-subsample")]),
}


@pytest.mark.parametrize("name", sorted(STATED))
def test_a_cheap_quick_presets_header_states_what_it_prints(name, tmp_path):
    """Every number a preset's header states is what its command prints at this commit (issue 15): rerun the
    preset (a sweep: the one cell the header quotes) and find each number, formatted, in the header."""
    from modelcollapse.loop import run_experiment
    from modelcollapse.report import mean_ci
    from modelcollapse.store import read_metrics

    path = CONFIGS / "quick" / name
    cell, stated = STATED[name]
    raw = configlib.read_toml(path)
    if is_sweep(raw):
        [raw] = [c.raw for c in load_sweep(path)[1] if all(c.overrides.get(k) == v for k, v in cell.items())]
    run = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(run)
    last = max(r["iteration"] for r in rows)
    text = header(path)
    for metric, policy, digits, form in stated:
        m, h = mean_ci([r["value"] for r in rows if (r["metric"], r["policy"], r["iteration"]) == (metric, policy, last)])
        printed = f"{m:#.{digits}g}" + (f" ± {h:#.2g}" if form == "ci" else "")
        assert printed in text, f"{name}: {metric} {policy} at iteration {last} is {printed}, which its header does not state"
