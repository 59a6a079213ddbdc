"""A run's work split over worker processes, when the run may use more than one core (`--threads N`).

Vectorised runs (`run_split`). A vectorised family computes a policy's seeds SEEDS_AT_ONCE at a time (loop.py);
the groups are independent. N forked workers each take every N-th group, for every policy in turn, so the
designs and test sets a family caches for its groups serve all of that worker's policies. (Threads would not
do: the work is many small array operations, which the GIL keeps to one core.) A worker writes each group's
rows to a spool file outside the run directory and its arrays, once the group is done, beside it. This process
copies the rows into metrics.jsonl in the order a one-process run writes them, group by group and policy by
policy, following the group that is due as its file grows, and records each policy's unit once all its groups
are in. So the run directory ends byte for byte as a one-process run's does.

Every other run on the CPU (`run_chains`). Its (policy, seed) chains are independent but for generation 1,
which every policy of a seed shares: N forked workers, one torch thread each, take the next chain that may
start — the first policy's at once, any other's once the first policy's generation 1 of that seed is finished
(or its chain has ended). A worker writes its generations' folders as one process does and sends their rows,
progress and lines to this process, which appends the rows to metrics.jsonl as they come and, once all chains
are done, rewrites it in the order of one process's run.

In both, an interrupt or a worker's error stops every worker; a chain whose metrics turn non-finite stops
only its own unit, as in one process.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from modelcollapse import loop, procs
from modelcollapse.errors import RunFailed

POLL = 0.05  # seconds between looks at the workers' files


def available() -> bool:
    """Forked workers inherit the family and the run directory as they are; where there is no fork, one process."""
    return "fork" in multiprocessing.get_all_start_methods()


def run_split(family, store, cfg, workers: int, bar, tracker, stopped) -> None:
    """Every unfinished policy of a vectorised run on `workers` processes; `stopped(ChainStopped)` is told of a
    unit whose chain stopped."""
    policies = []
    for policy in cfg.policies:
        if store.finished(store.batch_dir(policy.label)) is not None:
            bar.update(cfg.iterations * len(cfg.seeds))
        else:
            policies.append(policy)
    groups = loop.seed_groups(cfg.seeds)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Array("q", workers)  # seed-generations each worker has finished, for the progress bar
    with tempfile.TemporaryDirectory(prefix="modelcollapse-spool-") as tmp:
        spool = Path(tmp)
        args = (workers, family, store, cfg, policies, groups, spool, done)
        pool = [ctx.Process(target=_work, args=(w, *args), daemon=True) for w in range(workers)]
        for proc in pool:
            proc.start()
        try:
            _collect(store, tracker, cfg, policies, groups, spool, pool, done, bar, stopped)
        finally:
            for proc in pool:
                if proc.is_alive():
                    proc.terminate()
                proc.join()


def _files(spool: Path, label: str, index: int) -> tuple[Path, Path, Path]:
    """A group's rows, its arrays (there once the group is done) and its stop message (there if it stopped)."""
    stem = spool / f"{index}-{label.encode().hex()}"
    return stem.with_suffix(".jsonl"), stem.with_suffix(".npz"), stem.with_suffix(".stopped")


def _become_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    procs.die_with_parent()


def _pickled(e: BaseException) -> bytes:
    """A worker's error as the parent will raise it (one line of RunFailed where it does not pickle)."""
    try:
        return pickle.dumps(e)
    except Exception:  # noqa: BLE001
        return pickle.dumps(RunFailed(f"a worker process failed: {e!r}"))


def _work(w: int, workers: int, family, store, cfg, policies, groups, spool: Path, done) -> None:
    """Worker w: groups w, w + workers, ... of every policy. Ends the process itself (no clean-up of the
    parent's: the run directory and its lock are the parent's to close)."""
    _become_worker()

    def progress(k: int) -> None:
        with done.get_lock():
            done[w] += k

    try:
        for policy in policies:
            for index in range(w, len(groups), workers):
                lo, group = groups[index]
                rows, arrays, stop = _files(spool, policy.label, index)
                with open(rows, "a") as f:
                    def append(lines, f=f):
                        f.write("".join(line + "\n" for line in lines))
                        f.flush()

                    try:
                        result = loop.run_group(family, store, cfg, policy, group, lo, append, progress)
                    except loop.ChainStopped as e:
                        stop.write_text(str(e))
                        break  # this policy's later groups: its unit is stopped
                partial = arrays.with_suffix(".part.npz")
                np.savez(partial, **result)
                os.replace(partial, arrays)
    except BaseException as e:  # noqa: BLE001 - whatever it was, the parent raises it
        (spool / f"error-{w}.part").write_bytes(_pickled(e))
        os.replace(spool / f"error-{w}.part", spool / f"error-{w}.pickle")  # whole, or not there
        os._exit(1)
    os._exit(0)


