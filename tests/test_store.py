"""The run store never loses or mislabels a result: races, interrupts, damaged and missing files (issue 12)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, cli
from modelcollapse import config as configlib
from modelcollapse import store as storelib
from modelcollapse.errors import BadInput
from modelcollapse.families import linreg
from modelcollapse.loop import run_experiment
from modelcollapse.store import RunDir, read_json

LOOP = 'name = "s"\nfamily = "linreg"\npolicies = ["replace", "accumulate"]\niterations = 4\nseeds = 3\n[linreg]\nd = 3\nT = 12\nmethod = "loop"\n'


def make(text=LOOP, **over):
    raw = configlib.tomllib.loads(text) | over
    return configlib.from_dict(raw)


def lines(path):
    return (Path(path) / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run of LOOP, to compare others with."""
    return run_experiment(make(), tmp_path_factory.mktemp("whole") / "run", progress=False)


def env():
    return dict(os.environ, PYTHONPATH=str(SRC))


# -- 1. the process that loses the lock ----------------------------------------------------------------------


def test_the_process_that_loses_the_lock_leaves_the_winners_run_alone(tmp_path, monkeypatch):
    """B finds DIR free, pauses before the lock, and A takes it meanwhile: B must refuse and remove nothing."""
    cfg = tmp_path / "slow.toml"
    cfg.write_text(LOOP.replace("seeds = 3", "seeds = 60"))
    out = tmp_path / "run"
    winner = []
    real_check = RunDir.check.__func__

    def check_then_pause(cls, path, config_hash):
        real_check(cls, path, config_hash)  # DIR is free ...
        winner.append(subprocess.Popen([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(out)], env=env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # ... until A is inside it
            time.sleep(0.01)

    monkeypatch.setattr(RunDir, "check", classmethod(check_then_pause))
    with pytest.raises(BadInput, match="in use by another"):
        run_experiment(configlib.load(cfg), out, progress=False)
    assert (out / "manifest.json").exists() and (out / ".lock").exists()
    assert winner[0].wait(timeout=300) == 0
    assert read_json(out / "manifest.json")["status"] == "done"
    monkeypatch.undo()
    reference = run_experiment(configlib.load(cfg), tmp_path / "reference", progress=False)
    assert lines(out) == lines(reference)


# -- 2. an interrupt or failure before the first generation finishes ----------------------------------------


@pytest.mark.parametrize("error,status", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_a_run_stopped_before_its_first_generation_keeps_everything_and_resumes(tmp_path, monkeypatch, whole, error, status):
    real_sample = linreg.Family.sample

    def stop(self, model, size, like, seed, workdir):
        real_sample(self, model, size, like, seed, workdir)  # generation 1 wrote its model and its sample ...
        raise error("stopped")  # ... and is stopped before it finishes

    monkeypatch.setattr(linreg.Family, "sample", stop)
    with pytest.raises(error):
        run_experiment(make(), tmp_path / "run", progress=False)
    gen = tmp_path / "run" / "replace" / "seed-0" / "gen-1"
    assert {"w_hat.npy", "fit.json", "synthetic.npz"} <= {p.name for p in gen.iterdir()}
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == status
    monkeypatch.undo()
    run_experiment(make(), tmp_path / "run", progress=False)
    assert lines(tmp_path / "run") == lines(whole)


def test_sigint_to_a_real_lm_run_keeps_its_training_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the first fit: the mid-fit checkpoint stays, the run says `interrupted`, and
    running the same command again resumes the fit from it."""
    cfg = tmp_path / "lm.toml"
    cfg.write_text('name = "lm"\nfamily = "lm"\npolicies = ["replace"]\niterations = 1\nseeds = 1\ndevice = "cpu"\n[lm]\n'
                   'max_train_stories = 60\ntest_stories = 10\nvocab_size = 512\nmodel = "llama2-tiny"\nblock_size = 64\n'
                   'batch_size = 8\nepochs = 8\nmax_sample_len = 64\nsample_batch = 16\neval_samples = 20\ncheckpoint_every = 4\n')
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: one thread is fastest
    proc = subprocess.Popen([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(out)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = out / "replace" / "seed-0" / "gen-1" / "fit.ckpt.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert ckpt.exists() and read_json(out / "manifest.json")["status"] == "interrupted"
    again = cli("run", cfg, "--out", out)
    assert again.returncode == 0, again.stderr
    assert not ckpt.exists() and (ckpt.parent / "model.safetensors").exists()  # the saved model replaced it


# -- 4. a damaged finished run -------------------------------------------------------------------------------


def test_a_missing_middle_record_is_refused_with_the_file_named(tmp_path, whole):
    run_experiment(make(), tmp_path / "run", progress=False)
    (tmp_path / "run" / "accumulate" / "seed-1" / "gen-2" / "metrics.json").unlink()
    r = cli("run", tmp_path / "c.toml" if (tmp_path / "c.toml").write_text(LOOP) else None, "--out", tmp_path / "run")
    assert r.returncode == 2 and "accumulate/seed-1/gen-2 is unfinished" in r.stderr and "gen-3 after it is finished" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert lines(tmp_path / "run") == lines(whole)  # nothing lost: metrics.jsonl as it was


def test_a_missing_last_generation_is_recomputed_and_the_table_keeps_its_order(tmp_path, whole):
    run_experiment(make(), tmp_path / "run", progress=False)
    for rel in ("replace/seed-0/gen-4/metrics.json", "accumulate/seed-2/gen-4/metrics.json"):
        (tmp_path / "run" / rel).unlink()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # derived: rebuilt from the finished generations
    run_experiment(make(), tmp_path / "run", progress=False)
    assert lines(tmp_path / "run") == lines(whole)


def test_a_damaged_vectorised_unit_is_recomputed(tmp_path):
    fast = make(LOOP.replace('method = "loop"', 'method = "fast"'))
    out = run_experiment(fast, tmp_path / "run", progress=False)
    before = lines(out)
    (out / "replace" / "all-seeds" / "metrics.npz").write_bytes(b"garbage")
    run_experiment(fast, out, progress=False)
    assert lines(out) == before
    assert "recomputing" in (out / "run.log").read_text()


# -- 5 and 9. non-finite metrics, damaged files the store reuses --------------------------------------------


def test_non_finite_metrics_stop_the_chain_with_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP.replace("T = 12", "T = 12\nsigma2 = 1e308"))
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 1 and "is not finite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == "failed"
    assert not list((tmp_path / "run").glob("*/seed-*/gen-2"))  # no generation trained on the broken model's data


@pytest.mark.parametrize("damage", ["truncate", "nan"])
@pytest.mark.parametrize("which", ["model", "sample"])
def test_a_damaged_model_or_sample_is_named_not_used(tmp_path, damage, which):
    """A finished generation's files are checked against their checksums before they are reused: the model
    that generation 1 shares with the next policy, the sample the next generation trains on."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP)
    out = tmp_path / "run"
    run_experiment(configlib.load(cfg), out, progress=False)
    for gen in out.glob("*/seed-*/gen-[34]"):  # as if the run had stopped after generation 2 ...
        for f in gen.iterdir():
            f.unlink()
        gen.rmdir()
    path = {"model": out / "replace" / "seed-1" / "gen-1" / "w_hat.npy", "sample": out / "replace" / "seed-1" / "gen-2" / "synthetic.npz"}[which]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif which == "model":
        np.save(path, np.full((1, 3), np.nan))
    else:
        path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    r = cli("run", cfg, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(path) in r.stderr and "has changed since its generation finished" in r.stderr
    assert "run the same command again to recompute" in r.stderr


# -- 6, 10, 13: what a run directory may not be ---------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["[]", "null", '{"status": "done"}', "{oops", "folder"])
def test_a_manifest_that_is_not_ours_is_one_line(tmp_path, manifest):
    out = tmp_path / "run"
    out.mkdir()
    if manifest == "folder":
        (out / "manifest.json").mkdir()
    else:
        (out / "manifest.json").write_text(manifest)
    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP)
    r = cli("run", cfg, "--out", out)
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("what", ["lock folder", "out under a file", "symlinked log", "symlinked metrics"])
def test_an_unusable_run_directory_is_one_line_and_nothing_outside_is_written(tmp_path, what):
    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP)
    out = tmp_path / "run"
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    if what == "out under a file":
        out = outside / "run"
    else:
        run_experiment(configlib.load(cfg), out, progress=False)
        target = {"lock folder": ".lock", "symlinked log": "run.log", "symlinked metrics": "metrics.jsonl"}[what]
        (out / target).unlink()
        if what == "lock folder":
            (out / target).mkdir()
        else:
            (out / target).symlink_to(outside)
    r = cli("run", cfg, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert outside.read_text() == "mine\n"


def test_a_kill_during_the_first_manifest_write_does_not_block_the_dir(tmp_path, whole):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    (out / ".manifest.json.x1y2.tmp").write_text('{"config": ')  # what a kill -9 mid-write leaves
    run_experiment(make(), out, progress=False)
    assert lines(out) == lines(whole)


def test_a_full_disk_keeps_the_original_error_and_a_resumable_run(tmp_path, monkeypatch, whole):
    real, calls = storelib.atomic_write_bytes, [0]

    def fills_up(path, data):
        calls[0] += 1
        if calls[0] > 12:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storelib, "atomic_write_bytes", fills_up)
    with pytest.raises(OSError) as e:
        run_experiment(make(), tmp_path / "run", progress=False)
    assert e.value.errno == errno.ENOSPC
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == "running"  # could not be marked: still resumable
    monkeypatch.undo()
    run_experiment(make(), tmp_path / "run", progress=False)
    assert lines(tmp_path / "run") == lines(whole)


# -- 8. a finished fit is never redone --------------------------------------------------------------------------


def test_a_run_stopped_while_sampling_does_not_fit_that_generation_again(tmp_path, monkeypatch, whole):
    real_sample, real_fit = linreg.Family.sample, linreg.Family.fit
    calls = []

    def stop_in_gen_2(self, model, size, like, seed, workdir):
        if workdir is not None and workdir.name == "gen-2" and workdir.parent.name == "seed-0":
            raise KeyboardInterrupt
        return real_sample(self, model, size, like, seed, workdir)

    monkeypatch.setattr(linreg.Family, "sample", stop_in_gen_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(make(), tmp_path / "run", progress=False)
    monkeypatch.setattr(linreg.Family, "sample", real_sample)
    monkeypatch.setattr(linreg.Family, "fit", lambda self, train, seed, workdir: calls.append(workdir) or real_fit(self, train, seed, workdir))
    run_experiment(make(), tmp_path / "run", progress=False)
    assert tmp_path / "run" / "replace" / "seed-0" / "gen-2" not in calls and calls  # resumed, the saved model reused
    assert lines(tmp_path / "run") == lines(whole)


# -- 11. impossible sizes ----------------------------------------------------------------------------------------


def test_a_run_too_large_for_any_machine_is_refused_before_it_starts(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP.replace("seeds = 3", "seeds = 200000").replace("T = 12", "T = 100000").replace('method = "loop"', 'method = "fast"'))
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "GiB of memory" in r.stderr and not (tmp_path / "run").exists(), r.stderr


def test_row_lines_are_json_dumps_of_the_rows():
    rows = [dict(policy="mix-0.5", seed=3, iteration=2, metric="test_error", value=v) for v in (0.1, 1e-300, 12345.678, -0.0, 3.0)]
    assert [storelib.row_line(**r) for r in rows] == [json.dumps(r) for r in rows]
    batch = storelib.batch_lines("a\"b", [1, 2], 5, {"x": [0.5, 2.0], "y": [1e-9, 7.25]})
    assert [json.loads(line) for line in batch] == [dict(policy='a"b', seed=s, iteration=5, metric=m, value=v)
                                                    for s, vals in ((1, (0.5, 1e-9)), (2, (2.0, 7.25))) for m, v in zip("xy", vals)]


def test_a_full_disk_is_one_line_from_the_command_line(tmp_path, monkeypatch, capsys):
    from modelcollapse import cli as clilib

    cfg = tmp_path / "c.toml"
    cfg.write_text(LOOP)
    real, calls = storelib.atomic_write_bytes, [0]

    def fills_up(path, data):
        calls[0] += 1
        if calls[0] > 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storelib, "atomic_write_bytes", fills_up)
    monkeypatch.setattr(sys, "argv", ["modelcollapse", "run", str(cfg), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        clilib.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "No space left on device" in err[0] and "resume" in err[0], err


def test_version_a_deep_override_and_a_foreign_manifest_are_one_line(tmp_path):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"modelcollapse {__import__('modelcollapse').__version__}"
    (tmp_path / "c.toml").write_text(LOOP)
    r = cli("run", tmp_path / "c.toml", "--set", "x=" + "[" * 5000 + "]" * 5000)
    assert r.returncode == 2 and "nested too deep" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "run").mkdir()
    for manifest in ("[]", "null", '{"config": 3}'):
        (tmp_path / "run" / "manifest.json").write_text(manifest)
        r = cli("report", tmp_path / "run", "--out", tmp_path / "rep")
        assert r.returncode == 2 and "not a modelcollapse manifest" in r.stderr and "Traceback" not in r.stderr, r.stderr
