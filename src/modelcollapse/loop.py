"""The one generational loop, for every family.

    real = family.real_data("train"); test = family.real_data("test"); pool = [real]
    for n in 1..N:
        train = policy.training_set(n, pool)         # what generation n trains on
        model = family.fit(train)                    # a fresh model every generation
        record(n, family.evaluate(model, test))      # metrics on real held-out data
        pool.append(family.sample(model, ...))       # what generation n + 1 may train on

Each (policy, seed) chain runs generation by generation; each finished generation is a unit in the run
directory, so a killed run resumes from the last finished one. Generation 1 is fit on real data whatever the
policy, so its seeds do not depend on the policy and its model is fit once and shared by every policy.
A vectorised family (families/__init__.py) runs the same loop once for every seed of a policy at once, the
whole chain one unit, its metric rows streamed out generation by generation.

Data-parallel (distributed.py): every rank runs this same loop and reads the same run directory, so all take
the same decisions; rank 0 alone writes it (a `RunView` on the others), and a barrier closes each generation,
so the others read what rank 0 wrote only once it is there.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from modelcollapse import distributed, procs
from modelcollapse.config import ExperimentConfig, resolve_device
from modelcollapse.errors import BadInput, RunFailed
from modelcollapse.families import common
from modelcollapse.policies import Policy
from modelcollapse.seeding import stream_keys, stream_seed
from modelcollapse.selection import reopen, synthesize
from modelcollapse.store import RunDir, RunView, atomic_write_json, batch_lines
from modelcollapse.tracking import Tracker

SHARED = "*"  # the policy key of generation 1's streams, which every policy shares


class ChainStopped(RunFailed):
    """A chain's metrics came out non-finite: its later generations would train on a broken model's data."""


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
    return cfg.family_module.build(cfg.family_config, device, common.cache_dir())


def seed_arg(family, seeds: list[int]):
    """What a family call takes for these base seeds: an array for a batched family, else the one int."""
    return np.asarray(seeds, dtype=np.int64) if getattr(family, "batched", False) else seeds[0]


def stream(family, seeds: list[int], policy: str, generation: int, purpose: str):
    """The stream seed(s) of a family call: one int, or a batched family's key per seed."""
    if getattr(family, "batched", False):
        return stream_keys(seeds, policy, generation, purpose)
    return stream_seed(seeds[0], policy, generation, purpose)


def continues(family) -> bool:
    """Whether the family's fit takes `previous` (the previous generation's folder: a model that continues
    from its predecessor's weights, e.g. iterative fine-tuning)."""
    return "previous" in inspect.signature(family.fit).parameters


def vectorised(family) -> bool:
    return bool(getattr(family, "batched", False) and getattr(family, "vectorised", False))


def run_experiment(cfg: ExperimentConfig, out: Path, progress: bool | None = None, track: str | None = None) -> Path:
    """Run (or resume) every policy and seed of `cfg` into the run directory `out` (as one rank of a
    data-parallel run when torchrun started this process), logging to the tracking tool `track` if given."""
    out = Path(out)
    with distributed.process_group(resolve_device(cfg.device)) as device:
        with distributed.writer_first():  # rank 0 finds bad input and fills the caches; then the others read them
            distributed.check_world(cfg, distributed.world_size())
            RunDir.check(out, cfg.hash())  # refuse a foreign DIR before anything is built or written
            family = make_family(cfg, device)
            check_memory(cfg, vectorised(family))
            first = seed_arg(family, cfg.seeds[:1])
            family.real_data("train", first)  # bad data files fail here, before anything is written
            family.real_data("test", first)
            if any(p.fresh_real for p in cfg.policies) and cfg.iterations > 1:
                family.real_data("train", first, draw=cfg.iterations - 1)  # DataUnavailable if it has too little
        store_type = RunDir if distributed.is_writer() else RunView
        with store_type(out, cfg.resolved(), cfg.hash(), cfg.labels()) as store:
            resumed = finished_rows(store, cfg, family)
            store.reset_metrics(resumed)
            with Tracker(track if distributed.is_writer() else None, store, cfg) as tracker:
                tracker.rows(resumed)  # what finished before (a resumed run), unless it was logged then
                quiet = progress is False or not distributed.is_writer()
                bar = progress_bar(len(cfg.policies) * cfg.iterations * len(cfg.seeds), cfg.name, quiet)
                stopped = []

                def stops(e: ChainStopped) -> None:
                    store.log(str(e))
                    bar.write(str(e), file=sys.stderr)
                    stopped.append(str(e))

                from modelcollapse import parallel

                workers = min(procs.threads(), len(seed_groups(cfg.seeds)) if vectorised(family) else len(cfg.policies) * len(cfg.seeds))
                split = workers > 1 and parallel.available() and (vectorised(family) or splits_chains(device))
                if split:
                    bar.set_description(f"{cfg.name}: {len(cfg.policies)} policies on {workers} processes", refresh=False)
                    (parallel.run_split if vectorised(family) else parallel.run_chains)(family, store, cfg, workers, bar, tracker, stops)
                else:
                    for policy in cfg.policies:
                        bar.set_description(f"{cfg.name}: {policy.label}", refresh=False)
                        chains = [cfg.seeds] if vectorised(family) else [[s] for s in cfg.seeds]
                        for seeds in chains:
                            try:
                                (run_batch if vectorised(family) else run_chain)(family, store, cfg, policy, seeds, bar, tracker)
                            except ChainStopped as e:
                                stops(e)
                bar.close()
                if stopped:
                    raise ChainStopped(f"{len(stopped)} chain(s) stopped on non-finite metrics; the first: {stopped[0]}")
            if (resumed or (split and not vectorised(family))) and store.appended:  # resumed units come after later ones, split chains' as they end
                store.reset_metrics(finished_rows(store, cfg, family))
    return out


