"""The paper end to end at one scale: run every preset in configs/<scale>/, then one report over them all."""

from __future__ import annotations

from pathlib import Path

from modelcollapse import config as configlib
from modelcollapse.errors import BadInput
from modelcollapse.sweep import is_sweep, load_sweep, run_sweep, sweep_base

CONFIGS = Path(__file__).parent / "configs"


def presets(scale: str, only: list[str] | None) -> list[tuple[Path, str]]:
    """(preset file, family) for every preset of the scale, optionally only some families."""
    found = []
    for path in sorted((CONFIGS / scale).glob("*.toml")):
        raw = configlib.read_toml(path)
        found.append((path, (sweep_base(path, raw) if is_sweep(raw) else raw).get("family")))
    if only:
        unknown = set(only) - {f for _, f in found}
        if unknown:
            raise BadInput(f"--only: no {scale} preset for {', '.join(sorted(unknown))}; have {', '.join(sorted({f for _, f in found if f}))}")
        found = [(p, f) for p, f in found if f in only]
    return found


def reproduce(scale: str, only: list[str] | None, out: Path) -> Path:
    from modelcollapse.loop import run_experiment
    from modelcollapse.report import write_report

    out = Path(out)
    chosen = presets(scale, only)
    plans = []  # validate every preset before running any
    for path, _ in chosen:
        raw = configlib.read_toml(path)
        plans.append((path, load_sweep(path) if is_sweep(raw) else configlib.load(path)))
    failed = []
    for path, plan in plans:
        if isinstance(plan, configlib.ExperimentConfig):
            run_experiment(plan, out / path.stem)
        else:
            failed += [c.name for c, status in run_sweep(path, out / path.stem) if status != "done"]
    report = write_report([out / p.stem for p, _ in chosen], out / "report")
    if failed:
        raise RuntimeError(f"reproduce: sweep cells failed: {', '.join(failed)}")
    return report
