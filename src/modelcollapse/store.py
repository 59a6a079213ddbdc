"""The run directory: manifest, metrics, per-generation artefacts; atomic writes, a lock, resume, checksums.

    DIR/manifest.json                      resolved config, its hash, policy labels, version, start/end, status
    DIR/metrics.jsonl                      {"policy","seed","iteration","metric","value"} per line
    DIR/<policy>/seed-<s>/gen-<n>/         that generation's model, synthetic data, fit.json, metrics.json
    DIR/<policy>/all-seeds/                a vectorised policy: every seed at once, metrics.npz, metrics.json

A unit (a generation, or a vectorised policy) is finished when its `metrics.json` exists: it is written
last, by rename, and records the unit's metric rows and a SHA-256 of every file the unit wrote. So a run
killed at any moment leaves only finished units and at most one partial one per chain, and a file that
changed after its unit finished (truncated, overwritten, NaN-filled) is found before it is reused. `fit.json`
marks a generation whose model is saved (with the model files' checksums), so a run killed while evaluating
or sampling does not fit that model again. On resume `metrics.jsonl` is rebuilt from the finished units, so
it ends identical to an uninterrupted run's. Nothing a run wrote is ever deleted by the store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from modelcollapse import __version__
from modelcollapse.errors import BadInput

RECORD, FIT_RECORD, ARRAYS = "metrics.json", "fit.json", "metrics.npz"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def is_temp(name: str) -> bool:
    """A leftover of an atomic write killed half-way: `.<name>.<random>.tmp`."""
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; results are shared as an ordinary file would be
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(unit: Path) -> dict[str, str]:
    """SHA-256 of every file a unit holds (its records and atomic-write leftovers aside), by relative path."""
    out = {}
    for path in sorted(unit.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in (RECORD, FIT_RECORD) and not is_temp(path.name):
            out[path.relative_to(unit).as_posix()] = sha256(path)
    return out


def row_line(policy: str, seed: int, iteration: int, metric: str, value: float) -> str:
    """One line of metrics.jsonl: json.dumps of the row, written out by hand because vectorised runs make
    millions of them (the same text: a test holds the two together)."""
    return f'{{"policy": {json.dumps(policy)}, "seed": {seed}, "iteration": {iteration}, "metric": {json.dumps(metric)}, "value": {float(value)!r}}}'


def batch_lines(policy: str, seeds: list[int], iteration: int, metrics: dict[str, list[float]]) -> list[str]:
    """The lines of one generation of a vectorised policy: seed by seed, each seed's metrics in order."""
    head = f'{{"policy": {json.dumps(policy)}, "seed": '
    tails = [(f', "iteration": {iteration}, "metric": {json.dumps(m)}, "value": ', list(map(repr, v))) for m, v in metrics.items()]
    return [f"{head}{s}{name}{values[i]}}}" for i, s in enumerate(seeds) for name, values in tails]