def splits_chains(device: str) -> bool:
    """Whether the generic loop's chains may run in worker processes: on the CPU, in a run of one process (a
    GPU is shared by one process's chains; a data-parallel run's ranks already use the cores)."""
    return str(device).startswith("cpu") and distributed.world_size() == 1


LOG_EVERY = 10.0  # seconds: where stderr is a log, not a terminal, a progress line this often (none for shorter runs)


class _Lines:
    """tqdm's refreshes as lines of their own, for a log (a terminal gets the bar redrawn in place)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, name: str, quiet: bool):
    """A bar of seed-generations done, with what runs (the run and policy), its rate and the time left."""
    if quiet or sys.stderr.isatty():
        return tqdm(total=total, desc=name, unit="seed-gen", unit_scale=True, disable=quiet)
    return tqdm(total=total, desc=name, unit="seed-gen", unit_scale=True, file=_Lines(sys.stderr), ascii=True,
                delay=LOG_EVERY, mininterval=LOG_EVERY, ncols=100)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: ExperimentConfig, all_seeds: bool) -> None:
    """Refuse a run whose family says it needs more memory than this machine has, before anything starts."""
    estimate = cfg.family_module.memory_estimate
    have = available_memory()
    if estimate is None or have is None:
        return
    need = estimate(cfg.family_config, len(cfg.seeds), cfg.iterations, all_seeds)
    if need > have:
        raise BadInput(f"this run needs about {need / 2**30:,.1f} GiB of memory ({cfg.family} with {len(cfg.seeds):,} seeds x "
                       f"{cfg.iterations:,} iterations) and this machine has {have / 2**30:,.1f} GiB available; make it smaller")


def finished_rows(store: RunDir, cfg: ExperimentConfig, family) -> list[dict]:
    """Rows of every finished unit, in the order an uninterrupted run writes them. A chain whose finished
    generations are not all at its start was damaged (a record removed by hand): BadInput names it."""
    rows = []
    for policy in cfg.policies:
        if vectorised(family):
            rows += store.finished(store.batch_dir(policy.label)) or []
            continue
        for seed in cfg.seeds:
            gap = None
            for n in range(1, cfg.iterations + 1):
                gen_dir = store.gen_dir(policy.label, seed, n)
                done = store.finished(gen_dir)
                if done is None:
                    gap = gap or gen_dir
                elif gap is not None:
                    raise BadInput(f"{gap} is unfinished (no readable metrics.json) but {gen_dir.name} after it is "
                                   f"finished: the chain was damaged; move {gap} and the later generations of its chain "
                                   f"out of the run directory and run the same command again to recompute them")
                else:
                    rows += done
    return rows


def check_finite(metrics: dict, where: str) -> None:
    for k, v in metrics.items():
        bad = ~np.isfinite(np.asarray(v, dtype=float))
        if bad.any():
            raise ChainStopped(f"{where}: {k} is not finite ({np.asarray(v, dtype=float)[bad].ravel()[0]}); the chain stops "
                               f"here rather than train later generations on a broken model's data")


def run_chain(family, store: RunDir, cfg: ExperimentConfig, policy: Policy, seeds: list[int], bar, tracker: Tracker) -> None:
    """One seed's chain, a folder per generation (a batched family gets arrays of one seed)."""
    N, seed, label = cfg.iterations, seeds[0], policy.label
    if store.record(store.gen_dir(label, seed, N)) is not None:
        bar.update(N)
        return
    real = family.real_data("train", seed_arg(family, seeds))
    test = family.real_data("test", seed_arg(family, seeds))
    pool, first = [real], None  # first: generation 1's model, the reference a selection's scores may use
    for n in range(1, N + 1):
        gen_dir = store.gen_dir(label, seed, n)
        if store.record(gen_dir) is not None:  # resume: reopen what this generation sampled
            if n < N:
                store.verify(gen_dir)
                pool.append(reopen(family, gen_dir))
            bar.update(1)
            continue
        if store.writer:
            gen_dir.mkdir(parents=True, exist_ok=True)
        key = SHARED if n == 1 else label

        def seed_for(purpose: str, generation: int = n):
            return stream(family, seeds, key if generation == n else label, generation, purpose)

        t0 = time.perf_counter()
        reset_peak_rss()
        model = family.load_model(gen_dir) if store.fitted(gen_dir) else None  # saved before the run was stopped
        if model is None:
            model = shared_first_model(family, store, cfg, policy, seed) if n == 1 else None
            if model is None:
                train = policy.training_set(n, pool, family, seed_for("policy"),
                                            fresh_real=lambda: family.real_data("train", seed_arg(family, seeds), draw=n - 1))
                previous = store.gen_dir(label, seed, n - 1) if n > 1 else None
                model = fit(family, train, seed_for("fit"), gen_dir, cfg.weight(policy), previous)
            if store.writer:
                family.save_model(model, gen_dir)
                store.record_fit(gen_dir)
        metrics = family.evaluate(model, test, seed_for("evaluate"), gen_dir)
        if n < N:
            size = policy.synthetic_size(n + 1, family.size(real))
            spec = cfg.selection(policy)
            if spec is not None and first is None:
                first = model if n == 1 else family.load_model(store.gen_dir(label, seed, 1))
            data, chosen = synthesize(family, model, size, real, seed_for("sample", n + 1), seed_for("select", n + 1), gen_dir, spec, first)
            metrics |= chosen
            pool.append(data)
        metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}  # a batched family's arrays of one
        check_finite(metrics, f"{label} seed {seed} gen {n}")
        rows = [dict(policy=label, seed=seed, iteration=n, metric=k, value=v) for k, v in metrics.items()]
        if store.writer:  # peak memory is rank 0's
            resources = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": peak_rss_mb(), "processes": distributed.world_size()}
            atomic_write_json(gen_dir / "resources.json", resources)
        store.finish(gen_dir, rows)
        tracker.rows(rows)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        line = f"{label} seed {seed} gen {n}/{N}: {shown} ({time.perf_counter() - t0:.1f}s)"
        store.log(line)
        bar.update(1)
        if time.perf_counter() - t0 >= 1.0 and store.writer:  # slow generations are news; thousands of fast ones are noise
            bar.write(line, file=sys.stderr)
        distributed.barrier()  # the other ranks see this generation finished (and its model) before they go on


