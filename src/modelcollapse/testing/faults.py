"""Fault injection: kill, interrupt and damage real runs at random moments, resume them, and check that they
end exactly as an uninterrupted run does.

    python -m modelcollapse.testing.faults --rounds 30 --families linreg,lm,vae --out /tmp/faults

For each family, a small config is run once uninterrupted (the reference). Then each round starts
`modelcollapse run` on a fresh directory and, until the run finishes, waits a random time and does one of:
kill -9, Ctrl-C (SIGINT) or SIGTERM to the process, or kill -9 followed by damage to a random file the run
wrote (truncated to a random length, or a random stretch of it overwritten) — then runs the same command
again, as a user would. A resumed run must either go on, or refuse in one line naming a damaged file and the
generation to move away, which the harness then does, as the message says. A round passes when the run ends
(exit 0) with a metrics.jsonl byte-identical to the reference's; any traceback, other exit code or differing
table fails it. The manifest and the lock are spared: damaged by hand, a manifest is refused for good
(tested on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

CONFIGS = {
    "linreg": {"name": "faults-linreg", "family": "linreg", "iterations": 5, "seeds": 12,
               "policies": ["replace", "accumulate", {"name": "mix", "real_fraction": 0.5}],
               "linreg": {"d": 3, "T": 12, "method": "loop"}},
    "lm": {"name": "faults-lm", "family": "lm", "iterations": 2, "seeds": 1, "device": "cpu", "policies": ["replace", "accumulate"],
           "lm": {"max_train_stories": 40, "test_stories": 10, "vocab_size": 512, "model": "llama2-tiny", "block_size": 64,
                  "batch_size": 8, "lr": 5e-3, "epochs": 2, "max_sample_len": 64, "sample_batch": 16, "eval_samples": 20,
                  "shard_tokens": 1024, "checkpoint_every": 3}},
    "vae": {"name": "faults-vae", "family": "vae", "iterations": 2, "seeds": 1, "device": "cpu", "policies": ["replace", "accumulate"],
            "vae": {"dataset": "digits", "channels": [8, 16], "latent_dim": 4, "epochs": 3, "batch_size": 64,
                    "classifier_steps": 50, "eval_samples": 100}},
}
FAULTS = ("kill", "sigint", "sigterm", "damage")
MOVE = re.compile(r"move (\S+) and the later generations of its chain out of the run directory")


@dataclass
class Round:
    family: str
    faults: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    outcome: str = "pending"  # identical | differs | crashed
    detail: str = ""


def command(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(out)]


def damage(out: Path, rng: random.Random) -> str:
    """Truncate or garble one random file the run wrote (not its manifest or lock); say which and how."""
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", ".lock") and p.stat().st_size]
    if not files:
        return "damage: nothing written yet"
    path = rng.choice(sorted(files))
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"damage: truncated {path.relative_to(out)} to {cut} of {len(data)} bytes"
    start = rng.randrange(len(data))
    stop = min(len(data), start + rng.randint(1, 64))
    data[start:stop] = bytes(rng.randrange(256) for _ in range(stop - start))
    path.write_bytes(bytes(data))
    return f"damage: garbled bytes {start}-{stop} of {path.relative_to(out)}"


def move_away(out: Path, unit: Path, quarantine: Path) -> str:
    """What the refusal asks: move the named generation and the later ones of its chain out of DIR."""
    unit = Path(unit)
    chain, n = unit.parent, int(unit.name.split("-")[1])
    moved = []
    for gen in sorted(chain.glob("gen-*"), key=lambda p: int(p.name.split("-")[1])):
        if int(gen.name.split("-")[1]) >= n:
            dest = quarantine / f"{len(list(quarantine.glob('*')))}-{gen.relative_to(out).as_posix().replace('/', '_')}"
            shutil.move(str(gen), dest)
            moved.append(gen.relative_to(out).as_posix())
    return ", ".join(moved)


def one_round(family: str, cfg: Path, reference: bytes, duration: float, out: Path, rng: random.Random, max_faults: int = 6) -> Round:
    """Run, fault, resume ... until the run ends; then compare its metrics.jsonl with the reference."""
    rnd = Round(family)
    quarantine = out.with_name(out.name + "-moved")
    quarantine.mkdir(parents=True, exist_ok=True)
    for attempt in range(max_faults + 20):
        proc = subprocess.Popen(command(cfg, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fault = rng.choice(FAULTS) if len(rnd.faults) < max_faults else None
        if fault is not None:
            try:
                proc.wait(timeout=rng.uniform(0.3, 1.0) * duration)  # most of a small run's first second is imports
            except subprocess.TimeoutExpired:
                proc.send_signal({"kill": signal.SIGKILL, "damage": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[fault])
                rnd.faults.append(fault)
        _, err = proc.communicate(timeout=3600)
        if fault == "damage" and rnd.faults and rnd.faults[-1] == "damage":
            rnd.faults[-1] = damage(out, rng)
        if "Traceback" in err:
            rnd.outcome, rnd.detail = "crashed", err.strip().splitlines()[-1]
            return rnd
        if proc.returncode == 0:
            same = (out / "metrics.jsonl").read_bytes() == reference
            rnd.outcome = "identical" if same else "differs"
            return rnd
        if proc.returncode == 2:
            lines = err.strip().splitlines()
            found = MOVE.search(err)
            if len(lines) != 1 or found is None:
                rnd.outcome, rnd.detail = "crashed", f"exit 2 without a way out: {err.strip()}"
                return rnd
            rnd.moved.append(move_away(out, Path(found.group(1)), quarantine))
            continue
        if proc.returncode in (-signal.SIGKILL, 130, 143, -signal.SIGTERM, -signal.SIGINT):
            continue  # the fault it was sent
        rnd.outcome, rnd.detail = "crashed", f"exit {proc.returncode}: {err.strip()[-500:]}"
        return rnd
    rnd.outcome, rnd.detail = "crashed", "did not finish"
    return rnd


def run(families: list[str], rounds: int, out: Path, seed: int = 0, log=print, max_faults: int = 6) -> list[Round]:
    """`rounds` rounds per family, each of up to `max_faults` faults; returns every round (module docstring)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for family in families:
        cfg = out / f"{family}.toml"
        cfg.write_text(tomli_w.dumps(CONFIGS[family]))
        t0 = time.perf_counter()
        ref = subprocess.run(command(cfg, out / f"{family}-reference"), capture_output=True, text=True)
        if ref.returncode != 0:
            raise RuntimeError(f"the reference {family} run failed: {ref.stderr.strip()[-500:]}")
        duration = time.perf_counter() - t0
        reference = (out / f"{family}-reference" / "metrics.jsonl").read_bytes()
        for i in range(rounds):
            rnd = one_round(family, cfg, reference, duration, out / f"{family}-{i}", rng, max_faults)
            results.append(rnd)
            log(json.dumps({"family": rnd.family, "round": i, "outcome": rnd.outcome, "faults": rnd.faults,
                            "moved": rnd.moved, "detail": rnd.detail}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per family")
    parser.add_argument("--families", default="linreg,lm,vae", help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--out", type=Path, required=True, help="a folder for the runs (made if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the faults' times and kinds")
    args = parser.parse_args()
    results = run(args.families.split(","), args.rounds, args.out, args.seed)
    bad = [r for r in results if r.outcome != "identical"]
    counts = {f: sum(len(r.faults) for r in results if r.family == f) for f in {r.family for r in results}}
    print(f"{len(results) - len(bad)}/{len(results)} rounds identical to the uninterrupted run; faults per family: {counts}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
