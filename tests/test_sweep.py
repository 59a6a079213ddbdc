"""Sweeps: a grid of ordinary runs on the local backend and on a real local Ray, results table, failures,
resume after a kill, the lock, bad input, and the faceted report."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SRC, cli
from modelcollapse.errors import BadInput
from modelcollapse.store import read_metrics

LINREG = """[base]
name = "lin"
family = "linreg"
policies = ["replace", "accumulate"]
iterations = 4
seeds = 3
[base.linreg]
d = 3
[grid]
"linreg.T" = [6, 20]
"linreg.sigma2" = [0.5, 1.0]
"""
LINREG_CELLS = ["T-6_sigma2-0.5", "T-6_sigma2-1.0", "T-20_sigma2-0.5", "T-20_sigma2-1.0"]
LM = """[base]
name = "lm"
family = "lm"
policies = ["accumulate"]
iterations = 2
seeds = 1
device = "cpu"
[base.lm]  # the tiny model of test_lm_family.py on 40 stories: seconds a cell
max_train_stories = 40
test_stories = 10
vocab_size = 512
model = "llama2-tiny"
block_size = 64
batch_size = 8
lr = 5e-3
epochs = 2
max_sample_len = 64
sample_batch = 16
eval_samples = 20
shard_tokens = 1024
[grid]
"lm.temperature" = [1.0, 0.3]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One thread per cell whatever the backend (so both compute the same floats), and a cache of this
    module's own: the fixtures below are module-wide, before any test's own cache is set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MODELCOLLAPSE_CACHE", str(tmp_path_factory.mktemp("sweep-cache")))
        yield


def sweep(tmp_path_factory, name: str, text: str, *args):
    root = tmp_path_factory.mktemp(name)
    (root / "s.toml").write_text(text)
    return root, cli("sweep", root / "s.toml", "--out", root / "out", *args)


@pytest.fixture(scope="module")
def linreg_local(env, tmp_path_factory):
    root, r = sweep(tmp_path_factory, "linreg-local", LINREG, "--workers", "2")
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def lm_local(env, tmp_path_factory):
    root, r = sweep(tmp_path_factory, "lm-local", LM, "--workers", "2")
    assert r.returncode == 0, r.stderr
    return root


def cell_metrics(root, cells):
    return {c: read_metrics(root / "out" / c) for c in cells}


def test_local_linreg_sweep_is_ordinary_runs_and_one_table(linreg_local, tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = linreg_local / "out"
    index = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in index["cells"]] == LINREG_CELLS
    assert all(c["status"] == "done" and c["error"] is None and c["seconds"] > 0 for c in index["cells"])
    assert index["cells"][2]["overrides"] == {"linreg.T": 20, "linreg.sigma2": 0.5}

    table = pq.read_table(out / "results.parquet")
    assert table.column_names == ["cell", "linreg.T", "linreg.sigma2", "policy", "seed", "iteration", "metric", "value"]
    assert table.equals(pacsv.read_csv(out / "results.csv").cast(table.schema))
    rows = table.to_pylist()
    assert len(rows) == 4 * 2 * 3 * 4 * 2  # cells x policies x seeds x iterations x (test_error, test_mse_excess)
    assert {(r["cell"], r["linreg.T"], r["linreg.sigma2"]) for r in rows} == {
        (c, t, s) for c, (t, s) in zip(LINREG_CELLS, [(6, 0.5), (6, 1.0), (20, 0.5), (20, 1.0)])}

    # each cell is the run a user gets from `modelcollapse run` with the same overrides
    base = tmp_path / "base.toml"
    base.write_text(LINREG.split("[grid]")[0].replace("[base]\n", "").replace("[base.linreg]", "[linreg]"))
    for cell, sets in (("T-6_sigma2-0.5", ["linreg.T=6", "linreg.sigma2=0.5"]), ("T-20_sigma2-1.0", ["linreg.T=20", "linreg.sigma2=1.0"])):
        r = cli("run", base, "--out", tmp_path / cell, *(a for s in sets for a in ("--set", s)))
        assert r.returncode == 0, r.stderr
        assert read_metrics(tmp_path / cell) == read_metrics(out / cell)

    # again: every cell is done, so none is launched
    logs = {c: (out / "logs" / f"{c}.log").read_text() for c in LINREG_CELLS}
    r = cli("sweep", linreg_local / "s.toml", "--out", out)
    assert r.returncode == 0 and "4/4 cells (4 already done)" in r.stdout
    assert {c: (out / "logs" / f"{c}.log").read_text() for c in LINREG_CELLS} == logs
    assert all(c["skipped"] for c in json.loads((out / "sweep.json").read_text())["cells"])