def _collect(store, tracker, cfg, policies, groups, spool: Path, pool, done, bar, stopped) -> None:
    """Copy the groups' rows into metrics.jsonl in order, record each finished unit, and raise a worker's error."""
    shown = 0
    for policy in policies:
        t0, parts = time.perf_counter(), []
        for index in range(len(groups)):
            rows, arrays, stop = _files(spool, policy.label, index)
            offset = 0
            while True:
                finished, halted = arrays.exists(), stop.exists()  # looked at before the rows are read
                offset = _copy_lines(rows, offset, store)
                shown = _show(done, shown, bar)
                if finished:
                    with np.load(arrays) as f:
                        parts.append({k: f[k] for k in f.files})
                    rows.unlink()  # copied: the spool never holds more than the groups in flight
                    arrays.unlink()
                    break
                if halted:
                    stopped(loop.ChainStopped(stop.read_text()))
                    break
                _raise_failures(spool, pool)
                time.sleep(POLL)
            if len(parts) <= index:
                break  # the unit stopped: none of its later groups are written
        else:
            loop.finish_unit(store, tracker, cfg, policy, cfg.seeds, parts, t0)


def _copy_lines(path: Path, offset: int, store) -> int:
    """Append the whole lines of `path` past `offset` to metrics.jsonl; return the new offset."""
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    if end:
        store.append_text(chunk[:end].decode())
    return offset + end


def _show(done, shown: int, bar) -> int:
    total = sum(done[:])
    if total > shown:
        bar.update(total - shown)
    return total


def _raise_failures(spool: Path, pool) -> None:
    """A worker's error, as it raised it; or one line for a worker that died without a word (killed). The exit
    codes are read first: a worker writes its error before it exits, so an ended worker's error is there."""
    ended = [proc.exitcode for proc in pool if proc.exitcode not in (None, 0)]
    for path in sorted(spool.glob("error-*.pickle")):
        raise pickle.loads(path.read_bytes())
    if ended:
        raise RunFailed(f"a worker process ended with exit code {ended[0]} before its seeds were done")


def run_chains(family, store, cfg, workers: int, bar, tracker, stopped) -> None:
    """Every (policy, seed) chain of a run of the generic loop on `workers` processes, one torch thread each;
    `stopped(ChainStopped)` is told of a chain that stopped. metrics.jsonl is left in the order the rows came:
    the caller rewrites it in one process's order (loop.finished_rows)."""
    chains = [(policy, seed) for policy in cfg.policies for seed in cfg.seeds]
    ctx = multiprocessing.get_context("fork")
    taken, ended = ctx.Array("b", len(chains)), ctx.Array("b", len(chains), lock=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizers library's threads do not survive a fork
    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
    pool = [ctx.Process(target=_chain_work, args=(family, store, cfg, chains, taken, ended, send, pipes), daemon=True)
            for _, send in pipes]
    for proc in pool:
        proc.start()
    for _, send in pipes:
        send.close()  # each worker's end is its own: a worker that ends closes the last copy, and its pipe reads EOF
    try:
        readers = {recv: proc for (recv, _), proc in zip(pipes, pool)}
        while readers:
            for recv in wait(list(readers)):
                try:
                    kind, value = recv.recv()
                except EOFError:
                    proc = readers.pop(recv)
                    proc.join()
                    if proc.exitcode:
                        raise RunFailed(f"a worker process ended with exit code {proc.exitcode} before its chains were done") from None
                    continue
                if kind == "rows":
                    store.append_rows(value)
                    tracker.rows(value)
                elif kind == "update":
                    bar.update(value)
                elif kind == "write":
                    bar.write(value, file=sys.stderr)
                elif kind == "stopped":
                    stopped(loop.ChainStopped(value))
                else:
                    raise pickle.loads(value)
    finally:
        for proc in pool:
            if proc.is_alive():
                proc.terminate()
            proc.join()


class _Relay:
    """A worker's progress bar and tracker: each call a message to the parent, which draws, logs and appends."""

    def __init__(self, conn):
        self.conn = conn

    def update(self, n: int = 1) -> None:
        self.conn.send(("update", n))

    def write(self, line: str, file=None) -> None:
        self.conn.send(("write", line))

    def rows(self, rows: list[dict]) -> None:
        self.conn.send(("rows", rows))


def _chain_work(family, store, cfg, chains, taken, ended, conn, pipes) -> None:
    """A worker: the next chain that may start, until none is left. Ends the process itself."""
    _become_worker()
    for recv, send in pipes:  # only its own end stays open here (see run_chains)
        recv.close()
        if send is not conn:
            send.close()
    if "torch" in sys.modules:  # one thread: OpenMP's pool, once the parent used it, hangs a forked child's second thread
        sys.modules["torch"].set_num_threads(1)
    store.rows_here = False
    relay = _Relay(conn)
    try:
        while (i := _next_chain(store, cfg, chains, taken, ended)) is not None:
            if i < 0:
                time.sleep(POLL)
                continue
            policy, seed = chains[i]
            try:
                loop.run_chain(family, store, cfg, policy, [seed], relay, relay)
            except loop.ChainStopped as e:
                conn.send(("stopped", str(e)))
            ended[i] = 1
    except BaseException as e:  # noqa: BLE001 - whatever it was, the parent raises it
        conn.send(("error", _pickled(e)))
        os._exit(1)
    os._exit(0)


def _next_chain(store, cfg, chains, taken, ended) -> int | None:
    """Take the first chain that may start: its index, -1 while the only ones left wait for a generation 1,
    None when every chain is taken. The first policy's chain of seed k is chains[k]."""
    with taken.get_lock():
        for i, (_, seed) in enumerate(chains):
            k = cfg.seeds.index(seed)
            if taken[i] or not (i == k or ended[k] or store.record(store.gen_dir(chains[k][0].label, seed, 1)) is not None):
                continue
            taken[i] = 1
            return i
        return None if all(taken) else -1
