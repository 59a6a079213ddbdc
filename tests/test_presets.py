"""Every shipped preset (configs/<scale>/ and configs/sweeps/) is a valid config or sweep file, and the cheap
quick presets' headers state what they print."""

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


# The quick presets that run in seconds; the LM, VAE and conformer ones take minutes each and are checked by
# `python -m modelcollapse.testing.presets lm vae conformer`, with the same code.
CHEAP = ["gaussian.toml", "categorical.toml", "kde.toml", "linreg-fig7.toml", "linreg-loop.toml"]


@pytest.mark.parametrize("name", CHEAP)
def test_a_cheap_quick_presets_header_states_what_it_prints(name, tmp_path):
    """Every number a preset's header states is what its command prints at this commit (issue 15): rerun the
    preset (a sweep: the one cell the header quotes) and compare each figure the header states; a header with
    one figure changed is caught, naming both numbers."""
    from modelcollapse.testing.presets import QUICK, STATED, compare, header, rerun

    rows = rerun(name, tmp_path / "run")
    text = header(QUICK / name)
    assert compare(name, text, rows) == []
    figure = STATED[name].phrases[0].figures[0]
    true = figure.printed(rows)
    wrong = true.replace(true[0], "7" if true[0] != "7" else "8", 1)
    [line] = compare(name, text.replace(true, wrong, 1), rows)
    assert line == f"{name}: {figure.describe()}: the header states {wrong}, this run prints {true}"