class RunDir:
    """An open, locked run directory. Use it as a context manager."""

    writer = True

    def __init__(self, path: Path, config: dict, config_hash: str, labels: list[str] | None = None):
        self.path = Path(path)
        self.config = config
        self.config_hash = config_hash
        self.labels = labels
        self._lock = None
        self._metrics = None
        self.appended = 0  # metric lines appended since metrics.jsonl was last rebuilt
        self.rows_here = True  # False in a forked worker, whose rows the parent appends (parallel.py)

    @classmethod
    def check(cls, path: Path, config_hash: str) -> None:
        """Refuse, before anything is written, a DIR that holds a different experiment or no run at all."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BadInput(f"--out {path}: exists and is not a directory")
        for name in ("manifest.json", "metrics.jsonl", "run.log", ".lock"):
            if (path / name).is_symlink():
                raise BadInput(f"{path / name} is a symbolic link; a run writes only inside its directory: remove the link")
        manifest = path / "manifest.json"
        if manifest.exists() or manifest.is_symlink():
            old = _read_manifest(manifest)
            if old.get("config_hash") != config_hash:
                raise BadInput(
                    f"--out {path} holds a run of a different config (hash {old.get('config_hash')}, "
                    f"this one {config_hash}); use a new --out to keep both"
                )
        elif path.is_dir() and any(p.name != ".lock" and not is_temp(p.name) for p in path.iterdir()):
            raise BadInput(f"--out {path} is a non-empty directory without a manifest; use a new --out")

    def __enter__(self) -> "RunDir":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise BadInput(f"--out {self.path}: cannot write there ({e.strerror}: {e.filename})") from None
        self._lock = os.fdopen(fd, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BadInput(f"--out {self.path} is in use by another modelcollapse process") from None
        manifest = self.path / "manifest.json"
        old = _read_manifest(manifest) if manifest.exists() else {}
        self.manifest = {
            "config": self.config,
            "config_hash": self.config_hash,
            "policy_labels": self.labels,
            "version": __version__,
            "started": old.get("started", now()),
            "resumed": old.get("resumed", []) + ([now()] if old else []),
            "ended": None,
            "status": "running",
        }
        try:
            atomic_write_json(manifest, self.manifest)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._metrics:
            self._metrics.close()
        self.manifest["ended"] = now()
        if exc_type is None:
            self.manifest["status"] = "done"
        elif issubclass(exc_type, KeyboardInterrupt):
            self.manifest["status"] = "interrupted"
        else:
            self.manifest["status"] = "failed"
            self.manifest["error"] = f"{exc_type.__name__}: {exc}"
        with contextlib.suppress(OSError):  # a full disk: keep the original error; "running" resumes as well
            atomic_write_json(self.path / "manifest.json", self.manifest)
        self._unlock()
        return False

    def _unlock(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    # -- units -----------------------------------------------------------------------------------------------
    def gen_dir(self, policy: str, seed: int, n: int) -> Path:
        return self.path / policy / f"seed-{seed}" / f"gen-{n}"

    def batch_dir(self, policy: str) -> Path:
        return self.path / policy / "all-seeds"

    @staticmethod
    def record(unit: Path) -> dict | None:
        """A finished unit's record, else None (an unreadable record counts as none: the unit is redone)."""
        try:
            record = read_json(unit / RECORD)
        except (OSError, ValueError):
            return None
        if isinstance(record, list):  # written before records held checksums
            return {"rows": record, "files": {}}
        return record if isinstance(record, dict) and ("rows" in record or "arrays" in record) else None

    def finished(self, unit: Path) -> list[dict] | None:
        """The metric rows of a finished unit, in the order an uninterrupted run writes them; else None."""
        record = self.record(unit)
        if record is None:
            return None
        if "rows" in record:
            return record["rows"]
        try:  # a vectorised unit depends on no other: a damaged one is simply done again
            self.verify(unit, only=[record["arrays"]])
            with np.load(unit / record["arrays"]) as f:
                arrays = {m: f[m] for m in record["metrics"]}
        except (BadInput, OSError, ValueError, KeyError) as e:
            self.log(f"{unit}: its metrics cannot be trusted ({e}); recomputing it")
            return None
        seeds, policy, group = record["seeds"], record["policy"], record.get("group", len(record["seeds"]))
        return [dict(policy=policy, seed=seeds[i], iteration=n + 1, metric=m, value=float(arrays[m][i, n]))
                for lo in range(0, len(seeds), group) for n in range(record["iterations"])
                for i in range(lo, min(lo + group, len(seeds))) for m in record["metrics"]
                if not np.isnan(arrays[m][i, n])]  # NaN: no value that generation (a selection's, after the last)

    def verify(self, unit: Path, only: list[str] | None = None, record_name: str = RECORD) -> None:
        """Check the files a finished unit recorded against their checksums: BadInput naming the first that
        is missing or changed, and what to do."""
        record = read_json(unit / record_name) if record_name != RECORD else self.record(unit)
        for name, digest in (record or {}).get("files", {}).items():
            if only is not None and name not in only:
                continue
            path = unit / name
            if not path.is_file():
                why = "is missing"
            elif sha256(path) != digest:
                why = "has changed since its generation finished (truncated, overwritten or damaged)"
            else:
                continue
            raise BadInput(f"{path} {why}; move {unit} and the later generations of its chain out of the run "
                           f"directory and run the same command again to recompute them")

    def finish(self, unit: Path, rows: list[dict]) -> None:
        """Mark a generation finished (atomically): its rows and its files' checksums; append the rows."""
        atomic_write_json(unit / RECORD, {"rows": rows, "files": checksums(unit)})
        self.append_rows(rows)

    def finish_batch(self, unit: Path, policy: str, seeds: list[int], arrays: dict[str, np.ndarray], group: int) -> None:
        """Mark a vectorised policy finished: its metrics as arrays (seeds, iterations), whose rows were
        appended as they were made: `group` seeds at a time, generation by generation."""
        atomic_save_npz(unit / ARRAYS, **arrays)
        iterations = next(iter(arrays.values())).shape[1]
        atomic_write_json(unit / RECORD, {"policy": policy, "seeds": list(seeds), "iterations": iterations, "group": group,
                                          "metrics": list(arrays), "arrays": ARRAYS, "files": checksums(unit)})

    def fitted(self, gen_dir: Path) -> bool:
        """Whether this generation's model was saved whole (its fit.json's checksums hold)."""
        if not (gen_dir / FIT_RECORD).exists():
            return False
        try:
            self.verify(gen_dir, record_name=FIT_RECORD)
        except (BadInput, ValueError, OSError) as e:
            self.log(f"{gen_dir}: the saved model cannot be trusted ({e}); fitting it again")
            return False
        return True

    def record_fit(self, gen_dir: Path) -> None:
        atomic_write_json(gen_dir / FIT_RECORD, {"files": checksums(gen_dir)})

    # -- metrics.jsonl and run.log ----------------------------------------------------------------------------
    def append(self, lines: list[str]) -> None:
        self.append_text("".join(line + "\n" for line in lines))

    def append_rows(self, rows: list[dict]) -> None:
        self.append([row_line(**r) for r in rows])

    def append_text(self, text: str) -> None:
        """Append whole metric lines, newline-ended."""
        if not self.rows_here:
            return
        self.appended += text.count("\n")
        self._metrics.write(text)
        self._metrics.flush()

    def reset_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl with the rows of every finished unit, in the canonical order."""
        if self._metrics:
            self._metrics.close()
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(row_line(**r) + "\n" for r in rows).encode())
        self.appended = 0
        self._metrics = os.fdopen(os.open(self.path / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "a")

    def log(self, line: str) -> None:
        with os.fdopen(os.open(self.path / "run.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a") as f:
            f.write(f"{now()} {line}\n")


def _read_manifest(manifest: Path) -> dict:
    try:
        old = read_json(manifest)
    except OSError as e:
        raise BadInput(f"{manifest} cannot be read ({e.strerror}); use a new --out") from None
    except (ValueError, RecursionError):
        raise BadInput(f"{manifest} is corrupt; use a new --out") from None
    if not isinstance(old, dict) or not isinstance(old.get("config_hash"), str):
        raise BadInput(f"{manifest} is not a modelcollapse manifest; use a new --out")
    return old


class RunView(RunDir):
    """The run directory as the other ranks of a data-parallel run see it: they read what rank 0 writes
    (finished generations, models, samples) and write nothing, not even the lock, manifest, metrics or log."""

    writer = False

    def __enter__(self) -> "RunView":
        return self

    def __exit__(self, exc_type, exc, tb):
        return False

    def finish(self, unit: Path, rows: list[dict]) -> None:
        pass

    def finish_batch(self, unit, policy, seeds, arrays, group) -> None:
        pass

    def record_fit(self, gen_dir: Path) -> None:
        pass

    def append(self, lines: list[str]) -> None:
        pass

    def append_text(self, text: str) -> None:
        pass

    def reset_metrics(self, rows: list[dict]) -> None:
        pass

    def log(self, line: str) -> None:
        pass