def test_report_on_a_sweep_draws_a_panel_per_cell(linreg_local, tmp_path):
    r = cli("report", linreg_local / "out", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    for name in ("index.html", "summary.md", "lin-test_error.png", "lin-test_mse_excess.png", "configs/lin-T-6_sigma2-0.5.toml"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "| cell | T | sigma2 | replace (last iteration) | accumulate (last iteration) |" in summary
    assert all(f"| {c} |" in summary for c in LINREG_CELLS)


def test_an_axis_of_tables_sets_its_keys_together(env, tmp_path_factory, tmp_path):
    text = LINREG.replace('"linreg.T" = [6, 20]', 'size = [{ "linreg.d" = 2, "linreg.T" = 6 }, { "linreg.d" = 4, "linreg.T" = 20 }]')
    root, r = sweep(tmp_path_factory, "linked", text)
    assert r.returncode == 0, r.stderr
    out = root / "out"
    names = ["size-2_sigma2-0.5", "size-2_sigma2-1.0", "size-4_sigma2-0.5", "size-4_sigma2-1.0"]
    assert sorted(c["name"] for c in json.loads((out / "sweep.json").read_text())["cells"]) == sorted(names)
    manifest = json.loads((out / "size-4_sigma2-1.0" / "manifest.json").read_text())
    assert manifest["config"]["linreg"]["d"] == 4 and manifest["config"]["linreg"]["T"] == 20
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.replace('"', "") == "cell,linreg.d,linreg.T,linreg.sigma2,policy,seed,iteration,metric,value"
    r = cli("report", out, "--out", tmp_path / "rep")  # faceted by the two axes, size x sigma2
    assert r.returncode == 0, r.stderr
    assert "| cell | size | sigma2 | replace (last iteration) |" in (tmp_path / "rep" / "summary.md").read_text()


def test_a_grid_crosses_selection_and_real_weight_keys(env, tmp_path_factory):
    """Issue 13: any `select.*` or `real_weight` key is a sweep axis like a family's."""
    text = """[base]
name = "sel"
family = "linreg"
policies = [{name = "mix", real_fraction = 0.5}]
iterations = 3
seeds = 2
[base.select]
name = "k-choice"
score = "verifier"
[base.linreg]
d = 3
T = 12
[grid]
"select.k" = [2, 3]
real_weight = [0.6]
"""
    root, r = sweep(tmp_path_factory, "select-grid", text)
    assert r.returncode == 0, r.stderr
    out = root / "out"
    assert [c["name"] for c in json.loads((out / "sweep.json").read_text())["cells"]] == ["k-2_real_weight-0.6", "k-3_real_weight-0.6"]
    manifest = json.loads((out / "k-3_real_weight-0.6" / "manifest.json").read_text())
    assert manifest["config"]["select"]["k"] == 3 and manifest["config"]["real_weight"] == 0.6
    kept = {c: {r["value"] for r in read_metrics(out / c) if r["metric"] == "select_kept_frac"} for c in ("k-2_real_weight-0.6", "k-3_real_weight-0.6")}
    assert kept == {"k-2_real_weight-0.6": {1 / 2}, "k-3_real_weight-0.6": {1 / 3}}
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.replace('"', "") == "cell,select.k,real_weight,policy,seed,iteration,metric,value"


def test_tiny_lm_grid(lm_local):
    out = lm_local / "out"
    index = json.loads((out / "sweep.json").read_text())
    assert [(c["name"], c["status"]) for c in index["cells"]] == [("temperature-1.0", "done"), ("temperature-0.3", "done")]
    import pyarrow.parquet as pq

    ce = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["metric"] == "test_ce"]
    assert sorted((r["lm.temperature"], r["iteration"]) for r in ce) == [(0.3, 1), (0.3, 2), (1.0, 1), (1.0, 2)]
    gen1 = {r["lm.temperature"]: r["value"] for r in ce if r["iteration"] == 1}
    assert gen1[0.3] == gen1[1.0]  # generation 1 is fit on real data: the temperature only changes what it samples
    assert json.loads((out / "temperature-0.3" / "manifest.json").read_text())["config"]["lm"]["temperature"] == 0.3


def test_ray_backend_gives_the_local_backends_numbers(linreg_local, lm_local, tmp_path_factory):
    """Each cell a task on a real Ray: one the sweep starts itself, and one it joins with --address."""
    ray = pytest.importorskip("ray")
    root, r = sweep(tmp_path_factory, "linreg-ray", LINREG, "--backend", "ray", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert cell_metrics(root, LINREG_CELLS) == cell_metrics(linreg_local, LINREG_CELLS)
    assert (root / "out" / "results.csv").read_bytes() == (linreg_local / "out" / "results.csv").read_bytes()

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        root, r = sweep(tmp_path_factory, "lm-ray", LM, "--backend", "ray", "--address", ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    assert r.returncode == 0, r.stderr
    cells = ["temperature-1.0", "temperature-0.3"]
    assert cell_metrics(root, cells) == cell_metrics(lm_local, cells)
    assert json.loads((root / "out" / "sweep.json").read_text())["backend"] == "ray"


def test_a_failed_cell_is_recorded_and_the_others_finish(env, tmp_path_factory):
    # sigma2 = 1e308 passes validation but its labels overflow: the chain stops on non-finite metrics at run time
    text = LINREG.replace('"linreg.T" = [6, 20]\n"linreg.sigma2" = [0.5, 1.0]', '"linreg.sigma2" = [1e308, 1.0]')
    root, r = sweep(tmp_path_factory, "failing", text, "--workers", "2")
    assert r.returncode == 1
    cells = {c["name"]: c for c in json.loads((root / "out" / "sweep.json").read_text())["cells"]}
    bad = cells["sigma2-1e+308"]
    assert bad["status"] == "failed" and "is not finite" in bad["error"]
    assert "chain(s) stopped on non-finite metrics" in (root / "out" / bad["log"]).read_text()
    assert cells["sigma2-1.0"]["status"] == "done"
    assert "failed: sigma2-1e+308 (failed): " in r.stderr and "1/2 cells" in r.stdout
    assert (root / "out" / "results.csv").read_text().count("\n") == 1 + 2 * 3 * 4 * 2  # the good cell's rows


def test_killed_sweep_resumes_to_the_uninterrupted_result_and_a_second_sweep_is_refused(env, tmp_path_factory):
    text = """[base]
name = "k"
family = "linreg"
policies = ["replace", "accumulate"]
seeds = 2
[base.linreg]
d = 3
T = 10
method = "loop"  # a unit per generation, so the long cell is killed between finished generations
[grid]
iterations = [2, 60]
"""
    root = tmp_path_factory.mktemp("killed")
    (root / "s.toml").write_text(text)
    out = root / "out"
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen([sys.executable, "-m", "modelcollapse", "sweep", root / "s.toml", "--out", out],
                             env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        long_cell = out / "iterations-60" / "accumulate" / "seed-0" / "gen-2" / "metrics.json"
        deadline = time.monotonic() + 120
        while not (out / "sweep.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = cli("sweep", root / "s.toml", "--out", out)  # while the first holds the lock
        assert second.returncode == 2 and second.stderr == f"error: --out {out} is in use by another sweep\n"
        while not long_cell.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the sweep alone: its running cell must die with it
        first.wait()
    assert long_cell.exists()
    with open(out / "iterations-60" / ".lock", "rb") as lock:  # the orphaned cell lets go of its run directory
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the cell outlived its killed sweep"
                time.sleep(0.05)
        fcntl.flock(lock, fcntl.LOCK_UN)
    manifest = json.loads((out / "iterations-60" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"  # stopped mid-cell, by the SIGTERM its dying sweep sent it
    assert not (out / "results.csv").exists()

    r = cli("sweep", root / "s.toml", "--out", out)
    assert r.returncode == 0, r.stderr
    cells = {c["name"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells["iterations-2"]["skipped"] and not cells["iterations-60"]["skipped"]
    assert json.loads((out / "iterations-60" / "manifest.json").read_text())["resumed"]

    whole, r = sweep(tmp_path_factory, "uninterrupted", text)
    assert r.returncode == 0, r.stderr
    names = ["iterations-2", "iterations-60"]
    assert cell_metrics(root, names) == cell_metrics(whole, names)
    assert (out / "results.csv").read_bytes() == (whole / "out" / "results.csv").read_bytes()


def test_bad_sweep_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from modelcollapse.sweep import run_sweep

    s = tmp_path / "s.toml"
    for text, needle in (
        ("[base\n", "is not valid TOML"),
        ("extra = 1\n" + LINREG, "unknown key(s) ['extra']"),
        (LINREG.replace('"linreg.sigma2" = [0.5, 1.0]', '"linreg.sigma2" = [0.5, -1.0]'), "sweep cell T-6_sigma2--1.0: config error: linreg.sigma2"),
        (LINREG.replace('"linreg.T" = [6, 20]', '"linreg.T" = []'), "'grid' must map config keys to non-empty lists"),
        (LINREG.replace('"linreg.T" = [6, 20]', 'size = [{ "linreg.T" = 6 }, 20]'), "grid axis 'size' mixes tables and values"),
    ):
        s.write_text(text)
        r = cli("sweep", s, "--out", tmp_path / "out")
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1, (needle, r.stderr)
        assert not (tmp_path / "out").exists()
    s.write_text(LINREG)
    for args, needle in ((["--address", "auto"], "use it with --backend ray"), (["--workers", "0"], "--workers: must be at least 1")):
        r = cli("sweep", s, "--out", tmp_path / "out", *args)
        assert r.returncode == 2 and needle in r.stderr and not (tmp_path / "out").exists()

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(BadInput, match=r"pip install modelcollapse\[ray\]"):
        run_sweep(s, tmp_path / "out", backend="ray")
    assert not (tmp_path / "out").exists()


def test_resource_keys_leave_the_config_hash_and_old_runs_resume(tmp_path):
    from modelcollapse import config as configlib
    from modelcollapse.loop import run_experiment

    raw = dict(name="old", family="linreg", policies=["replace", "accumulate"], iterations=3, seeds=2, linreg=dict(d=3, T=8))
    assert configlib.from_dict(raw).hash() == "09124525cf472da1"  # cpus/gpus stay out of it (linreg's draws and keys changed in 0.2: a new hash)
    run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    more = configlib.from_dict(dict(raw, cpus=4, gpus=0.5))
    assert more.hash() == "09124525cf472da1"
    run_experiment(more, tmp_path / "run", progress=False)  # the same run: resumes (nothing left to do)
    assert read_metrics(tmp_path / "run") == rows
    with pytest.raises(BadInput, match="gpus"):
        configlib.from_dict(dict(raw, gpus=-1))


# -- issue 12: the store never loses or mislabels a result ---------------------------------------------

SLOW = """[base]
name = "slow"
family = "linreg"
policies = ["replace", "accumulate"]
seeds = 4
iterations = 80
[base.linreg]
d = 3
T = 10
method = "loop"  # a unit per generation: a cell takes a few seconds and stops between generations
[grid]
"linreg.sigma2" = [0.5, 1.0, 2.0]
"""
SLOW_CELLS = ["sigma2-0.5", "sigma2-1.0", "sigma2-2.0"]


def popen_sweep(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "modelcollapse", "sweep", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def processes_under(path) -> list[str]:
    """Command lines of the processes that name `path` (a sweep's cells name their run directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if any(str(path).encode() in a for a in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


@pytest.fixture(scope="module")
def slow_whole(env, tmp_path_factory):
    root, r = sweep(tmp_path_factory, "slow-whole", SLOW, "--workers", "2")
    assert r.returncode == 0, r.stderr
    return root


def test_the_sweep_that_loses_the_race_for_a_new_dir_removes_nothing(env, tmp_path, monkeypatch):
    """Two sweeps start on one new DIR. The second is paused just before it takes the lock, while the first
    takes it and runs; then it is refused and must leave the first sweep's files alone."""
    from modelcollapse import sweep as sweeplib

    (tmp_path / "s.toml").write_text(LINREG)
    out = tmp_path / "out"
    real_lock, first = sweeplib.sweep_lock, []

    @contextlib.contextmanager
    def paused_lock(path):
        first.append(popen_sweep(tmp_path / "s.toml", "--out", out))  # the winner starts while this one waits
        wait_for(out / "sweep.json")  # written under the lock: the first holds it now
        with real_lock(path):
            yield

    monkeypatch.setattr(sweeplib, "sweep_lock", paused_lock)
    with pytest.raises(BadInput, match="is in use by another sweep"):
        sweeplib.run_sweep(tmp_path / "s.toml", out, progress=False)
    assert (out / "sweep.json").exists() and (out / "configs").is_dir()
    stdout, stderr = first[0].communicate(timeout=300)
    assert first[0].returncode == 0, stderr
    assert "4/4 cells" in stdout
    assert (out / "results.csv").read_text().count("\n") == 1 + 4 * 2 * 3 * 4 * 2
    assert all((out / c / "metrics.jsonl").exists() for c in LINREG_CELLS)


def test_cell_names_are_unique_reversible_and_keep_the_plain_ones():
    from modelcollapse.sweep import cell_name, value_name

    # the names earlier sweeps gave, so their directories still resume
    assert cell_name({"lm.model": "gpt2-9m", "lm.temperature": 0.3}) == "model-gpt2-9m_temperature-0.3"
    assert cell_name({"linreg.T": 20}) == "T-20" and cell_name({"linreg.n_test": 10}) == "n_test-10"
    assert cell_name({"linreg.sigma2": -1.0, "flag": True}) == "sigma2--1.0_flag-True"
    # different values, different names: paths, spaces, types
    values = ["a/b.txt", "a_b.txt", "x y", "xy", 1, 1.0, "1", True, "True", '"1"', "", "%41", "A", "é", [1, 2], "[1, 2]"]
    names = [value_name(v) for v in values]
    assert len(set(names)) == len(values), names
    assert value_name("a/b.txt") == "a%2Fb.txt" and value_name("x y") == "x%20y" and value_name("1") == "%221%22"
    assert all(set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.+-%") for n in names)
    # '_' separates the axes, so no value keeps one: two axes read back unambiguously
    assert cell_name({"a": "x_b-y", "b": "z"}) != cell_name({"a": "x", "b": "y_b-z"})
    long = cell_name({"lm.data": "d" * 300})
    assert len(long) == 200 and "~" in long and long != cell_name({"lm.data": "d" * 299 + "e"})


def test_grid_values_that_print_alike_get_cells_of_their_own(tmp_path, monkeypatch):
    from modelcollapse import sweep as sweeplib

    s = tmp_path / "s.toml"
    s.write_text('[base]\nname = "p"\nfamily = "lm"\npolicies = ["replace"]\niterations = 1\nseeds = 1\n'
                 '[grid]\n"lm.data" = ["a/b.txt", "a_b.txt", "x y", "xy"]\n')
    _, cells = sweeplib.load_sweep(s)
    assert [c.name for c in cells] == ["data-a%2Fb.txt", "data-a%5Fb.txt", "data-x%20y", "data-xy"]
    assert [c.config.family_config.data for c in cells] == ["a/b.txt", "a_b.txt", "x y", "xy"]
    monkeypatch.setattr(sweeplib, "value_name", lambda v: "same")  # were two names ever to meet: refused
    with pytest.raises(BadInput, match="would share the cell 'data-same'"):
        sweeplib.load_sweep(s)


def test_an_axis_label_cannot_put_cells_outside_out(env, tmp_path):
    escape = tmp_path / "escaped"  # an absolute path as the label of an axis of tables
    s = tmp_path / "s.toml"
    s.write_text(LINREG.replace('"linreg.T" = [6, 20]', f'"{escape}" = [{{ "linreg.T" = 6 }}, {{ "linreg.T" = 20 }}]')
                 .replace("iterations = 4", "iterations = 2"))
    r = cli("sweep", s, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob("escaped*")) and not list(Path(str(escape)).parent.glob("escaped*"))
    cells = [c["name"] for c in json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"]]
    assert all((tmp_path / "out" / c / "manifest.json").exists() and "/" not in c for c in cells)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        cells + [".sweep.lock", "configs", "logs", "results.csv", "results.parquet", "sweep.json"])


def test_a_done_cell_with_a_damaged_table_is_run_again(linreg_local, tmp_path):
    """A finished cell's metrics.jsonl deleted, cut mid-line, or short by whole lines: the sweep says so, the
    cell's run rebuilds it, and results.csv ends as the undamaged sweep's."""
    out = tmp_path / "out"
    shutil.copytree(linreg_local / "out", out)
    (out / LINREG_CELLS[0] / "metrics.jsonl").unlink()
    cut = out / LINREG_CELLS[1] / "metrics.jsonl"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2 + 7])
    short = out / LINREG_CELLS[2] / "metrics.jsonl"
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:-3]))
    (out / "results.csv").unlink()
    r = cli("sweep", linreg_local / "s.toml", "--out", out)
    assert r.returncode == 0, r.stderr
    for cell in LINREG_CELLS[:3]:
        assert f"{cell}: done, but " in r.stderr and "running it again to rebuild it" in r.stderr
    assert "4/4 cells (1 already done)" in r.stdout
    assert (out / "results.csv").read_bytes() == (linreg_local / "out" / "results.csv").read_bytes()
    assert cell_metrics(tmp_path, LINREG_CELLS) == cell_metrics(linreg_local, LINREG_CELLS)


def test_the_results_table_names_a_damaged_file_and_leaves_out_only_a_torn_last_line(linreg_local, tmp_path):
    from modelcollapse.sweep import load_sweep, write_results

    out = tmp_path / "out"
    shutil.copytree(linreg_local / "out", out)
    _, cells = load_sweep(linreg_local / "s.toml")
    for c in cells:
        c.status = "done"
    cells[3].status = "failed"  # a cell killed while appending a row: its next run rebuilds the file
    torn = out / LINREG_CELLS[3] / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"policy": "replace", "se')
    write_results(out, cells)
    assert (out / "results.csv").read_bytes() == (linreg_local / "out" / "results.csv").read_bytes()
    damaged = out / LINREG_CELLS[1] / "metrics.jsonl"
    lines = damaged.read_text().splitlines(keepends=True)
    damaged.write_text("".join(lines[:5] + ["garbage\n"] + lines[5:]))
    with pytest.raises(BadInput, match=f"{damaged} line 6 is damaged; run the sweep again"):
        write_results(out, cells)


@pytest.mark.parametrize("backend,sig", [("local", signal.SIGINT), ("local", signal.SIGTERM), ("ray", signal.SIGTERM)])
def test_an_interrupted_sweep_stops_its_cells_writes_what_is_finished_and_resumes(slow_whole, tmp_path, backend, sig):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (to the sweep alone, as
    a scheduler sends it) while two cells run and one waits."""
    if backend == "ray":
        pytest.importorskip("ray")
    (tmp_path / "s.toml").write_text(SLOW)
    out = tmp_path / "out"
    proc = popen_sweep(tmp_path / "s.toml", "--out", out, "--workers", "2", "--backend", backend, start_new_session=True)
    wait_for(out / SLOW_CELLS[0] / "replace" / "seed-0" / "gen-2" / "metrics.json")
    wait_for(out / SLOW_CELLS[1] / "replace" / "seed-0" / "gen-1" / "metrics.json")
    assert len(processes_under(out)) == 3  # the sweep and its two running cells
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.splitlines()[-1] == f"interrupted ({sig.name}): run the same command again to resume", stderr
    assert "Traceback" not in stderr
    assert processes_under(out) == []  # every cell stopped before the sweep ended
    cells = {c["name"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert [cells[c]["status"] for c in SLOW_CELLS] == ["interrupted", "interrupted", "pending"]
    for c in SLOW_CELLS[:2]:
        assert json.loads((out / c / "manifest.json").read_text())["status"] == "interrupted"  # stopped through its handler
    rows = (out / "results.csv").read_text().splitlines()
    assert 1 < len(rows) < (slow_whole / "out" / "results.csv").read_text().count("\n")  # what was finished

    r = cli("sweep", tmp_path / "s.toml", "--out", out, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert cell_metrics(tmp_path, SLOW_CELLS) == cell_metrics(slow_whole, SLOW_CELLS)
    assert (out / "results.csv").read_bytes() == (slow_whole / "out" / "results.csv").read_bytes()


@pytest.mark.parametrize("text", ["[]", "null", "{not json", '{"name": "x", "cells": []}'])
def test_a_damaged_sweep_index_is_named_in_one_line(tmp_path, text):
    s = tmp_path / "s.toml"
    s.write_text(LINREG)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(text)
    for args in (("sweep", s, "--out", out), ("report", out, "--out", tmp_path / "rep")):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{out / 'sweep.json'} is not a sweep index" in r.stderr
    assert [p.name for p in out.iterdir()] == ["sweep.json"] and (out / "sweep.json").read_text() == text
    assert not (tmp_path / "rep").exists()


def test_an_out_that_cannot_be_a_directory_is_one_line(linreg_local, tmp_path):
    (tmp_path / "file").write_text("keep me")
    cases = [(tmp_path / "file", "exists and is not a directory"), (tmp_path / "file" / "sub", "is not a directory")]
    if Path("/proc/sys").is_dir():  # not writable even by root
        cases.append((Path("/proc/sys/modelcollapse-test"), "/proc/sys"))
    for out, needle in cases:
        for args in (("sweep", linreg_local / "s.toml", "--out", out), ("report", linreg_local / "out", "--out", out)):
            r = cli(*args)
            assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_dir_name_that_is_not_utf8_prints(env, tmp_path):
    # an explicit encoding makes Python's streams strict (a UTF-8 locale alone would pass the bytes through)
    environ = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONIOENCODING="utf-8")
    (tmp_path / "s.toml").write_text(LINREG.replace('"linreg.T" = [6, 20]', '"linreg.T" = [6]').replace("[0.5, 1.0]", "[0.5]"))
    out, rep = bytes(tmp_path) + b"/out-\xff", bytes(tmp_path) + b"/rep-\xfe"
    for args in ([b"sweep", bytes(tmp_path / "s.toml"), b"--out", out], [b"report", out, b"--out", rep],
                 [b"run", out + b"/configs/T-6_sigma2-0.5.toml", b"--out", out + b"/run"]):
        r = subprocess.run([sys.executable, "-m", "modelcollapse", *args], capture_output=True, env=environ, timeout=300)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
        assert r.stdout.startswith((b"done: ", b"report: "))
    assert os.path.exists(rep + b"/index.html") and os.path.exists(out + b"/results.csv")