def shared_first_model(family, store: RunDir, cfg: ExperimentConfig, policy: Policy, seed: int):
    """Generation 1 is the same fit for every policy: reuse an earlier policy's, if one is finished."""
    for other in cfg.policies:
        if other == policy:
            return None
        other_dir = store.gen_dir(other.label, seed, 1)
        if store.record(other_dir) is not None:
            store.verify(other_dir)
            return family.load_model(other_dir)
    return None


def fit(family, train, seed, workdir, real_weight: float | None, previous: Path | None = None):
    """family.fit, with the real examples' share of the loss when the config sets one, and the previous
    generation's folder when the family's fit takes it (None in generation 1 and in a vectorised run)."""
    extra = {} if real_weight is None else {"real_weight": real_weight}
    if continues(family):
        extra["previous"] = previous
    return family.fit(train, seed, workdir, **extra)


def batch_chain(family, policy: Policy, seeds: list[int], iterations: int, select=None, real_weight: float | None = None):
    """The loop for every seed of one policy at once, a vectorised family's calls each taking all of them.
    Yields (n, metrics, model) as each generation ends, metrics an array (S,) each."""
    base = seed_arg(family, seeds)
    real, test = family.real_data("train", base), family.real_data("test", base)
    real_size = family.size(real)
    pool, first = [real], None
    for n in range(1, iterations + 1):
        key = SHARED if n == 1 else policy.label
        train = policy.training_set(n, pool, family, stream_keys(seeds, key, n, "policy"),
                                    fresh_real=lambda: family.real_data("train", base, draw=n - 1))
        model = fit(family, train, stream_keys(seeds, key, n, "fit"), None, real_weight)
        first = model if n == 1 else first
        metrics = family.evaluate(model, test, stream_keys(seeds, key, n, "evaluate"), None)
        metrics = {k: np.asarray(v, dtype=float).reshape(len(seeds)) for k, v in metrics.items()}
        if n < iterations:
            size = policy.synthetic_size(n + 1, real_size)
            data, chosen = synthesize(family, model, size, real, stream_keys(seeds, policy.label, n + 1, "sample"),
                                      stream_keys(seeds, policy.label, n + 1, "select"), None, select, first, len(seeds))
            metrics |= chosen
            pool.append(data)
        yield n, metrics, model


