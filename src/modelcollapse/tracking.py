"""Experiment tracking: what a run records, also sent where researchers already look.

    modelcollapse run CONFIG --track mlflow|wandb|tensorboard      (also `sweep` and `reproduce`)

Where to log is each tool's own setting: MLflow's MLFLOW_TRACKING_URI (and MLFLOW_EXPERIMENT_NAME); W&B's
WANDB_MODE, WANDB_DIR, WANDB_PROJECT (default "modelcollapse") and its login; TensorBoard writes
RUN_DIR/tensorboard/, or $MODELCOLLAPSE_TENSORBOARD_DIR/<group>/ when that is set.

One tracking run per (policy, seed) chain, its step the generation: every finished generation's metrics,
the config (params), the generation's sample pictures (*.png, *.jpg) and texts (*.txt), and the chain's
status at the end (done, failed, interrupted). A run's chains are grouped: an MLflow parent run (named after
the run directory) in an experiment named after the config, a W&B group, a TensorBoard folder
<policy>/seed-<s>. A sweep's cells share the sweep's group: its MLflow experiment (a parent run per cell),
its W&B group, $MODELCOLLAPSE_TENSORBOARD_DIR/<group>/<cell>/ (by default each cell's own RUN_DIR/tensorboard,
so `tensorboard --logdir SWEEP_DIR` shows them all).

A run of more than CHAIN_RUNS seeds (the vectorised families run thousands) gets one tracking run per policy
instead, `<policy>/all-seeds`, logging each metric's mean and standard deviation over the seeds once every
seed has finished that generation, and the first seed's samples.

Resuming continues the same tracking runs: RUN_DIR/tracking.json keeps, per tool, each tracking run's id and
how many generations it has logged, and a resumed run logs only what they lack (generations that finished
before tracking was asked for included). A process killed between logging a generation and recording that
it did may log that one generation twice.

Tracking never fails a run: the first exception from a tracking library (a server that does not answer, a
login missing, a full disk) is one warning line on stderr and in run.log, and tracking is off for the rest
of the run. The run directory stays the source of truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import importlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from modelcollapse.errors import BadInput
from modelcollapse.store import atomic_write_json, read_json

NAMES = {"mlflow": "MLflow", "wandb": "Weights & Biases", "tensorboard": "TensorBoard"}  # each its own module
CHAIN_RUNS = 16  # seeds up to which every chain is a tracking run of its own; past it, one per policy
STATE = "tracking.json"
GROUP_ENV = "MODELCOLLAPSE_TRACK_GROUP"  # set by a sweep for its cells: the group they join
TENSORBOARD_ENV = "MODELCOLLAPSE_TENSORBOARD_DIR"
IMAGES, TEXTS = (".png", ".jpg", ".jpeg"), (".txt",)
MAX_PARAM = 500  # characters of a param's value: MLflow refuses long ones; the run directory has the whole config


def check(backend: str | None) -> None:
    """BadInput naming the pip command when the tool `--track` asks for is not installed."""
    if backend is None:
        return
    if backend not in NAMES:
        raise BadInput(f"--track: must be one of {', '.join(NAMES)} (got {backend!r})")
    try:
        importlib.import_module(backend)
    except Exception as e:  # not installed (ImportError), or installed broken
        why = "" if isinstance(e, ImportError) else f" (it fails to import: {type(e).__name__}: {first_line(e)})"
        raise BadInput(f"--track {backend} needs {NAMES[backend]}{why}: pip install {backend}, or pip install "
                       f"'modelcollapse[{backend}]'") from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def group(name: str, where: Path, sweep: bool = False) -> dict:
    """A group of tracking runs: its name, and an id unique to the directory (two runs of one config apart)."""
    digest = hashlib.sha256(str(Path(where).absolute()).encode()).hexdigest()[:6]
    return {"name": name, "id": f"{name}-{digest}", "sweep": sweep}


def sweep_env(backend: str | None, name: str, out: Path) -> dict:
    """What a sweep adds to its cells' environment: the tool (`run` reads MODELCOLLAPSE_TRACK) and the sweep's group."""
    if backend is None:
        return {}
    if backend == "mlflow":
        shared_experiment(name)
    return {"MODELCOLLAPSE_TRACK": backend, GROUP_ENV: json.dumps(group(name, out, sweep=True))}


def shared_experiment(name: str) -> None:
    """Make the sweep's MLflow experiment before its cells start: cells creating it at once in a file store
    make one experiment each under the same name. A failure here is the cells' to report, once each."""
    with contextlib.suppress(Exception):
        import mlflow

        uri = mlflow.get_tracking_uri()
        reachable(uri)
        experiment(mlflow.MlflowClient(uri), os.environ.get("MLFLOW_EXPERIMENT_NAME") or name)


