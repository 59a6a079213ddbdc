"""The command line as a user types it: bad input is one line and exit 2; theory, report, reproduce, bench."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SRC, cli

GOOD = 'name = "g"\nfamily = "linreg"\npolicies = ["replace", "accumulate"]\niterations = 3\nseeds = 4\n[linreg]\nd = 3\nT = 10\n'

BAD = {
    "unknown top-level key": ('name = "x"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\ncolour = 3\n', "colour: unknown key"),
    "unknown family key": (GOOD + "beta = 2\n", "linreg.beta: unknown key"),
    "wrong type": (GOOD.replace("iterations = 3", 'iterations = "many"'), "iterations"),
    "iterations below 1": (GOOD.replace("iterations = 3", "iterations = 0"), "iterations"),
    "negative sigma2": (GOOD + "sigma2 = -1.0\n", "linreg.sigma2"),
    "T below d + 2": (GOOD.replace("T = 10", "T = 4"), "d + 2"),
    "unknown family": (GOOD.replace('family = "linreg"', 'family = "gan"'), "unknown family 'gan'"),
    "unknown policy": (GOOD.replace('"accumulate"]', '"hoard"]'), "policies.1: unknown policy 'hoard'"),
    "mix without fraction": (GOOD.replace('"accumulate"]', '{name = "mix"}]'), "real_fraction"),
    "seeds zero": (GOOD.replace("seeds = 4", "seeds = 0"), "seeds"),
    "missing iterations": (GOOD.replace("iterations = 3\n", ""), "iterations: missing"),
    "malformed toml": ('name = "x\nfamily = linreg', "not valid TOML"),
    # issue 12: bounds, non-finite numbers, names that lead out of runs/, nesting that overflows a parser
    "10**12 seeds": (GOOD.replace("seeds = 4", "seeds = 1000000000000"), "seeds: must be between 1 and 1,000,000"),
    "10**9 iterations": (GOOD.replace("iterations = 3", "iterations = 1000000000"), "iterations: Input should be less than or equal to 100000"),
    "sigma2 inf": (GOOD + "sigma2 = inf\n", "linreg.sigma2: must be a finite number (got inf)"),
    "gpus inf": (GOOD.replace("seeds = 4\n", "seeds = 4\ngpus = inf\n"), "gpus: must be a finite number (got inf)"),
    "nan in a list": (GOOD.replace("seeds = 4", "seeds = [1, nan]"), "seeds.1: must be a finite number (got nan)"),
    "name with ../": (GOOD.replace('name = "g"', 'name = "../escaped"'), "name: must be a plain name"),
    "absolute name": (GOOD.replace('name = "g"', 'name = "/tmp/escaped"'), "name: must be a plain name"),
    "name with a backslash": (GOOD.replace('name = "g"', 'name = "a\\\\b"'), "name: must be a plain name"),
    "name ..": (GOOD.replace('name = "g"', 'name = ".."'), "name: must be a plain name"),
    "name with NUL": (GOOD.replace('name = "g"', 'name = "a\\u0000b"'), "name: must be a plain name"),
    "table nested 5000 deep": (GOOD + "[" + ".".join(["t"] * 5000) + "]\n", "nested more than 64 deep"),
    "array nested 5000 deep": (GOOD.replace("seeds = 4", "seeds = " + "[" * 5000 + "]" * 5000), "nests tables or lists too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    text, needle = BAD[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = cli("run", cfg, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,needle", [
    ("linreg.T=2", "d + 2"), ("linreg.sigma2=-3", "linreg.sigma2"), ("iterations=0", "iterations"),
    ("nonsense", "expected KEY=VALUE"), ("linreg.nope=1", "linreg.nope: unknown key"),
])
def test_bad_override_is_one_line_exit_2(tmp_path, override, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    r = cli("run", cfg, "--out", tmp_path / "out", "--set", override)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_name_never_leads_out_of_runs(tmp_path):
    """Without --out a run goes to runs/<name>: a name that would leave runs/ is bad input, and nothing is written."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("../escaped", "/tmp/escaped-issue12", "sub/dir", ".."):
        (tmp_path / "c.toml").write_text(GOOD.replace('name = "g"', f'name = "{name}"'))
        r = cli("run", tmp_path / "c.toml", cwd=work)
        assert r.returncode == 2 and "name: must be a plain name" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "work"]
    assert not os.path.exists("/tmp/escaped-issue12")