def simulate(family, policy: Policy, seeds: list[int], iterations: int, select=None, real_weight: float | None = None) -> dict[str, np.ndarray]:
    """Every metric of every seed and iteration, (S, N) each, with no run directory: a vectorised family's
    chains in memory (the numbers a run directory of the same config records)."""
    out = {}
    for n, metrics, _ in batch_chain(family, policy, seeds, iterations, select, real_weight):
        for k, v in metrics.items():  # NaN where a metric has no value (a selection's, after the last model)
            if k not in out:
                out[k] = np.full((len(seeds), iterations), np.nan)
            out[k][:, n - 1] = v
    return out


SEEDS_AT_ONCE = 256  # seeds a vectorised unit computes together: enough to amortise each call, few enough that
# a generation's arrays stay in cache (linreg, accumulate-subsample: 1.5x less CPU per seed than 2,000 at once)


def run_batch(family, store: RunDir, cfg: ExperimentConfig, policy: Policy, seeds: list[int], bar, tracker: Tracker) -> None:
    """Every seed of one policy, SEEDS_AT_ONCE at a time: one unit of the run directory whose rows stream out
    as each generation of each group of seeds ends."""
    if store.finished(store.batch_dir(policy.label)) is not None:
        bar.update(cfg.iterations * len(seeds))
        return
    t0 = time.perf_counter()
    parts = [run_group(family, store, cfg, policy, group, lo, store.append, bar.update) for lo, group in seed_groups(seeds)]
    finish_unit(store, tracker, cfg, policy, seeds, parts, t0)


def seed_groups(seeds: list[int]) -> list[tuple[int, list[int]]]:
    """(offset, seeds) of each group of SEEDS_AT_ONCE seeds, in order."""
    return [(lo, seeds[lo : lo + SEEDS_AT_ONCE]) for lo in range(0, len(seeds), SEEDS_AT_ONCE)]


def run_group(family, store: RunDir, cfg: ExperimentConfig, policy: Policy, group: list[int], lo: int, append, progress) -> dict:
    """One group of a vectorised policy's seeds (the `lo`-th seed on): each generation's rows to `append` as it
    ends, `progress(seed-generations)`, and its last model saved. Returns each metric's array (seeds, N)."""
    N, label, unit = cfg.iterations, policy.label, store.batch_dir(policy.label)
    arrays = {}
    for n, metrics, model in batch_chain(family, policy, group, N, cfg.selection(policy), cfg.weight(policy)):
        check_finite(metrics, f"{label} gen {n} (seeds {group[0]}..{group[-1]})")
        for k, v in metrics.items():  # NaN where a metric has no value (a selection's, after the last model)
            if k not in arrays:
                arrays[k] = np.full((len(group), N), np.nan)
            arrays[k][:, n - 1] = v
        append(batch_lines(label, group, n, {k: v.tolist() for k, v in metrics.items()}))
        progress(len(group))
    if store.writer:  # the last generation's models, a folder per group of seeds
        (unit / f"seeds-{lo}").mkdir(parents=True, exist_ok=True)
        family.save_model(model, unit / f"seeds-{lo}")
    return arrays


def finish_unit(store: RunDir, tracker: Tracker, cfg: ExperimentConfig, policy: Policy, seeds: list[int], parts: list[dict], t0: float) -> None:
    """Record a vectorised policy's unit from its groups' arrays, in order, and log it."""
    arrays = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    store.finish_batch(store.batch_dir(policy.label), policy.label, seeds, arrays, SEEDS_AT_ONCE)
    tracker.arrays(policy.label, seeds, arrays)
    means = " ".join(f"{k}={np.nanmean(v[:, -1]):.4g}" for k, v in arrays.items() if not np.isnan(v[:, -1]).all())
    store.log(f"{policy.label}: {len(seeds)} seeds x {cfg.iterations} iterations, last mean {means} ({time.perf_counter() - t0:.2f}s)")