def experiment(client, name: str) -> str:
    """The id of the experiment `name`, made if there is none."""
    import mlflow

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another process made it first (a server's store refuses twins)
        return client.get_experiment_by_name(name).experiment_id


def params(config: dict) -> dict:
    """The resolved config as flat params: tables dotted (`linreg.T`), lists as JSON, seeds as their range."""
    config = dict(config)
    seeds = config.pop("seeds")
    consecutive = len(seeds) > 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    out = {"seeds": f"{seeds[0]}..{seeds[-1]}" if consecutive else ",".join(map(str, seeds))}
    todo = list(config.items())
    while todo:
        key, value = todo.pop(0)
        if isinstance(value, dict):
            todo += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            out[key] = value if isinstance(value, (bool, int, float)) else str(value if isinstance(value, str) else json.dumps(value))
    return {k: v[:MAX_PARAM] if isinstance(v, str) else v for k, v in out.items()}


def samples(gen_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """The pictures and texts a generation's folder holds: its samples as the family wrote them."""
    if gen_dir is None or not gen_dir.is_dir():
        return [], []
    files = sorted(p for p in gen_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix in IMAGES], [p for p in files if p.suffix in TEXTS]


def spread(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and standard deviation over seeds of each metric (NaN: a seed without that metric)."""
    out = {}
    for k, v in values.items():
        v = np.asarray(v, dtype=float)
        if np.isfinite(v).any():
            out[f"{k}/mean"], out[f"{k}/std"] = float(np.nanmean(v)), float(np.nanstd(v))
    return out


class Tracker:
    """The tracking of one run directory (rank 0 only), as a context manager that ends it with the run's status.
    `rows` and `arrays` take finished generations; every call is safe: an exception turns tracking off."""

    def __init__(self, backend: str | None, store, cfg):
        self.name, self.store, self.seeds, self.N = backend, store, cfg.seeds, cfg.iterations
        self.aggregate = len(cfg.seeds) > CHAIN_RUNS
        self.pending: dict[tuple[str, int], dict[int, dict]] = {}  # aggregate: (policy, n) -> {seed: metrics}
        self.open: tuple[str, object] | None = None  # (key, handle): the one tracking run open now
        self.on = backend is not None
        self._safely(self._start, cfg.resolved(), cfg.name)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb):
        status = "done" if exc_type is None else "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        self._safely(self._close, status)
        return False

    def rows(self, rows: list[dict]) -> None:
        """Log finished generations given as metric rows ({"policy", "seed", "iteration", "metric", "value"}),
        in the order a run writes them; those already logged are skipped."""
        self._safely(self._rows, rows)

    def arrays(self, policy: str, seeds: list[int], arrays: dict[str, np.ndarray]) -> None:
        """Log a vectorised policy's finished unit: each metric (seeds, iterations), NaN where it has no value."""
        self._safely(self._arrays, policy, seeds, arrays)

    # -- inside: every exception below ends up in _safely ----------------------------------------------------
    def _safely(self, step, *args) -> None:
        if not self.on:
            return
        try:
            step(*args)
        except Exception as e:  # whatever the tracking library raises: the run goes on without it
            self.on, self.open = False, None
            line = (f"warning: tracking ({self.name}) is off for the rest of this run: {type(e).__name__}: "
                    f"{first_line(e)[:300]}; the run directory keeps everything")
            print(line, file=sys.stderr)
            self.store.log(line)

    def _start(self, config: dict, name: str) -> None:
        path = self.store.path / STATE
        try:
            self.state = read_json(path) if path.exists() else {}
            mine = self.state.setdefault(self.name, {})
        except (ValueError, AttributeError):
            raise ValueError(f"{path} is damaged; move it away to track into new tracking runs") from None
        given = os.environ.get(GROUP_ENV)
        mine.setdefault("group", json.loads(given) if given else group(name, self.store.path))
        mine.setdefault("runs", {})
        self.runs = mine["runs"]
        self.params = params(config)
        self.backend = BACKENDS[self.name](self.store.path, mine, self.params)
        self._save()
        print(f"tracking: {self.backend.where}", file=sys.stderr)

    def _rows(self, rows: list[dict]) -> None:
        generations: dict[tuple, dict] = {}
        for r in rows:
            generations.setdefault((r["policy"], r["seed"], r["iteration"]), {})[r["metric"]] = r["value"]
        for (policy, seed, n), metrics in generations.items():
            self._generation(policy, seed, n, metrics)

    def _arrays(self, policy: str, seeds: list[int], arrays: dict[str, np.ndarray]) -> None:
        N = next(iter(arrays.values())).shape[1]
        if self.aggregate:
            for n in range(1, N + 1):
                self._log(f"{policy}/all-seeds", n, spread({k: v[:, n - 1] for k, v in arrays.items()}), None)
            return
        for i, seed in enumerate(seeds):
            for n in range(1, N + 1):
                metrics = {k: float(v[i, n - 1]) for k, v in arrays.items() if not np.isnan(v[i, n - 1])}
                self._generation(policy, seed, n, metrics)

    def _generation(self, policy: str, seed: int, n: int, metrics: dict) -> None:
        if not self.aggregate:
            self._log(f"{policy}/seed-{seed}", n, metrics, self.store.gen_dir(policy, seed, n))
            return
        key = f"{policy}/all-seeds"
        if self.runs.get(key, {}).get("logged", 0) >= n:
            return
        finished = self.pending.setdefault((policy, n), {})
        finished[seed] = metrics
        if len(finished) == len(self.seeds):  # every seed has finished generation n
            del self.pending[(policy, n)]
            names = dict.fromkeys(k for m in finished.values() for k in m)
            values = {k: [m.get(k, np.nan) for m in finished.values()] for k in names}
            self._log(key, n, spread(values), self.store.gen_dir(policy, self.seeds[0], n))

    def _log(self, key: str, n: int, metrics: dict, gen_dir: Path | None) -> None:
        """Log generation n of tracking run `key` (opened or reattached here), unless it has been."""
        entry = self.runs.get(key)
        if entry is not None and entry["logged"] >= n:
            return
        if self.open is None or self.open[0] != key:
            if self.open is not None:  # a chain left unfinished when the next logs: it stopped (non-finite metrics)
                self._end("failed")
            policy, _, who = key.partition("/")
            run_params = {**self.params, "policy": policy, **({} if self.aggregate else {"seed": int(who.removeprefix("seed-"))})}
            handle, run_id = self.backend.start(key, run_params, entry["id"] if entry else None)
            entry = self.runs[key] = {"id": run_id, "logged": entry["logged"] if entry else 0, "status": "running"}
            self.open = (key, handle)
        self.backend.log(self.open[1], n, metrics, *samples(gen_dir))
        entry["logged"] = n
        if n == self.N:
            self._end("done")
        self._save()

    def _end(self, status: str) -> None:
        key, handle = self.open
        self.open = None
        self.runs[key]["status"] = status
        self.backend.end(handle, status, self.runs[key]["logged"])

    def _close(self, status: str) -> None:
        if self.open is not None:
            self._end(status)
        self.backend.close(status)
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.store.path / STATE, self.state)


def shown(uri: str) -> str:
    """A tracking URI as printed and logged: without a user or password in it."""
    url = urlparse(uri)
    return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl() if "@" in url.netloc else uri


def reachable(uri: str) -> None:
    """Fail at once on an http(s) server that does not accept a connection (MLflow would retry for minutes)."""
    url = urlparse(uri)
    if url.scheme in ("http", "https") and url.hostname:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
        except OSError as e:
            raise ConnectionError(f"{shown(uri)} does not answer ({e.strerror or e})") from None


class MLflow:
    """A parent run per run directory, in an experiment per config (or sweep); a child run per chain."""

    STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, run_dir: Path, state: dict, params: dict):
        import mlflow
        from mlflow.entities import Metric, Param

        self.Metric, self.Param = Metric, Param
        uri = mlflow.get_tracking_uri()
        reachable(uri)
        self.client = mlflow.MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or state["group"]["name"]
        self.experiment = experiment(self.client, name)
        if "parent" in state:
            self.client.update_run(state["parent"], status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=run_dir.name, tags={"run_dir": str(run_dir.absolute())})
            state["parent"] = run.info.run_id
            self._params(state["parent"], params)
        self.parent = state["parent"]
        self.where = f"MLflow at {shown(uri)}, experiment {name!r}, parent run {self.parent}"

    def _params(self, run_id: str, params: dict) -> None:
        items = [self.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(run_id, params=items[i : i + 100])

    def start(self, key: str, params: dict, run_id: str | None):
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id, run_id
        run = self.client.create_run(self.experiment, run_name=key, tags={"mlflow.parentRunId": self.parent})
        self._params(run.info.run_id, params)
        return run.info.run_id, run.info.run_id

    def log(self, run_id: str, n: int, metrics: dict, images: list[Path], texts: list[Path]) -> None:
        now = int(time.time() * 1000)
        items = [self.Metric(k, float(v), now, n) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # and at most 1,000 metrics
            self.client.log_batch(run_id, metrics=items[i : i + 1000])
        for path in images + texts:
            self.client.log_artifact(run_id, str(path), f"gen-{n}")

    def end(self, run_id: str, status: str, n: int) -> None:
        self.client.set_tag(run_id, "status", status)
        self.client.set_terminated(run_id, self.STATUS[status])

    def close(self, status: str) -> None:
        self.end(self.parent, status, 0)


class WandB:
    """A W&B run per chain, in the group of the run (or sweep)."""

    def __init__(self, run_dir: Path, state: dict, params: dict):
        import wandb

        self.wandb = wandb
        self.project = os.environ.get("WANDB_PROJECT") or "modelcollapse"
        self.group = state["group"]["id"]
        self.prefix = f"{run_dir.name}/" if state["group"]["sweep"] else ""  # a sweep's cells share the group
        mode = os.environ.get("WANDB_MODE", "online")
        self.where = f"W&B project {self.project!r}, group {self.group!r} ({mode})"

    def start(self, key: str, params: dict, run_id: str | None):
        run_id = run_id or uuid.uuid4().hex[:12]
        run = self.wandb.init(project=self.project, group=self.group, name=self.prefix + key, id=run_id, resume="allow",
                              config=params, settings=self.wandb.Settings(console="off", silent=True))
        return run, run_id

    def log(self, run, n: int, metrics: dict, images: list[Path], texts: list[Path]) -> None:
        media = {f"samples/{p.name}": self.wandb.Image(str(p)) for p in images}
        media |= {f"samples/{p.name}": self.wandb.Html(f"<pre>{html.escape(p.read_text(errors='replace'))}</pre>") for p in texts}
        run.log({**metrics, **media}, step=n)

    def end(self, run, status: str, n: int) -> None:
        run.summary["status"] = status
        run.finish(exit_code=0 if status == "done" else 1)

    def close(self, status: str) -> None:
        pass


class TensorBoard:
    """Event files in a folder per chain: RUN_DIR/tensorboard/<policy>/seed-<s>/ (or under TENSORBOARD_ENV)."""

    def __init__(self, run_dir: Path, state: dict, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.SummaryWriter = SummaryWriter
        root, g = os.environ.get(TENSORBOARD_ENV), state["group"]
        self.root = run_dir / "tensorboard" if not root else Path(root) / g["id"] / (run_dir.name if g["sweep"] else "")
        self.where = f"tensorboard --logdir {self.root}"

    def start(self, key: str, params: dict, run_id: str | None):
        writer = self.SummaryWriter(str(self.root / key))
        if run_id is None:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)
        return writer, str(self.root / key)

    def log(self, writer, n: int, metrics: dict, images: list[Path], texts: list[Path]) -> None:
        from PIL import Image

        for k, v in metrics.items():
            writer.add_scalar(k, v, n)
        for p in images:
            with Image.open(p) as image:
                writer.add_image(f"samples/{p.name}", np.asarray(image.convert("RGB")), n, dataformats="HWC")
        for p in texts:  # indented: Markdown shows it as it is written
            writer.add_text(f"samples/{p.name}", "".join(f"    {line}" for line in p.read_text(errors="replace").splitlines(True)), n)
        writer.flush()

    def end(self, writer, status: str, n: int) -> None:
        writer.add_text("status", status, n)  # at the last generation logged
        writer.close()

    def close(self, status: str) -> None:
        pass


BACKENDS = {"mlflow": MLflow, "wandb": WandB, "tensorboard": TensorBoard}
