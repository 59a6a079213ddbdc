"""Data-parallel `lm` runs: `modelcollapse run --nproc 2` (gloo, 2 CPU processes) against one process.

Tolerance. Two processes split each batch's rows between them and add their gradients in an all-reduce, so
sums are taken in another order than one process's matmuls take them: one step's gradients agree to ~4e-7
relative, not bit for bit. Over a fit of the same data, test_ce then agrees to 7.4e-7 nats at most (measured:
six fit seeds of this config, and generations 1 and 2 of the test, 1.4e-7 there); TOL is seven times that.
Two settings keep it that small. lr is 1e-3: at 5e-3 this tiny model's training is chaotic (a 1e-7 relative
nudge of its initial weights moves test_ce by 2e-4, and 1 vs 2 processes differed by 9.5e-4), at 1e-3 the same
nudge moves it by 7e-8. And generation 2 is compared on the same synthetic set: sampling draws a token where a
uniform falls in the model's cumulative distribution, so among ~40k draws one may fall within the models'
difference of a boundary and change that document and the rest of its shard (whole chains differed by 8e-5
in generation 2). The shards are compared on the same model, where sampling is exact whichever rank draws.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import SRC, cli
from modelcollapse import config as configlib
from modelcollapse.families.lm import Family
from modelcollapse.families.lm.shards import TokenSet
from modelcollapse.loop import run_experiment
from modelcollapse.seeding import stream_seed
from modelcollapse.store import read_metrics

TOL = 5e-6  # nats per token; see the module docstring
POLICIES = ("replace", "accumulate+w0.3")  # accumulate with its real examples weighted: both in one policy

CONFIG = """
name = "ddp-tiny"
family = "lm"
policies = ["replace", {name = "accumulate", real_weight = 0.3}]
iterations = 2
seeds = 1
device = "cpu"

