"""The loop and the run directory: determinism, fast path = generic loop, resume after a kill, lock."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import SRC, cli
from modelcollapse import config as configlib
from modelcollapse import loop
from modelcollapse.errors import BadInput
from modelcollapse.families import linreg
from modelcollapse.loop import SHARED, run_experiment
from modelcollapse.policies import from_spec
from modelcollapse.seeding import stream_keys
from modelcollapse.store import RunDir, read_json

POLICIES = ["replace", "accumulate", "replace-grown", "accumulate-subsample",
            {"name": "mix", "real_fraction": 0.5}, {"name": "fresh", "real_fraction": 0.25}]


def make(method="loop", policies=POLICIES, seeds=3, iterations=4, **linreg):
    raw = {"name": "t", "family": "linreg", "policies": policies, "iterations": iterations, "seeds": seeds,
           "linreg": {"d": 3, "T": 12, "sigma2": 0.5, "n_test": 50, "method": method, **linreg}}
    return configlib.from_dict(raw)


def lines(path):
    return (path / "metrics.jsonl").read_text().splitlines()


def test_run_directory_follows_the_contract(tmp_path):
    out = run_experiment(make(), tmp_path / "run", progress=False)
    manifest = read_json(out / "manifest.json")
    assert manifest["status"] == "done" and manifest["config_hash"] == make().hash()
    assert manifest["config"]["linreg"]["T"] == 12 and manifest["started"] and manifest["ended"]
    rows = [json.loads(x) for x in lines(out)]
    assert {tuple(sorted(r)) for r in rows} == {("iteration", "metric", "policy", "seed", "value")}
    labels = ["replace", "accumulate", "replace-grown", "accumulate-subsample", "mix-0.5", "fresh-0.25"]
    assert manifest["policy_labels"] == labels
    assert len(rows) == len(labels) * 3 * 4 * 2
    for label in labels:
        for n in range(1, 5):
            gen = out / label / "seed-2" / f"gen-{n}"
            assert (gen / "w_hat.npy").exists() and (gen / "metrics.json").exists()
            resources = read_json(gen / "resources.json")
            assert resources["seconds"] >= 0 and resources["peak_rss_mb"] > 0
            assert (gen / "synthetic.npz").exists() == (n < 4)  # the last model need not sample
    family = linreg.Family(make().family_config)
    grown = family.load_sample(out / "replace-grown" / "seed-0" / "gen-2")
    assert family.size(grown) == 3 * 12  # generation 3 of replace-grown trains on 3·T samples of model 2
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "manifest.json", out / "replace" / "seed-0" / "gen-1" / "w_hat.npy"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by whoever may read the user's files


def test_same_config_gives_bit_identical_metrics(tmp_path):
    a = run_experiment(make(), tmp_path / "a", progress=False)
    b = run_experiment(make(), tmp_path / "b", progress=False)
    assert lines(a) == lines(b)


def test_generation_one_is_shared_by_every_policy(tmp_path):
    out = run_experiment(make(), tmp_path / "run", progress=False)
    w = [np.load(out / p / "seed-1" / "gen-1" / "w_hat.npy") for p in ("replace", "accumulate", "mix-0.5")]
    assert np.array_equal(w[0], w[1]) and np.array_equal(w[0], w[2])


def test_fast_path_equals_the_generic_loop_on_the_same_draws(tmp_path):
    slow = run_experiment(make("loop", seeds=5, iterations=6), tmp_path / "loop", progress=False)
    fast = run_experiment(make("fast", seeds=5, iterations=6), tmp_path / "fast", progress=False)
    a, b = [{(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in map(json.loads, lines(p))} for p in (slow, fast)]
    assert a.keys() == b.keys() and len(a) == 6 * 5 * 6 * 2
    assert max(abs(a[k] - b[k]) for k in a) < 1e-9
    assert not list(fast.glob("*/seed-*"))  # one unit per policy, no folder per seed and generation


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_fast_path_equals_plain_ols_on_the_stacked_labels(policy):
    """The batched fit (cached XᵀX and Xᵀy of lazily drawn labellings) against np.linalg.lstsq on every
    label of the training set, materialised from the same streams, generation by generation."""
    policy, seeds, N = from_spec(policy), [3, 7], 5
    family = linreg.Family(make().family_config)
    real = family.real_data("train", np.array(seeds))
    test = family.real_data("test", np.array(seeds))
    pool = [real]
    for n in range(1, N + 1):
        key = SHARED if n == 1 else policy.label
        train = policy.training_set(n, pool, family, stream_keys(seeds, key, n, "policy"),
                                    fresh_real=lambda: family.real_data("train", np.array(seeds), draw=n - 1))
        fast = family.fit(train, None, None).w_hat_
        _, x, y = train.materialise()
        assert x.shape[1] == family.size(train)
        plain = np.stack([np.linalg.lstsq(x[i], y[i], rcond=None)[0] for i in range(len(seeds))])
        assert np.abs(fast - plain).max() < 1e-9
        errors = family.evaluate(linreg.Fitted(plain), test, None, None)["test_error"]
        assert np.allclose(errors, np.sum((plain - test.w_star) ** 2, -1))
        pool.append(family.sample(linreg.Fitted(fast), policy.synthetic_size(n + 1, 12), real, stream_keys(seeds, policy.label, n + 1, "sample"), None))


@pytest.mark.parametrize("size", [12, 36, 7, 2, 17], ids=["T", "3T", "T-5 rows", "fewer rows than d", "T+5"])
def test_synthetic_labels_are_iid_gaussian_noise_around_the_model(size):
    """However a labelling's noise is drawn (projected through the design, per copy of a row, or directly),
    its labels must be x·ŵ + N(0, σ²), independent across rows and copies, given the design: here one
    design (seed 0) and 4,000 independent streams."""
    from scipy import stats

    family = linreg.Family(linreg.Config(d=3, T=12, sigma2=0.5, n_test=10))
    seeds = np.zeros(4000, dtype=np.int64)  # the same design X for every stream
    real = family.real_data("train", seeds)
    w = np.random.default_rng(0).standard_normal((len(seeds), 3))
    data = family.sample(linreg.Fitted(w), size, real, stream_keys(np.arange(4000), "t", 2, "sample"), None)
    rows, x, y = data.materialise()
    eps = (y - np.einsum("snd,sd->sn", x, w)) / np.sqrt(0.5)  # (S, size): copy c of row r at c·12 + r
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and np.allclose(eps.var(0), 1, atol=0.1)
    if size > 1:
        corr = np.corrcoef(eps.T)
        assert np.abs(corr - np.eye(size)).max() < 4.5 / np.sqrt(len(seeds))
    assert stats.kstest(eps.ravel(), "norm").pvalue > 1e-3
    ols = family.fit(data, None, None).w_hat_  # and the fit from the cached sums is OLS on these labels
    assert size < 3 or np.abs(ols[:5] - np.stack([np.linalg.lstsq(x[i], y[i], rcond=None)[0] for i in range(5)])).max() < 1e-9


def test_resume_after_a_failure_ends_with_the_uninterrupted_metrics(tmp_path, monkeypatch):
    from modelcollapse.families import linreg

    whole = run_experiment(make(), tmp_path / "whole", progress=False)
    calls, real_fit = [0], linreg.Family.fit

    def flaky_fit(self, *a, **k):
        calls[0] += 1
        if calls[0] == 30:
            raise RuntimeError("the machine went away")
        return real_fit(self, *a, **k)

    monkeypatch.setattr(linreg.Family, "fit", flaky_fit)
    with pytest.raises(RuntimeError):
        run_experiment(make(), tmp_path / "cut", progress=False)
    assert read_json(tmp_path / "cut" / "manifest.json")["status"] == "failed"
    monkeypatch.setattr(linreg.Family, "fit", real_fit)
    run_experiment(make(), tmp_path / "cut", progress=False)
    assert lines(tmp_path / "cut") == lines(whole)
    manifest = read_json(tmp_path / "cut" / "manifest.json")
    assert manifest["status"] == "done" and len(manifest["resumed"]) == 1


def test_resume_after_kill_9_ends_with_the_uninterrupted_metrics(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('name = "k"\nfamily = "linreg"\npolicies = ["replace", "accumulate"]\niterations = 5\n'
                   'seeds = 60\n[linreg]\nd = 3\nT = 12\nmethod = "loop"\n')
    assert cli("run", cfg, "--out", tmp_path / "whole").returncode == 0
    env = dict(__import__("os").environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(tmp_path / "cut")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "cut").glob("*/seed-*/gen-*/metrics.json"))) < 40 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "cut").glob("*/seed-*/gen-*/metrics.json")))
    assert 0 < done < 600, "the run should have been killed part-way"
    assert read_json(tmp_path / "cut" / "manifest.json")["status"] == "running"
    again = cli("run", cfg, "--out", tmp_path / "cut")
    assert again.returncode == 0, again.stderr
    assert lines(tmp_path / "cut") == lines(tmp_path / "whole")


def test_finished_run_is_left_as_it_is(tmp_path):
    out = run_experiment(make(), tmp_path / "run", progress=False)
    before = (out / "metrics.jsonl").read_bytes()
    mtime = (out / "replace" / "seed-0" / "gen-1" / "w_hat.npy").stat().st_mtime_ns
    run_experiment(make(), out, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before
    assert (out / "replace" / "seed-0" / "gen-1" / "w_hat.npy").stat().st_mtime_ns == mtime


def test_a_different_config_is_refused_and_nothing_is_touched(tmp_path):
    out = run_experiment(make(), tmp_path / "run", progress=False)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(BadInput, match="different config"):
        run_experiment(make(sigma2=2.0), out, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before
    assert read_json(out / "manifest.json")["status"] == "done"


def test_a_second_process_in_the_same_dir_is_refused(tmp_path):
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text('name = "t"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n')
    first = configlib.load(cfg_file)
    with RunDir(tmp_path / "run", first.resolved(), first.hash()):
        r = cli("run", cfg_file, "--out", tmp_path / "run")
    assert r.returncode == 2 and "in use by another" in r.stderr and "Traceback" not in r.stderr


def test_fresh_without_enough_real_data_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from modelcollapse.families import DataUnavailable, linreg

    real = linreg.Family.real_data

    def finite(self, split, seed, draw=0):
        if draw > 2:
            raise DataUnavailable("linreg: only three real draws in this test")
        return real(self, split, seed, draw)

    monkeypatch.setattr(linreg.Family, "real_data", finite)
    run_experiment(make(policies=[{"name": "fresh", "real_fraction": 0.5}], iterations=3), tmp_path / "ok", progress=False)
    with pytest.raises(BadInput, match="only three real draws"):
        run_experiment(make(policies=[{"name": "fresh", "real_fraction": 0.5}], iterations=5), tmp_path / "no", progress=False)
    assert not (tmp_path / "no").exists()


def test_a_vectorised_unit_in_groups_of_seeds_equals_one_seed_at_a_time_and_rebuilds_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SEEDS_AT_ONCE", 2)  # 5 seeds: groups of 2, 2 and 1
    fast = run_experiment(make("fast", seeds=5), tmp_path / "fast", progress=False)
    slow = run_experiment(make("loop", seeds=5), tmp_path / "loop", progress=False)
    a, b = [{(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in map(json.loads, lines(p))} for p in (fast, slow)]
    assert a == b
    assert sorted(p.name for p in (fast / "replace" / "all-seeds").glob("seeds-*")) == ["seeds-0", "seeds-2", "seeds-4"]
    before = lines(fast)
    (fast / "metrics.jsonl").write_text("")  # rebuilt from the units' records, in the order they were written
    run_experiment(make("fast", seeds=5), fast, progress=False)
    assert lines(fast) == before


def fit_failing_at(call: int, real_fit=linreg.Family.fit):
    """linreg's fit, raising at its `call`-th call in each process (a forked worker counts its own)."""
    calls = [0]

    def fit(self, *a, **k):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("the machine went away")
        return real_fit(self, *a, **k)

    return fit


