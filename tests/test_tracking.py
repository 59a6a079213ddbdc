"""--track: each tool's records read back offline (MLflow's file store, W&B's offline run files, TensorBoard's
event files) against the run directory; resume continues the same tracking runs; tracking never fails a run."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SRC, cli
from modelcollapse import config as configlib
from modelcollapse import tracking
from modelcollapse.families import linreg
from modelcollapse.loop import run_experiment
from modelcollapse.store import read_json, read_metrics


def make(seeds=2, iterations=3, method="loop", policies=("replace", "accumulate")):
    return configlib.from_dict({"name": "tiny", "family": "linreg", "policies": list(policies), "iterations": iterations,
                                "seeds": seeds, "linreg": {"d": 3, "T": 12, "n_test": 50, "method": method}})


def expected(run_dir, metric="test_error"):
    """{"policy/seed-s": [(n, value), ...]} from the run directory's metrics.jsonl."""
    out = {}
    for r in read_metrics(run_dir):
        if r["metric"] == metric:
            out.setdefault(f"{r['policy']}/seed-{r['seed']}", []).append((r["iteration"], r["value"]))
    return out


def assert_logged(chains, run_dir):
    """Each chain's tracking run holds each of its generations' test_error once, as metrics.jsonl has it."""
    want = expected(run_dir)
    assert sorted(chains) == sorted(want)
    for chain, logged in chains.items():
        assert [n for n, _ in logged["steps"]] == [n for n, _ in want[chain]]
        assert [v for _, v in logged["steps"]] == pytest.approx([v for _, v in want[chain]], rel=1e-6)  # TensorBoard: float32


@pytest.fixture
def with_samples(monkeypatch):
    """linreg writes no samples: make each generation write a picture and a text, as vae and lm do."""
    evaluate = linreg.Family.evaluate

    def evaluate_and_draw(self, model, test, seed, workdir):
        if workdir is not None:
            Image.new("RGB", (4, 3), (200, 30, 30)).save(workdir / "samples.png")
            (workdir / "samples.txt").write_text("Once upon a time\x00 \ufffd\n")
        return evaluate(self, model, test, seed, workdir)

    monkeypatch.setattr(linreg.Family, "evaluate", evaluate_and_draw)


# -- each tool's records, read back as {chain: {"ids", "steps": [(n, test_error)], "status", "samples": {n: names}}}

def read_mlflow(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"file:{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "run"  # one parent, named after the run directory
    assert parents[0].data.params["linreg.T"] == "12" and parents[0].data.params["seeds"] == "0..1"
    chains = {}
    for r in runs:
        if r in parents:
            continue
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and r.data.params["policy"] in r.info.run_name
        history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "test_error"))
        files = {n: sorted(f.path.split("/")[-1] for f in client.list_artifacts(r.info.run_id, f"gen-{n}")) for n, _ in history}
        status = {"FINISHED": "done", "KILLED": "interrupted", "FAILED": "failed"}[r.info.status]
        assert r.data.tags["status"] == status
        chains.setdefault(r.info.run_name, {"ids": set(), "steps": [], "status": status, "samples": files})["ids"].add(r.info.run_id)
        chains[r.info.run_name]["steps"] += history
    return chains, {"FINISHED": "done", "KILLED": "interrupted", "FAILED": "failed"}[parents[0].info.status]


def wandb_records(path):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def read_wandb(tmp_path, group="tiny-"):
    chains, groups = {}, set()
    for path in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb")):
        chain = None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                groups.add(record.run.run_group)
                chain = chains.setdefault(record.run.display_name, {"ids": set(), "steps": [], "status": None, "samples": {}})
                chain["ids"].add(record.run.run_id)
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                n = items["_step"]
                chain["steps"].append((n, items["test_error"]))
                chain["samples"][n] = sorted({k.split("/")[1] for k in items if k.startswith("samples/")})
            elif kind == "summary":
                for i in record.summary.update:
                    if (i.key or "/".join(i.nested_key)) == "status":
                        chain["status"] = json.loads(i.value_json)
    assert len(groups) == 1 and groups.pop().startswith(group)
    return chains, None


