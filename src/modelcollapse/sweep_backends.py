"""Where a sweep's cells run: a pool of child processes on this machine, or Ray tasks on a cluster.

Both backends run the same function, `run_cell`: one child process `python -m modelcollapse run CONFIG
--out RUN_DIR`, its output appended to the cell's log. So a cell is an ordinary run (resumed the ordinary
way) and gives the same numbers whichever backend ran it.

On an interrupt both stop launching cells and stop the running ones as a cluster stops a job: SIGTERM (the
cell's run marks itself interrupted and exits), then SIGKILL after GRACE seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelcollapse.errors import BadInput
from modelcollapse.procs import THREADS_ENV, die_with_parent, threads_each
from modelcollapse.store import now

RAY_MISSING = "--backend ray needs Ray: pip install modelcollapse[ray]"
GRACE = 10.0  # seconds a stopped cell has to mark its run interrupted; well inside Kubernetes' default 30 s


@dataclass
class Job:
    """One cell to launch: absolute paths, so a Ray worker on another node (on a shared disk) finds them."""

    name: str
    config: str  # the cell's TOML
    run_dir: str
    log: str
    cwd: str  # relative data paths in the config resolve from where the sweep was started
    cpus: int
    gpus: float
    env: dict  # the sweep's MODELCOLLAPSE_* variables (e.g. the cache), which a Ray worker would not have


class Running:
    """The cell processes running now, so that an interrupt can stop them, and so that none starts after."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False

    def start(self, cmd: list[str], **kwargs) -> subprocess.Popen | None:
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, **kwargs)
            self._procs.add(proc)
            return proc

    def ended(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        """Start no more; stop the running ones (stop_processes)."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        stop_processes(procs)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each, then SIGKILL to those still running GRACE seconds later; returns once all have ended."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_cell(job: Job, threads: str, running: Running | None = None) -> dict | None:
    """Run one cell to its end in a child process: {"status": done|bad-input|failed|interrupted, "error",
    "seconds"}, or None when the sweep was stopping before it started."""
    running = running or Running()
    if running.stopping:
        return None
    cmd = [sys.executable, "-m", "modelcollapse", "run", job.config, "--out", job.run_dir]
    env = dict(os.environ, **job.env, OMP_NUM_THREADS=threads)
    t0 = time.perf_counter()
    with open(job.log, "a", errors="backslashreplace") as log:  # its paths need not be UTF-8
        log.write(f"=== {now()} OMP_NUM_THREADS={threads} {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        proc = running.start(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=job.cwd, preexec_fn=die_with_parent)
        if proc is None:
            return None
        try:
            # a wait with a timeout polls, so Ray's cancel (a KeyboardInterrupt in this thread) gets in
            while proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
        except KeyboardInterrupt:
            running.stopping = True
            stop_processes([proc])
        finally:
            running.ended(proc)
    rc = proc.returncode
    seconds = round(time.perf_counter() - t0, 3)
    if rc == 0:
        return {"status": "done", "error": None, "seconds": seconds}
    if rc == 2:
        status = "bad-input"
    elif running.stopping or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
        status = "interrupted"
    else:
        status = "failed"
    return {"status": status, "error": error_line(Path(job.log), start, rc), "seconds": seconds}


def error_line(log: Path, start: int, rc: int) -> str:
    """The line that says why this attempt failed: its "error:" line (bad input), else its last line."""
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    with open(log, "rb") as f:
        f.seek(max(start, log.stat().st_size - 64_000))  # a traceback's last line is near the end
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error: ")] if rc == 2 else []
    return (said or lines or [f"exit code {rc} with an empty log"])[-1]


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


Done = Callable[[Job, dict], None]  # called in the sweep's own thread as each cell ends


def run_local(jobs: list[Job], workers: int, done: Done) -> None:
    """At most `workers` children at once, each with the user's thread count or DEFAULT_THREADS (procs.py). On
    KeyboardInterrupt: no cell starts any more, the running ones are stopped and reported, and it goes on up."""
    threads = threads_each(workers)
    running = Running()
    pool = ThreadPoolExecutor(max_workers=workers)  # threads that wait on child processes
    futures = {pool.submit(run_cell, job, threads, running): job for job in jobs}
    reported = set()
    try:
        for future in as_completed(futures):
            reported.add(future)
            done(futures[future], future.result())
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()  # those not started yet stay pending
        running.stop()
        wait_all(futures)
        for future, job in futures.items():
            if future not in reported and not future.cancelled() and future.result() is not None:
                done(job, future.result())
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(RAY_MISSING) from None
    return ray


def check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody answers (ray.init would retry for minutes); "auto" and ray:// addresses
    are Ray's to resolve."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ConnectionError(f"{host}:{port} does not answer: {e}") from None


class RayCluster:
    """A Ray session for one sweep: joins `address`, or starts a local instance of `workers` CPUs (all by
    default), and checks that some node can hold every cell before any runs."""

    def __init__(self, address: str | None, workers: int | None, needs: list[Job]):
        self.ray = import_ray()
        self.address, self.workers, self.needs = address, workers, needs

    def __enter__(self) -> "RayCluster":
        ray = self.ray
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if self.address:
                check_reachable(self.address)
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise BadInput(f"--address {self.address}: no Ray cluster reachable ({first_line(e)})") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # ray.init sets its own: the sweep stops its cells itself
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        for job in self.needs:
            if not any(r.get("CPU", 0) >= job.cpus and r.get("GPU", 0) >= job.gpus for r in nodes):
                ray.shutdown()
                have = ", ".join(f"{r.get('CPU', 0):g} CPU {r.get('GPU', 0):g} GPU" for r in nodes)
                raise BadInput(f"cell {job.name} asks for cpus={job.cpus}, gpus={job.gpus:g}, but no Ray node has that "
                               f"(nodes: {have}); lower 'cpus'/'gpus' or add a node")
        return self

    def __exit__(self, *exc):
        self.ray.shutdown()
        return False

    def run(self, jobs: list[Job], done: Done) -> None:
        """Each cell a task reserving its config's cpus and gpus; the child gets that many threads unless the
        user chose a number (--threads, $MODELCOLLAPSE_THREADS, OMP_NUM_THREADS). Ray sets CUDA_VISIBLE_DEVICES
        for the task, and the child inherits it."""
        ray = self.ray
        task = ray.remote(run_cell)
        user_threads = os.environ.get(THREADS_ENV)  # set_threads exports the user's choice, and only theirs, here
        logs = {job.name: _size(job.log) for job in jobs}  # each attempt of a cell opens its log with a line
        pending = {task.options(num_cpus=job.cpus, num_gpus=job.gpus, max_retries=0)
                   .remote(job, user_threads or str(job.cpus)): job for job in jobs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                done(job, self._result(ready[0]))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)  # a running task stops its cell (run_cell's KeyboardInterrupt); a queued one never starts
            ray.wait(list(pending), num_returns=len(pending), timeout=GRACE + 10)
            for ref, job in pending.items():
                result = self._result(ref)
                if result["status"] != "failed":
                    done(job, result)
                elif _size(job.log) > logs[job.name]:  # cancelled once it had started
                    done(job, {"status": "interrupted", "error": "interrupted", "seconds": None})
            raise

    def _result(self, ref) -> dict:
        try:
            return self.ray.get(ref, timeout=0)
        except Exception as e:  # the task itself died (node lost, worker killed) or was cancelled: the cell failed
            return {"status": "failed", "error": f"ray: {type(e).__name__}: {first_line(e)}", "seconds": None}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