def test_a_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    """A FIFO would block the read for ever, /dev/zero would fill memory; a directory is no config."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    (tmp_path / "dir.toml").mkdir()
    for path in (fifo, "/dev/zero", tmp_path / "dir.toml"):
        r = cli("run", path, "--out", tmp_path / "out", timeout=60)
        assert r.returncode == 2 and r.stderr == f"error: config file is not a regular file: {path}\n", r.stderr
        r = cli("sweep", path, "--out", tmp_path / "out", timeout=60)
        assert r.returncode == 2 and r.stderr == f"error: config file is not a regular file: {path}\n", r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config_file_and_unknown_option(tmp_path):
    r = cli("run", tmp_path / "nope.toml", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", tmp_path / "nope.toml", "--colour", "red")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_overrides_reach_the_run(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    r = cli("run", cfg, "--out", tmp_path / "out", "--set", "linreg.T=20", "--set", 'policies=["replace"]')
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["linreg"]["T"] == 20 and [p["name"] for p in manifest["config"]["policies"]] == ["replace"]


def test_a_different_config_in_an_existing_dir_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    assert cli("run", cfg, "--out", tmp_path / "out").returncode == 0
    before = (tmp_path / "out" / "metrics.jsonl").read_bytes()
    r = cli("run", cfg, "--out", tmp_path / "out", "--set", "linreg.T=30")
    assert r.returncode == 2 and "different config" in r.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_bytes() == before


def test_theory_prints_the_closed_form():
    r = cli("theory", "linreg", "--policy", "replace", "--d", "10", "--T", "111", "--sigma2", "1", "--iterations", "10", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["c"] == pytest.approx(0.1) and out["test_error"][-1] == pytest.approx(1.0)
    r = cli("theory", "linreg", "--policy", "accumulate", "--iterations", "10")
    assert r.returncode == 0 and "0.154977" in r.stdout and "bound" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--T", "11"], "d + 2"), (["--policy", "mix"], "no closed form"), (["--iterations", "0"], "iterations"),
])
def test_theory_bad_input(args, needle):
    r = cli("theory", "linreg", "--d", "10", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_report_writes_figures_and_summary(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.replace("seeds = 4", "seeds = 30"))
    assert cli("run", cfg, "--out", tmp_path / "run").returncode == 0
    r = cli("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    for name in ("index.html", "summary.md", "linreg-test_error.png", "g-metrics.png", "configs/g.toml"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "replace theory" in summary and "accumulate theory" in summary and "±" in summary
    r = cli("report", tmp_path / "nowhere", "--out", tmp_path / "rep2")
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_reproduce_quick_linreg_end_to_end(tmp_path):
    r = cli("reproduce", "--scale", "quick", "--only", "linreg", "--out", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "res" / "report" / "index.html").exists()
    sweep = json.loads((tmp_path / "res" / "linreg-fig7" / "sweep.json").read_text())
    assert [c["name"] for c in sweep["cells"]] == ["T-16", "T-50", "T-111"]
    assert all(c["status"] == "done" for c in sweep["cells"])
    assert "=== linreg (1/2): quick/linreg-fig7.toml, sweep linreg-fig7: 3 cells" in r.stderr  # a header per block
    assert "=== linreg (2/2): quick/linreg-loop.toml, replace, accumulate" in r.stderr
    r = cli("reproduce", "--scale", "quick", "--only", "gan", "--out", tmp_path / "res2")
    assert r.returncode == 2 and "no quick preset for gan" in r.stderr


def test_bench_linreg_json(tmp_path):
    r = cli("bench", "linreg", "--json", "--quick")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and [x["bench"] for x in rows] == ["linreg-replace", "linreg-accumulate"]
    for row in rows:
        assert set(row) >= {"bench", "ours", "baseline", "unit", "ratio", "equal"} and row["equal"] is True
    assert "bench: linreg: linreg's batched simulation" in r.stderr and "bench: timing linreg-accumulate" in r.stderr  # as it goes
    r = cli("bench", "gan")
    assert r.returncode == 2 and "unknown benchmark" in r.stderr


def test_cuda_asked_for_without_a_gpu_is_bad_input(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tmp_path / "c.toml"
    cfg.write_text('device = "cuda"\n' + GOOD)
    r = cli("run", cfg, "--out", tmp_path / "out")
    assert r.returncode == 2 and "no CUDA device" in r.stderr and not (tmp_path / "out").exists()


def test_sweep_runs_every_cell_and_refuses_an_impossible_one(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('[base]\nname = "s"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 3\nseeds = 5\n'
                     '[base.linreg]\nd = 3\n[grid]\n"linreg.T" = [6, 20]\n"linreg.sigma2" = [0.5, 1.0]\n')
    r = cli("sweep", sweep, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    cells = json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"]
    assert [c["name"] for c in cells] == ["T-6_sigma2-0.5", "T-6_sigma2-1.0", "T-20_sigma2-0.5", "T-20_sigma2-1.0"]
    assert json.loads((tmp_path / "out" / "T-20_sigma2-0.5" / "manifest.json").read_text())["config"]["linreg"]["T"] == 20
    sweep.write_text(sweep.read_text().replace("[6, 20]", "[4, 20]"))
    r = cli("sweep", sweep, "--out", tmp_path / "out2")
    assert r.returncode == 2 and "sweep cell T-4_sigma2-0.5" in r.stderr and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("args,needle", [
    (["run", "c.toml", "--colour", "red"], "No such option: --colour"),
    (["run"], "Missing argument"),
    (["sweep", "c.toml", "--out", "o", "--backend", "spark"], "Invalid value for '--backend'"),
    (["theory", "linreg", "--d", "ten"], "Invalid value for '--d'"),
    (["run", "c.toml", "--nproc", "0"], "Invalid value for '--nproc'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_a_usage_error_is_one_line_not_a_usage_box(tmp_path, args, needle):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_how_to_resume_in_one_line(tmp_path, sig):
    """Ctrl-C and SIGTERM (what Slurm and Kubernetes send) stop a run the same way: its manifest says
    `interrupted`, one line says what to do, exit 128 + the signal; the same command resumes."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.replace("seeds = 4", "seeds = 8").replace("iterations = 3", "iterations = 20") + 'method = "loop"\n')
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "replace" / "seed-0" / "gen-2" / "metrics.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert stderr == f"interrupted ({sig.name}): run the same command again to resume\n" and stdout == ""
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    r = cli("run", cfg, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"


def test_help_is_plain_text_that_says_what_each_option_takes():
    """No markup swallows [base] and [grid]; a flag shows no type; bench names the benchmarks it has."""
    from typer.testing import CliRunner

    from modelcollapse.bench import BENCHES
    from modelcollapse.cli import BENCH_NAMES, app

    assert BENCH_NAMES == tuple(BENCHES)
    runner = CliRunner()
    for command in ("run", "sweep", "reproduce", "bench", "report", "theory", "export"):
        r = runner.invoke(app, [command, "--help"], terminal_width=100)
        assert r.exit_code == 0 and "<bool>" not in r.output and "│" not in r.output, r.output
        if command in ("run", "sweep", "reproduce", "bench"):
            assert "--threads N" in r.output and "MODELCOLLAPSE_THREADS" in r.output
    sweep = runner.invoke(app, ["sweep", "--help"], terminal_width=100).output
    assert "a [base] config and a [grid] of overrides" in " ".join(sweep.split()) and "--set KEY=VALUE" in sweep
    bench = " ".join(runner.invoke(app, ["bench", "--help"], terminal_width=100).output.split())
    assert "one of linreg, linreg-all, gaussian, categorical, kde, lm-train, lm-sample" in bench


def test_run_and_sweep_each_name_the_other_for_the_others_file(tmp_path):
    config, sweep = tmp_path / "c.toml", tmp_path / "s.toml"
    config.write_text(GOOD)
    sweep.write_text('[base]\nname = "s"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 2\n[grid]\n"linreg.T" = [6, 20]\n')
    r = cli("run", sweep, "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr == (f"error: {sweep} is a sweep file (it has a [grid] table), not a run config: "
                                             f"run it with `modelcollapse sweep {sweep} --out DIR`\n")
    r = cli("sweep", config, "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr == (f"error: {config} is a run config (it has no [grid] table), not a sweep file: "
                                             f"run it with `modelcollapse run {config}`\n")
    assert not (tmp_path / "out").exists()


def test_threads_come_from_the_option_else_the_environment_else_one(monkeypatch, tmp_path):
    import torch

    from modelcollapse.procs import set_threads

    for var in ("MODELCOLLAPSE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert set_threads() == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert "MODELCOLLAPSE_THREADS" not in os.environ  # no choice of the user's: a Ray cell takes its config's cpus
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads() == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("MODELCOLLAPSE_THREADS", "2")
        assert set_threads() == 2 and torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert set_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["MODELCOLLAPSE_THREADS"] == "1"  # --threads wins
    finally:
        torch.set_num_threads(1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    r = subprocess.run([sys.executable, "-m", "modelcollapse", "run", str(cfg), "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(SRC), MODELCOLLAPSE_THREADS="many"))
    assert r.returncode == 2 and r.stderr == "error: MODELCOLLAPSE_THREADS must be a positive integer (got 'many')\n"
    r = cli("run", cfg, "--out", tmp_path / "out", "--threads", "0")
    assert r.returncode == 2 and "Invalid value for '--threads'" in r.stderr and not (tmp_path / "out").exists()


def test_progress_goes_to_a_log_as_lines(monkeypatch):
    """Where stderr is not a terminal, the bar is a line of its own every LOG_EVERY seconds, saying what runs."""
    import io

    from modelcollapse import loop

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(loop, "LOG_EVERY", 0.0)
    bar = loop.progress_bar(4, "demo", quiet=False)
    bar.set_description("demo: replace", refresh=False)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 4 and lines[-1].startswith("demo: replace: 100%")
    assert loop.progress_bar(4, "demo", quiet=True).disable
