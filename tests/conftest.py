import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test gets a cache of its own, so no test reads another's (or the user's) caches."""
    monkeypatch.setenv("MODELCOLLAPSE_CACHE", str(tmp_path_factory.mktemp("cache")))


def cli(*args, cwd=None, timeout=600):
    """Run the real command line in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "modelcollapse", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
