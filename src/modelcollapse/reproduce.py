"""The paper end to end at one scale: run every preset in configs/<scale>/, then one report over them all."""

from __future__ import annotations

import sys
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


def say(message: str) -> None:
    """A block's header on stderr, where the loop's progress goes, so that a reader knows what runs."""
    print(message, file=sys.stderr, flush=True)


def describe(plan) -> str:
    """What a preset runs: policies x seeds x iterations, or a sweep's cells."""
    if isinstance(plan, configlib.ExperimentConfig):
        return f"{', '.join(plan.labels())}; {len(plan.seeds)} seed(s) x {plan.iterations} iterations"
    name, cells = plan
    return f"sweep {name}: {len(cells)} cells"


def reproduce(scale: str, only: list[str] | None, out: Path, track: str | None = None) -> Path:
    from modelcollapse.loop import run_experiment
    from modelcollapse.report import write_report

    out = Path(out)
    chosen = presets(scale, only)
    plans = []  # validate every preset before running any
    for path, _ in chosen:
        raw = configlib.read_toml(path)
        plans.append((path, load_sweep(path) if is_sweep(raw) else configlib.load(path)))
    failed = []
    for i, ((path, family), (_, plan)) in enumerate(zip(chosen, plans), 1):
        say(f"=== {family} ({i}/{len(plans)}): {scale}/{path.name}, {describe(plan)} -> {out / path.stem}")
        if isinstance(plan, configlib.ExperimentConfig):
            run_experiment(plan, out / path.stem, track=track)
        else:
            failed += [c.name for c, status in run_sweep(path, out / path.stem, track=track) if status != "done"]
    say(f"=== report of {len(chosen)} preset(s) -> {out / 'report'}")
    report = write_report([out / p.stem for p, _ in chosen], out / "report")
    if failed:
        raise RuntimeError(f"reproduce: sweep cells failed: {', '.join(failed)}")
    return report
