"""The one generational loop, for every family.

    real = family.real_data("train"); test = family.real_data("test"); pool = [real]
    for n in 1..N:
        train = training_set(policy, n, pool)        # what generation n trains on
        model = family.fit(train)                    # a fresh model every generation
        record(n, family.evaluate(model, test))      # metrics on real held-out data
        pool.append(family.sample(model, ...))       # what generation n + 1 may train on

Each (policy, seed) chain runs generation by generation; each finished generation is a unit in the run
directory, so a killed run resumes from the last finished one. Generation 1 is fit on real data whatever the
policy, so its seeds do not depend on the policy and its model is fit once and shared by every policy.

Data-parallel (distributed.py): every rank runs this same loop and reads the same run directory, so all take
the same decisions; rank 0 alone writes it (a `RunView` on the others), and a barrier closes each generation,
so the others read what rank 0 wrote only once it is there.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from modelcollapse import distributed
from modelcollapse.config import ExperimentConfig, PolicySpec, family_module, resolve_device
from modelcollapse.policies import synthetic_size, training_set
from modelcollapse.seeding import stream_seed
from modelcollapse.store import RunDir, RunView, atomic_save_npy, atomic_write_json

SHARED = "*"  # the policy key of generation 1's streams, which every policy shares


def cache_dir() -> Path:
    return Path(os.environ.get("MODELCOLLAPSE_CACHE", Path.home() / ".cache" / "modelcollapse"))


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM), so each generation's
    resources.json shows its own peak, not the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident memory since the last reset, in MiB (None where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def make_family(cfg: ExperimentConfig, device: str):
    return family_module(cfg.family).Family(cfg.family_config, device=device, cache_dir=cache_dir())


def run_experiment(cfg: ExperimentConfig, out: Path, progress: bool | None = None) -> Path:
    """Run (or resume) every policy and seed of `cfg` into the run directory `out` (as one rank of a
    data-parallel run when torchrun started this process)."""
    out = Path(out)
    with distributed.process_group(resolve_device(cfg.device)) as device:
        with distributed.writer_first():  # rank 0 finds bad input and fills the caches; then the others read them
            distributed.check_world(cfg, distributed.world_size())
            RunDir.check(out, cfg.hash())  # refuse a foreign DIR before anything is built or written
            family = make_family(cfg, device)
            family.real_data("train", cfg.seeds[0])  # bad data files fail here, before anything is written
            family.real_data("test", cfg.seeds[0])
            if any(p.name == "fresh" for p in cfg.policies) and cfg.iterations > 1:
                family.real_data("train", cfg.seeds[0], draw=cfg.iterations - 1)  # DataUnavailable if it has too little
        fast = set(getattr(family, "fast_policies", tuple)())
        created = not out.exists()
        try:
            with (RunDir if distributed.is_writer() else RunView)(out, cfg.resolved(), cfg.hash()) as store:
                store.reset_metrics(finished_rows(store, cfg, fast))
                units = sum(1 if p.name in fast else len(cfg.seeds) * cfg.iterations for p in cfg.policies)
                quiet = progress is False or not distributed.is_writer()
                bar = tqdm(total=units, desc=cfg.name, unit="gen", disable=True if quiet else None)
                for policy in cfg.policies:
                    if policy.name in fast:
                        run_fast(family, store, policy, cfg, bar)
                        continue
                    for seed in cfg.seeds:
                        run_chain(family, store, cfg, policy, seed, bar)
                bar.close()
        except BaseException:
            if created and distributed.is_writer() and not any(out.glob("*/**/metrics.json")):
                shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave no half-made DIR behind
            raise
    return out


def finished_rows(store: RunDir, cfg: ExperimentConfig, fast: set[str]) -> list[dict]:
    """Rows of every finished unit, in the order an uninterrupted run writes them."""
    rows = []
    for policy in cfg.policies:
        if policy.name in fast:
            rows += store.finished(store.path / policy.label / "fast") or []
            continue
        for seed in cfg.seeds:
            for n in range(1, cfg.iterations + 1):
                done = store.finished(store.gen_dir(policy.label, seed, n))
                if done is None:
                    break
                rows += done
    return rows


def run_chain(family, store: RunDir, cfg: ExperimentConfig, policy: PolicySpec, seed: int, bar) -> None:
    N = cfg.iterations
    if store.finished(store.gen_dir(policy.label, seed, N)) is not None:
        bar.update(N)
        return
    real = family.real_data("train", seed)
    test = family.real_data("test", seed)
    pool = [real]
    for n in range(1, N + 1):
        gen_dir = store.gen_dir(policy.label, seed, n)
        if store.finished(gen_dir) is not None:  # resume: reopen what this generation sampled
            if n < N:
                pool.append(family.load_sample(gen_dir))
            bar.update(1)
            continue
        if store.writer:
            gen_dir.mkdir(parents=True, exist_ok=True)
        key = SHARED if n == 1 else policy.label

        def seed_for(purpose: str, generation: int = n) -> int:
            return stream_seed(seed, key if generation == n else policy.label, generation, purpose)

        t0 = time.perf_counter()
        reset_peak_rss()
        train = training_set(
            policy, n, pool, family, seed_for("policy"), fresh_real=lambda: family.real_data("train", seed, draw=n - 1)
        )
        model = shared_first_model(family, store, cfg, policy, seed) if n == 1 else None
        if model is None:
            model = family.fit(train, seed_for("fit"), gen_dir)
        if store.writer:
            family.save_model(model, gen_dir)
        metrics = family.evaluate(model, test, seed_for("evaluate"), gen_dir)
        if n < N:
            size = synthetic_size(policy, n + 1, family.size(real))
            pool.append(family.sample(model, size, real, seed_for("sample", n + 1), gen_dir))
        rows = [dict(policy=policy.label, seed=seed, iteration=n, metric=k, value=float(v)) for k, v in metrics.items()]
        if store.writer:  # peak memory is rank 0's
            resources = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": peak_rss_mb(), "processes": distributed.world_size()}
            atomic_write_json(gen_dir / "resources.json", resources)
        store.finish(gen_dir, rows)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        line = f"{policy.label} seed {seed} gen {n}/{N}: {shown} ({time.perf_counter() - t0:.1f}s)"
        store.log(line)
        bar.update(1)
        if time.perf_counter() - t0 >= 1.0 and store.writer:  # slow generations are news; thousands of fast ones are noise
            bar.write(line, file=sys.stderr)
        distributed.barrier()  # the other ranks see this generation finished (and its model) before they go on


def shared_first_model(family, store: RunDir, cfg: ExperimentConfig, policy: PolicySpec, seed: int):
    """Generation 1 is the same fit for every policy: reuse an earlier policy's, if one is saved."""
    for other in cfg.policies:
        if other == policy:
            return None
        other_dir = store.gen_dir(other.label, seed, 1)
        if store.finished(other_dir) is not None:
            return family.load_model(other_dir)
    return None


def run_fast(family, store: RunDir, policy: PolicySpec, cfg: ExperimentConfig, bar) -> None:
    """A family's vectorised path: every seed of one policy at once, as one unit of the run directory."""
    unit = store.path / policy.label / "fast"
    if store.finished(unit) is None:
        t0 = time.perf_counter()
        W, metrics = family.run_fast(policy.name, cfg.seeds, cfg.iterations)
        unit.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(unit / "w_hat.npy", W)
        rows = [
            dict(policy=policy.label, seed=seed, iteration=n + 1, metric=k, value=float(v[i, n]))
            for i, seed in enumerate(cfg.seeds)
            for n in range(cfg.iterations)
            for k, v in metrics.items()
        ]
        store.finish(unit, rows)
        means = " ".join(f"{k}={np.mean(v[:, -1]):.4g}" for k, v in metrics.items())
        store.log(f"{policy.label}: {len(cfg.seeds)} seeds x {cfg.iterations} iterations, last mean {means} ({time.perf_counter() - t0:.2f}s)")
    bar.update(1)