def test_seeds_split_over_processes_end_as_one_process_does(tmp_path, monkeypatch):
    """--threads N splits a vectorised run's groups of seeds over N worker processes: metrics.jsonl and every
    unit's record come out byte for byte as one process writes them; a worker's error fails the run, which then
    resumes to the same end; a chain that turns non-finite stops its own unit only."""
    from modelcollapse.procs import THREADS_ENV

    monkeypatch.setattr(loop, "SEEDS_AT_ONCE", 2)  # 5 seeds: groups of 2, 2 and 1, so both workers have some
    one = run_experiment(make("fast", seeds=5, iterations=6), tmp_path / "one", progress=False)
    monkeypatch.setenv(THREADS_ENV, "2")
    two = run_experiment(make("fast", seeds=5, iterations=6), tmp_path / "two", progress=False)
    assert (two / "metrics.jsonl").read_bytes() == (one / "metrics.jsonl").read_bytes()
    for record in one.glob("*/all-seeds/metrics.json"):
        assert record.read_bytes() == (two / record.relative_to(one)).read_bytes()

    real_fit = linreg.Family.fit
    monkeypatch.setattr(linreg.Family, "fit", fit_failing_at(25))
    with pytest.raises(RuntimeError, match="went away"):
        run_experiment(make("fast", seeds=5, iterations=6), tmp_path / "cut", progress=False)
    assert read_json(tmp_path / "cut" / "manifest.json")["status"] == "failed"
    monkeypatch.setattr(linreg.Family, "fit", real_fit)
    run_experiment(make("fast", seeds=5, iterations=6), tmp_path / "cut", progress=False)
    assert lines(tmp_path / "cut") == lines(one)

    def broken_fit(self, train, *a, **k):  # seed 3's accumulate chain diverges in generation 3
        fitted = real_fit(self, train, *a, **k)
        if train.n == 3 * 12 and 3 in train.design.seeds:
            fitted.w_hat_[list(train.design.seeds).index(3)] = np.inf
        return fitted

    monkeypatch.setattr(linreg.Family, "fit", broken_fit)
    with pytest.raises(loop.ChainStopped, match="accumulate gen 3 .seeds 2..3.: test_error is not finite"):
        run_experiment(make("fast", policies=["replace", "accumulate", {"name": "mix", "real_fraction": 0.5}], seeds=5, iterations=6),
                       tmp_path / "stop", progress=False)
    stop = tmp_path / "stop"
    assert (stop / "replace" / "all-seeds" / "metrics.json").exists() and (stop / "mix-0.5" / "all-seeds" / "metrics.json").exists()
    assert not (stop / "accumulate" / "all-seeds" / "metrics.json").exists()
    rows = [json.loads(x) for x in lines(stop)]
    assert {r["policy"] for r in rows} == {"replace", "accumulate", "mix-0.5"}
    assert not [r for r in rows if r["policy"] == "accumulate" and r["seed"] == 4]  # the group after the stop


