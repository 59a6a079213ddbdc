"""The run directory: manifest, metrics, per-generation artefacts; atomic writes, a lock, resume.

    DIR/manifest.json                      resolved config, its hash, version, start/end, status
    DIR/metrics.jsonl                      {"policy","seed","iteration","metric","value"} per line
    DIR/<policy>/seed-<s>/gen-<n>/         that generation's model, synthetic data, metrics.json

A generation is finished when its `metrics.json` exists: it is written last, by rename, so a run killed at
any moment leaves only finished generations and at most one partial one. On resume `metrics.jsonl` is
rebuilt from the finished generations, so it ends identical to an uninterrupted run's.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from modelcollapse import __version__
from modelcollapse.errors import BadInput


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


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
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
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


class RunDir:
    """An open, locked run directory. Use `RunDir.open(...)` as a context manager."""

    writer = True

    def __init__(self, path: Path, config: dict, config_hash: str):
        self.path = Path(path)
        self.config = config
        self.config_hash = config_hash
        self._lock = None
        self._metrics = None

    @classmethod
    def check(cls, path: Path, config_hash: str) -> None:
        """Refuse, before anything is written, a DIR that holds a different experiment or no run at all."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise BadInput(f"--out {path}: exists and is not a directory")
        manifest = path / "manifest.json"
        if manifest.exists():
            try:
                old = read_json(manifest)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadInput(f"{manifest} is corrupt; use a new --out") from None
            if old.get("config_hash") != config_hash:
                raise BadInput(
                    f"--out {path} holds a run of a different config (hash {old.get('config_hash')}, "
                    f"this one {config_hash}); use a new --out to keep both"
                )
        elif path.is_dir() and any(p.name != ".lock" for p in path.iterdir()):
            raise BadInput(f"--out {path} is a non-empty directory without a manifest; use a new --out")

    def __enter__(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BadInput(f"--out {self.path} is in use by another modelcollapse process") from None
        manifest = self.path / "manifest.json"
        old = read_json(manifest) if manifest.exists() else {}
        self.manifest = {
            "config": self.config,
            "config_hash": self.config_hash,
            "version": __version__,
            "started": old.get("started", now()),
            "resumed": old.get("resumed", []) + ([now()] if old else []),
            "ended": None,
            "status": "running",
        }
        atomic_write_json(manifest, self.manifest)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._metrics:
            self._metrics.close()
        self.manifest["ended"] = now()
        self.manifest["status"] = "done" if exc_type is None else "failed"
        if exc_type is not None:
            self.manifest["error"] = f"{exc_type.__name__}: {exc}"
        atomic_write_json(self.path / "manifest.json", self.manifest)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        return False

    # -- per-generation units ------------------------------------------------------------------------
    def gen_dir(self, policy: str, seed: int, n: int) -> Path:
        return self.path / policy / f"seed-{seed}" / f"gen-{n}"

    @staticmethod
    def finished(unit_dir: Path) -> list[dict] | None:
        """The metric rows of a finished unit (a generation, or a vectorised block), else None."""
        done = unit_dir / "metrics.json"
        return read_json(done) if done.exists() else None

    def finish(self, unit_dir: Path, rows: list[dict]) -> None:
        """Mark a unit finished (atomically) and append its rows to metrics.jsonl."""
        lines = [json.dumps(r) for r in rows]
        atomic_write_bytes(unit_dir / "metrics.json", ("[" + ",\n".join(lines) + "]\n").encode())
        self._metrics.write("".join(line + "\n" for line in lines))
        self._metrics.flush()

    def reset_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl with the rows of every finished unit, in the canonical order."""
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        self._metrics = open(self.path / "metrics.jsonl", "a")

    def log(self, line: str) -> None:
        with open(self.path / "run.log", "a") as f:
            f.write(f"{now()} {line}\n")


class RunView(RunDir):
    """The run directory as the other ranks of a data-parallel run see it: they read what rank 0 writes
    (finished generations, models, samples) and write nothing, not even the lock, manifest, metrics or log."""

    writer = False

    def __enter__(self) -> "RunView":
        return self

    def __exit__(self, exc_type, exc, tb):
        return False

    def finish(self, unit_dir: Path, rows: list[dict]) -> None:
        pass

    def reset_metrics(self, rows: list[dict]) -> None:
        pass

    def log(self, line: str) -> None:
        pass