def read_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, chains = tmp_path / "run" / "tensorboard", {}
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        events.Reload()
        texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(t)] for t in events.Tags()["tensors"]}
        samples = {}
        for tag in events.Tags()["images"]:
            for e in events.Images(tag):
                samples.setdefault(e.step, []).append(tag.split("/")[1])
        for step, text in texts.get("samples/samples.txt/text_summary", []):
            assert "Once upon a time" in text
            samples.setdefault(step, []).append("samples.txt")
        assert [s for s, _ in texts["config/text_summary"]] == [0]  # the config once, not again on resume
        chains[folder.relative_to(root).as_posix()] = {
            "ids": {folder}, "steps": [(e.step, e.value) for e in events.Scalars("test_error")] if "test_error" in events.Tags()["scalars"] else [],
            "status": texts["status/text_summary"][-1][1], "samples": {n: sorted(v) for n, v in samples.items()}, "events": events}
    return chains, None


READERS = {"mlflow": read_mlflow, "wandb": read_wandb, "tensorboard": read_tensorboard}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tool writes under tmp_path and nowhere else."""
    for name, value in {"MLFLOW_TRACKING_URI": f"file:{tmp_path}/mlruns", "MLFLOW_ALLOW_FILE_STORE": "true",
                        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                        "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "MODELCOLLAPSE_TENSORBOARD_DIR", "MODELCOLLAPSE_TRACK_GROUP"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    if "wandb" in sys.modules:  # W&B reads its environment once a process: the next test's must be read anew
        sys.modules["wandb"].teardown()


@pytest.mark.parametrize("tool", ["mlflow", "wandb", "tensorboard"])
def test_each_chain_is_a_tracking_run_and_a_resume_continues_it(tool, offline, with_samples, monkeypatch):
    pytest.importorskip(tool)
    out, fit = offline / "run", linreg.Family.fit
    calls = [0]

    def fit_then_stop(self, *a, **k):  # the 8th fit is accumulate seed 0's generation 3 (generation 1 is shared)
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return fit(self, *a, **k)

    monkeypatch.setattr(linreg.Family, "fit", fit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(make(), out, progress=False, track=tool)
    chains, _ = READERS[tool](offline)
    assert sorted(chains) == ["accumulate/seed-0", "replace/seed-0", "replace/seed-1"]
    assert [n for n, _ in chains["accumulate/seed-0"]["steps"]] == [1, 2] and chains["accumulate/seed-0"]["status"] == "interrupted"
    first_ids = {k: v["ids"] for k, v in chains.items()}

    monkeypatch.setattr(linreg.Family, "fit", fit)
    run_experiment(make(), out, progress=False, track=tool)
    chains, parent = READERS[tool](offline)
    assert_logged(chains, out)
    assert all(v["status"] == "done" for v in chains.values()) and parent in (None, "done")
    assert all(len(v["ids"]) == 1 for v in chains.values())  # one tracking run per chain ...
    assert all(chains[k]["ids"] == ids for k, ids in first_ids.items())  # ... the same one after the resume
    assert all(v["samples"] == {n: ["samples.png", "samples.txt"] for n in (1, 2, 3)} for v in chains.values())
    state = read_json(out / "tracking.json")[tool]["runs"]
    assert {k: (v["logged"], v["status"]) for k, v in state.items()} == {k: (3, "done") for k in chains}


def test_a_run_tracked_only_when_resumed_logs_what_finished_before(offline):
    pytest.importorskip("tensorboard")
    run_experiment(make(), offline / "run", progress=False)
    assert not (offline / "run" / "tensorboard").exists()
    run_experiment(make(), offline / "run", progress=False, track="tensorboard")
    chains, _ = read_tensorboard(offline)
    assert_logged(chains, offline / "run")
    assert all(v["status"] == "done" for v in chains.values())


def test_a_vectorised_run_of_few_seeds_is_a_tracking_run_per_chain(offline):
    pytest.importorskip("tensorboard")
    run_experiment(make(method="fast"), offline / "run", progress=False, track="tensorboard")
    chains, _ = read_tensorboard(offline)
    assert_logged(chains, offline / "run")
    assert all(v["status"] == "done" for v in chains.values())


@pytest.mark.parametrize("method", ["fast", "loop"])
def test_many_seeds_make_one_tracking_run_per_policy_of_the_means(method, offline):
    pytest.importorskip("tensorboard")
    run_experiment(make(seeds=17, iterations=3, method=method), offline / "run", progress=False, track="tensorboard")
    chains, _ = read_tensorboard(offline)
    assert sorted(chains) == ["accumulate/all-seeds", "replace/all-seeds"]  # not 34 runs
    per_seed = expected(offline / "run")
    for policy in ("replace", "accumulate"):
        values = np.array([[v for _, v in per_seed[f"{policy}/seed-{s}"]] for s in range(17)])  # (seeds, iterations)
        events = chains[f"{policy}/all-seeds"]["events"]
        assert [e.value for e in events.Scalars("test_error/mean")] == pytest.approx(values.mean(0), rel=1e-6)
        assert [e.value for e in events.Scalars("test_error/std")] == pytest.approx(values.std(0), rel=1e-5)
        assert chains[f"{policy}/all-seeds"]["status"] == "done"


def test_an_error_inside_the_tracking_library_is_a_warning(offline, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    (offline / "a-file").write_text("")
    monkeypatch.setenv("MODELCOLLAPSE_TENSORBOARD_DIR", str(offline / "a-file"))  # no folder can be made under it
    out = run_experiment(make(), offline / "run", progress=False, track="tensorboard")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: tracking")]
    assert len(warnings) == 1 and "tensorboard" in warnings[0]
    assert read_json(out / "manifest.json")["status"] == "done" and len(expected(out)) == 4
    assert warnings[0] in (out / "run.log").read_text()


def test_an_unreachable_mlflow_server_is_a_warning_not_a_failure(offline, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing answers
    out = run_experiment(make(), offline / "run", progress=False, track="mlflow")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "tracking (mlflow) is off" in warnings[0] and "http://127.0.0.1:9 does not answer" in warnings[0]
    assert warnings[0] in (out / "run.log").read_text()
    assert read_json(out / "manifest.json")["status"] == "done" and len(expected(out)) == 4


def test_a_missing_tracking_package_is_bad_input_before_anything_runs(tmp_path):
    shim = tmp_path / "shim" / "mlflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")  # as if not installed
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[base]\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n[grid]\n"linreg.T" = [12, 20]\n')
    config = tmp_path / "tiny.toml"
    config.write_text('family = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(tmp_path / "shim")]))
    for args, extra in [(["run", config, "--track", "mlflow"], {}), (["sweep", sweep], {"MODELCOLLAPSE_TRACK": "mlflow"}),
                        (["reproduce", "--only", "linreg", "--track", "mlflow"], {})]:
        r = subprocess.run([sys.executable, "-m", "modelcollapse", *map(str, args), "--out", tmp_path / "out"],
                           capture_output=True, text=True, env=env | extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "--track mlflow needs MLflow" in r.stderr and "pip install" in r.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["wandb", "tensorboard"])
def test_a_sweep_cell_joins_the_sweeps_group(tool, offline, monkeypatch):
    """What a sweep gives its cells (tracking.sweep_env), here without the sweep's child processes."""
    pytest.importorskip(tool)
    sweep = offline / "sweep"
    for name, value in tracking.sweep_env(tool, "grid", sweep).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MODELCOLLAPSE_TENSORBOARD_DIR", str(offline / "tb"))
    for cell in ("T-12", "T-20"):
        run_experiment(make(policies=["replace"], seeds=1, iterations=2), sweep / cell, progress=False, track=tool)
    if tool == "wandb":
        chains, _ = read_wandb(offline, group="grid-")
        assert sorted(chains) == ["T-12/replace/seed-0", "T-20/replace/seed-0"]
    else:
        (group,) = (offline / "tb").iterdir()
        assert group.name.startswith("grid-")
        assert sorted(p.parent.relative_to(group).as_posix() for p in group.rglob("events.*")) == ["T-12/replace/seed-0", "T-20/replace/seed-0"]


def test_a_sweeps_cells_share_its_mlflow_experiment(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sweep = tmp_path / "grid.toml"
    sweep.write_text('[base]\nname = "grid"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n'
                     '[base.linreg]\nd = 3\nn_test = 50\nmethod = "loop"\n[grid]\n"linreg.T" = [12, 20]\n')
    r = cli("sweep", sweep, "--out", tmp_path / "sweep", "--workers", "2", "--track", "mlflow")
    assert r.returncode == 0, r.stderr
    client = mlflow.MlflowClient(f"file:{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    parents = {r.info.run_id: r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents.values()) == ["T-12", "T-20"]  # a parent run per cell, in the sweep's experiment
    children = sorted((parents[r.data.tags["mlflow.parentRunId"]], r.info.run_name, r.info.status) for r in runs if r.info.run_id not in parents)
    assert children == [("T-12", "replace/seed-0", "FINISHED"), ("T-20", "replace/seed-0", "FINISHED")]