def test_chains_split_over_processes_end_as_one_process_does(tmp_path, monkeypatch):
    """On the CPU, --threads N runs the generic loop's (policy, seed) chains in N worker processes: every
    generation's record and metrics.jsonl come out as one process writes them, generation 1 is still fit once
    per seed; a worker's error fails the run, which resumes to the same end; a chain that turns non-finite
    stops only itself."""
    import multiprocessing

    from modelcollapse.procs import THREADS_ENV

    real_fit, fits = linreg.Family.fit, tmp_path / "fits"

    def logged_fit(self, train, seed, workdir, *a, **k):  # the workers' fits, as lines of a file
        with open(fits, "a") as f:
            f.write(f"{workdir.name}\n")
        return real_fit(self, train, seed, workdir, *a, **k)

    one = run_experiment(make("loop"), tmp_path / "one", progress=False)
    monkeypatch.setenv(THREADS_ENV, "2")
    monkeypatch.setattr(linreg.Family, "fit", logged_fit)
    two = run_experiment(make("loop"), tmp_path / "two", progress=False)
    assert (two / "metrics.jsonl").read_bytes() == (one / "metrics.jsonl").read_bytes()
    records = sorted(one.glob("*/seed-*/gen-*/metrics.json"))
    assert len(records) == len(POLICIES) * 3 * 4
    for record in records:
        assert read_json(two / record.relative_to(one))["rows"] == read_json(record)["rows"]
    assert fits.read_text().split().count("gen-1") == 3  # generation 1 fit once per seed

    monkeypatch.setattr(linreg.Family, "fit", fit_failing_at(10, real_fit))
    with pytest.raises(RuntimeError, match="went away"):
        run_experiment(make("loop"), tmp_path / "cut", progress=False)
    assert not multiprocessing.active_children()
    assert read_json(tmp_path / "cut" / "manifest.json")["status"] == "failed"
    monkeypatch.setattr(linreg.Family, "fit", real_fit)
    run_experiment(make("loop"), tmp_path / "cut", progress=False)
    assert lines(tmp_path / "cut") == lines(one)

    def broken_fit(self, train, *a, **k):  # accumulate diverges in generation 3, every seed
        fitted = real_fit(self, train, *a, **k)
        if train.n == 3 * 12:
            fitted.w_hat_[...] = np.inf
        return fitted

    monkeypatch.setattr(linreg.Family, "fit", broken_fit)
    with pytest.raises(loop.ChainStopped, match="3 chain.s. stopped.*accumulate seed . gen 3: test_error is not finite"):
        run_experiment(make("loop", policies=["replace", "accumulate"]), tmp_path / "stop", progress=False)
    stop = tmp_path / "stop"
    assert len(list(stop.glob("replace/seed-*/gen-4/metrics.json"))) == 3
    assert len(list(stop.glob("accumulate/seed-*/gen-2/metrics.json"))) == 3 and not list(stop.glob("accumulate/seed-*/gen-3/metrics.json"))
    assert {json.loads(x)["policy"] for x in lines(stop)} == {"replace", "accumulate"}


@pytest.mark.parametrize("method,seeds", [("fast", 1100), ("loop", 4)])  # seed groups, or (policy, seed) chains
def test_an_interrupted_run_on_processes_leaves_no_worker_and_resumes(tmp_path, method, seeds):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'name = "k"\nfamily = "linreg"\npolicies = ["replace", "accumulate-subsample"]\niterations = 60\n'
                   f'seeds = {seeds}\n[linreg]\nd = 10\nT = 100\nn_test = 100\nmethod = "{method}"\n')
    assert cli("run", cfg, "--out", tmp_path / "whole").returncode == 0
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(tmp_path / "cut"), "--threads", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size < 10_000) and time.time() < deadline:
        time.sleep(0.01)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(workers) == 2 and not [p for p in workers if os.path.exists(f"/proc/{p}")]
    assert read_json(tmp_path / "cut" / "manifest.json")["status"] == "interrupted"
    again = cli("run", cfg, "--out", tmp_path / "cut", "--threads", "2")
    assert again.returncode == 0, again.stderr
    assert lines(tmp_path / "cut") == lines(tmp_path / "whole")
