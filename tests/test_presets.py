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
