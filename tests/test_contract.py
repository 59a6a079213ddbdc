"""The family and policy contract: your own family from your own code, a policy in one place, check_family."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

from conftest import cli
from modelcollapse import config as configlib
from modelcollapse import policies
from modelcollapse.errors import BadInput
from modelcollapse.loop import run_experiment
from modelcollapse.store import read_json, read_metrics
from modelcollapse.testing import check_family

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "poisson.py"


def readme_family() -> str:
    """The code block of the README's "Your own family" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own family"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_the_shipped_example_file():
    assert readme_family() == EXAMPLE.read_text()


def test_the_readme_example_runs_from_a_path_with_every_policy(tmp_path):
    family = tmp_path / "poisson.py"
    family.write_text(readme_family())
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'name = "mine"\nfamily = "{family}"\npolicies = ["replace", "accumulate", {{name = "mix", real_fraction = 0.5}}]\n'
                   'iterations = 4\nseeds = 3\n[poisson]\nrate = 3.0\nn = 30\n')
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["config"]["poisson"] == {"rate": 3.0, "n": 30}
    assert manifest["policy_labels"] == ["replace", "accumulate", "mix-0.5"]
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3 * 3 * 4 * 2 and {r["metric"] for r in rows} == {"rate_sq_error", "test_nll"}
    report = cli("report", tmp_path / "run", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "poisson-rate_sq_error.png").exists()  # named after the module, inside --out


def test_the_readme_example_passes_check_family():
    rows = check_family(str(EXAMPLE), {"n": 40})
    assert {r["policy"] for r in rows} >= {"replace", "accumulate", "replace-grown", "accumulate-subsample", "mix-0.5", "fresh-0.5"}


def test_linreg_passes_check_family():
    rows = check_family("linreg", {"d": 3, "T": 12, "n_test": 20})  # one seed at a time = every seed at once, too
    assert len(rows) == len(policies.POLICIES) * 2 * 3 * 2


@pytest.mark.parametrize("family,table", [
    ("vae", dict(dataset="digits", channels=[8, 16], latent_dim=4, epochs=2, classifier_steps=50, eval_samples=100)),
], ids=["vae"])
def test_the_neural_families_pass_check_family(family, table, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = check_family(family, table, seeds=1, iterations=2, policies=["replace", "accumulate"])
    assert {r["policy"] for r in rows} == {"replace", "accumulate"}


def test_a_family_from_an_importable_module(tmp_path, monkeypatch):
    package = tmp_path / "mylab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "counts.py").write_text(EXAMPLE.read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = configlib.from_dict({"family": "mylab.counts", "policies": ["replace"], "iterations": 2, "seeds": 1, "counts": {"n": 12}})
    assert cfg.family_module.table == "counts" and cfg.family_config.n == 12
    assert cfg.resolved()["counts"] == {"rate": 4.0, "n": 12}
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    assert len(read_metrics(out)) == 4


@pytest.mark.parametrize("body,message", [
    (None, "no such file"),
    ("x = 1\n", "has no Config"),
    ("from pydantic import BaseModel\nclass Config(BaseModel):\n    pass\n", "has no Family"),
    ("from pydantic import BaseModel\nclass Config(BaseModel):\n    pass\nclass Family:\n    def fit(self): pass\n", "Family lacks real_data"),
    ("raise ImportError('needs a package you lack')\n", "failed to import: ImportError: needs a package"),
    ("from pydantic import BaseModel\nclass Config(BaseModel):\n    n: int = 1\n" + "class Family:\n" + "".join(
        f"    def {m}(self): pass\n" for m in ("real_data", "size", "concat", "subsample", "fit", "evaluate", "sample", "load_sample",
                                            "save_model", "load_model")) + "theory = 3\n", "theory must be a function"),
], ids=["missing file", "no Config", "no Family", "a method missing", "import error", "theory not a function"])
def test_a_broken_family_is_one_line_and_exit_2(tmp_path, body, message):
    family = tmp_path / "broken.py"
    if body is not None:
        family.write_text(body)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'family = "{family}"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n')
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_unknown_module_or_bad_table_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="unknown family 'no_such_pkg.fam'"):
        configlib.from_dict({"family": "no_such_pkg.fam", "policies": ["replace"], "iterations": 1, "seeds": 1})
    with pytest.raises(BadInput, match="poisson.rate"):
        configlib.from_dict({"family": str(EXAMPLE), "policies": ["replace"], "iterations": 1, "seeds": 1, "poisson": {"rate": -1}})


@policies.register
class Halve(policies.Policy):
    """A policy defined in this file alone: the newest synthetic set, but only a share of it."""

    name: str = Field("halve", pattern="^halve$")
    share: float = Field(0.5, gt=0, le=1)

    def synthetic_size(self, n, real_size):
        return real_size

    def later(self, n, pool, ops, seed, fresh_real):
        return ops.subsample(pool[-1], max(2, round(self.share * ops.size(pool[-1]))), seed)


@pytest.mark.parametrize("method", ["fast", "loop"])
def test_a_new_policy_is_one_class_and_runs_everywhere(tmp_path, method):
    """Registered here, the policy is found by the config, runs through the loop (batched and one seed at a
    time), is labelled by its parameters, and the report reads its label from the manifest."""
    raw = {"name": "h", "family": "linreg", "policies": ["replace", {"name": "halve", "share": 0.25}], "iterations": 3, "seeds": 2,
           "linreg": {"d": 2, "T": 24, "method": method}}
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    assert read_json(out / "manifest.json")["policy_labels"] == ["replace", "halve-0.25"]
    rows = [r for r in read_metrics(out) if r["policy"] == "halve-0.25" and r["metric"] == "test_error"]
    assert len(rows) == 2 * 3
    late = np.mean([r["value"] for r in rows if r["iteration"] == 3])
    first = np.mean([r["value"] for r in rows if r["iteration"] == 1])
    assert late > first  # fitting on a quarter of a synthetic set: the error grows
    with pytest.raises(BadInput, match="policies.0.share"):
        configlib.from_dict(raw | {"policies": [{"name": "halve", "share": 3}]})


def test_policy_labels_name_parameters_and_must_be_distinct():
    assert policies.from_spec({"name": "mix", "real_fraction": 0.25}).label == "mix-0.25"
    with pytest.raises(BadInput, match="listed twice"):
        configlib.from_dict({"family": "linreg", "policies": ["replace", "replace"], "iterations": 1, "seeds": 1})


def test_the_manifest_records_labels_and_old_manifests_still_report(tmp_path):
    out = run_experiment(configlib.from_dict({"name": "l", "family": "linreg", "iterations": 2, "seeds": 2,
                                              "policies": [{"name": "fresh", "real_fraction": 0.5}], "linreg": {"d": 2, "T": 10}}),
                         tmp_path / "run", progress=False)
    manifest = read_json(out / "manifest.json")
    assert manifest["policy_labels"] == ["fresh-0.5"]
    del manifest["policy_labels"]  # as a run from before labels were recorded
    (out / "manifest.json").write_text(json.dumps(manifest))
    from modelcollapse.report import Run

    assert Run(out).policies == ["fresh-0.5"]
