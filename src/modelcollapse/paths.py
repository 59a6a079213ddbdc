"""Paths a command is given, checked before anything is read from or written to them: bad ones are BadInput."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from modelcollapse.errors import BadInput

log = logging.getLogger("modelcollapse")


def regular_file(path: Path, what: str) -> Path:
    """`path` when it is a regular file (links followed), else BadInput naming it. Checked before it is
    opened: reading a FIFO waits for a writer for ever, and a device such as /dev/zero never ends."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} not found: {path}")
    if not path.is_file():
        raise BadInput(f"{what} is not a regular file: {path}")
    return path


def out_dir(path: Path, flag: str = "--out") -> Path:
    """`path` when it is a directory this process can write in, or can be made one; else BadInput."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path}: exists and is not a directory")
    there = path
    while not there.exists() and there != there.parent:  # the nearest folder that exists
        there = there.parent
    if not there.is_dir():
        raise BadInput(f"{flag} {path}: {there} is not a directory")
    if not os.access(there, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: {there} is not writable")
    return path


def make_dir(path: Path, flag: str = "--out") -> Path:
    """mkdir -p, with the reason it cannot be made (read-only, not a directory, ...) as BadInput."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    return Path(path)


@contextlib.contextmanager
def staged_dir(out: Path, flag: str = "--out"):
    """Yield a new folder beside `out` to fill; on success it becomes `out` in one rename, on any error it is
    removed: `out` is never left half written. `out` must not exist yet, or be an empty folder."""
    out = out_dir(out, flag)
    if out.is_dir() and any(out.iterdir()):
        raise BadInput(f"{flag} {out}: is a directory that is not empty; give a new one")
    make_dir(out.parent, flag)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.replace(tmp, out)  # onto an empty folder too (POSIX rename replaces an empty directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rebuilding(cache: Path, error: BaseException | str) -> None:
    """Say in one line that a cache entry did not load (truncated, garbage, another version's) and is built
    again: a cache is never a reason to fail."""
    why = (str(error).strip().splitlines() or [type(error).__name__])[0] if isinstance(error, BaseException) else error
    log.warning("rebuilding the cache %s: it does not load (%s)", cache, why)
