import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' models are tiny: one intra-op thread is faster than two, and far faster when the machine's
    two cores are shared with other jobs (two threads then wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


THREAD_VARS = ("MODELCOLLAPSE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True)
def _thread_choice(monkeypatch):
    """The CLI exports its thread choice into this process's environment (procs.set_threads), and the loop
    splits a run over that many processes: a test that sets it must not hand it to the tests after it. Each
    variable's state is recorded first, so monkeypatch's undo ends on it (delenv alone records nothing for a
    variable that is absent)."""
    for var in THREAD_VARS:
        monkeypatch.setenv(var, os.environ.get(var, ""))
        if not os.environ[var]:
            monkeypatch.delenv(var)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test gets a cache of its own, so no test reads another's (or the user's) caches."""
    monkeypatch.setenv("MODELCOLLAPSE_CACHE", str(tmp_path_factory.mktemp("cache")))


def cli(*args, cwd=None, timeout=600):
    """Run the real command line in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "modelcollapse", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