[lm]
max_train_stories = 120
test_stories = 30
vocab_size = 512
model = "llama2-tiny"
block_size = 64
batch_size = 8
lr = 1e-3
max_sample_len = 64
sample_batch = 32
eval_samples = 20
shard_tokens = 4096
checkpoint_every = 10
"""

# Installed in every process of a `cli` call through PYTHONPATH: in the ranks other than 0 it records each
# write-like operation (open for writing, rename, mkdir, remove) under the watched run directory.
AUDIT = '''
import os, sys
watched, log = os.environ.get("MC_AUDIT_DIR"), os.environ.get("MC_AUDIT_LOG")
if watched and os.environ.get("RANK", "0") != "0":
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _under(path):
        return not isinstance(path, int) and os.path.abspath(os.fsdecode(path)).startswith(watched)
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") if mode is not None else bool(flags & WRITE)
            bad = writes and _under(path)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
            bad = _under(args[0]) or (event == "os.rename" and _under(args[1]))
        else:
            return
        if bad:
            with open(log, "a") as f:
                f.write(f"{event} {args[:2]}\\n")
    with open(log, "a") as f:
        f.write("watching\\n")
    sys.addaudithook(_hook)
'''


def ce_of(run: Path) -> dict:
    return {(r["policy"], r["iteration"]): r["value"] for r in read_metrics(run) if r["metric"] == "test_ce"}


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.name != "run.log"}


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if (_stat(stat) or [0, 0])[1] == str(pid)]


def alive(pid: int) -> bool:
    """Running, not dead or a zombie (whose lock on DIR is released)."""
    return (_stat(Path(f"/proc/{pid}/stat")) or ["Z"])[0] != "Z"


def _stat(path: Path) -> list[str] | None:
    """State, parent and the rest of a /proc/<pid>/stat, after the command name; None once it is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def shards(folder: Path) -> list[Path]:
    return sorted({p.with_name(p.name.split(".")[0]) for p in folder.glob("shard-*.npy")})


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "tiny-lm.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config run by one process (in this one) and by `--nproc 2`, whose rank 1 is audited."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg_file = tmp / "tiny-lm.toml"
    cfg_file.write_text(CONFIG)
    hooks = tmp / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELCOLLAPSE_CACHE", str(tmp / "cache"))
        one = run_experiment(configlib.load(cfg_file, []), tmp / "one", progress=False)
        mp.setenv("PYTHONPATH", str(hooks))
        mp.setenv("MC_AUDIT_DIR", str(tmp / "two"))
        mp.setenv("MC_AUDIT_LOG", str(tmp / "audit.log"))
        done = cli("run", cfg_file, "--out", tmp / "two", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    return SimpleNamespace(cfg=configlib.load(cfg_file, []), one=one, two=tmp / "two", done=done, audit=tmp / "audit.log")


def test_two_processes_match_one(runs, tmp_path):
    one, two = runs.one, runs.two
    assert runs.done.stdout.strip() == f"done: {two}"  # rank 0 alone prints
    assert runs.audit.read_text() == "watching\n"  # rank 1 ran, watched, and never wrote into DIR

    # the same files, the same generation-1 model up to float rounding
    assert files(two) == files(one)
    assert json.loads((two / "manifest.json").read_text())["status"] == "done"
    a, b = ce_of(one), ce_of(two)
    assert a.keys() == b.keys()
    for policy in POLICIES:
        assert abs(a[(policy, 1)] - b[(policy, 1)]) < TOL
    assert json.loads((two / "replace" / "seed-0" / "gen-1" / "resources.json").read_text())["processes"] == 2

    # the synthetic sets: exactly the real training size, and, resampled in one process from rank 0's saved
    # model, the same tokens shard for shard, whichever rank drew them (10 shards: both ranks drew several)
    family = Family(runs.cfg.family_config, device="cpu")
    real = family.real_data("train", 0)
    gen1 = two / "replace" / "seed-0" / "gen-1"
    drawn = shards(gen1 / "sample")
    assert len(drawn) > 4 and TokenSet.open(drawn).n_tokens == real.n_tokens
    again = tmp_path / "again"
    family.sample(family.load_model(gen1), real.n_tokens, real, stream_seed(0, "replace", 2, "sample"), again)
    assert [p.name for p in shards(again / "sample")] == [p.name for p in drawn]
    for stem in drawn:
        for part in ("tokens", "starts"):
            theirs = np.load(again / "sample" / f"{stem.name}.{part}.npy")
            assert np.array_equal(np.load(stem.with_name(f"{stem.name}.{part}.npy")), theirs), stem.name

    # generation 2 trained by two processes on their synthetic set = one process on the same set: resume a
    # copy without generation 2 in one process
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for policy in POLICIES:  # the weighted one too: its per-token loss weights split over the ranks with the targets
        shutil.rmtree(resumed / policy / "seed-0" / "gen-2")
    run_experiment(runs.cfg, resumed, progress=False)
    c = ce_of(resumed)
    for policy in POLICIES:
        assert c[(policy, 1)] == b[(policy, 1)]
        assert abs(c[(policy, 2)] - b[(policy, 2)]) < TOL


def test_killed_two_process_run_resumes(runs, cfg_file, tmp_path):
    """The launcher killed (kill -9) in the middle of generation 2's fit, once it has a checkpoint: the ranks
    end with it; resumed under --nproc 2, both take the fit up from rank 0's checkpoint, and the run ends as
    an uninterrupted one."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "modelcollapse", "run", str(cfg_file), "--nproc", "2", "--out", str(cut)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (cut / "replace" / "seed-0" / "gen-2" / "fit.ckpt.safetensors").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        ranks = children(proc.pid)
        proc.kill()
        proc.wait()
    assert len(ranks) == 2
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in ranks):  # in sessions of their own: only their end-with-the-launcher ends them
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.05)
    assert not (cut / "accumulate+w0.3" / "seed-0" / "gen-2" / "metrics.json").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = ce_of(runs.two), ce_of(cut)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < TOL for k in a)
    assert json.loads((cut / "manifest.json").read_text())["status"] == "done"


def test_bad_input_is_one_line_and_exit_2(cfg_file, tmp_path):
    # found before any process starts: a batch that does not split over the processes, a family without DDP
    bad = cli("run", cfg_file, "--out", tmp_path / "odd", "--nproc", "3")  # batch_size 8 over 3 processes
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "'batch_size' parameter of lm must be a multiple of the number of processes (3)" in bad.stderr
    linreg = tmp_path / "linreg.toml"
    linreg.write_text('family = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n[linreg]\nd = 2\nT = 5\n')
    bad = cli("run", linreg, "--out", tmp_path / "lin", "--nproc", "2")
    assert bad.returncode == 2 and bad.stderr == "error: family linreg does not train data-parallel; run it without --nproc or torchrun\n"
    # found by the ranks: rank 0 reports it, the other stops with it quietly
    bad = cli("run", cfg_file, "--out", tmp_path / "nodata", "--nproc", "2", "--set", f"lm.data={tmp_path / 'missing.txt'}")
    assert bad.returncode == 2 and bad.stderr == f"error: data path {tmp_path / 'missing.txt'} does not exist\n"
    assert not any((tmp_path / name).exists() for name in ("odd", "lin", "nodata"))
