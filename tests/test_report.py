"""The report in words: every section says what it tests, what its metrics are, what its runs can show, and
links each run's config; figures a reader can read; sample text that is valid text."""

import json
import unicodedata
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from conftest import cli
from modelcollapse import config as configlib
from modelcollapse import report
from modelcollapse.families import DEFAULT_CLAIM, load_family
from modelcollapse.loop import run_experiment


def linreg_run(path: Path, name: str = "lin", seeds: int = 20, iterations: int = 6) -> Path:
    cfg = configlib.from_dict({"name": name, "family": "linreg", "policies": ["replace", "accumulate"], "iterations": iterations,
                               "seeds": seeds, "linreg": {"d": 3, "T": 12, "n_test": 50}})
    return run_experiment(cfg, path, progress=False)


def fake_run(path: Path, family: str, metrics: dict, seeds: int = 1, iterations: int = 3, table: dict | None = None,
             samples: dict | None = None) -> Path:
    """A run directory as the loop writes one, without fitting anything: `metrics` maps a metric to a function
    of (policy index, iteration) giving its value; `samples` maps a file name to the bytes each generation saved."""
    path.mkdir(parents=True)
    policies = ["replace", "accumulate"]
    config = {"name": path.name, "family": family, "policies": [{"name": p} for p in policies], "iterations": iterations,
              "seeds": list(range(seeds)), **({family.split(".")[-1]: table} if table is not None else {})}
    (path / "manifest.json").write_text(json.dumps({"config": config, "status": "done", "policy_labels": policies}))
    rows = [dict(policy=p, seed=s, iteration=n, metric=m, value=f(i, n) + 0.01 * s)
            for i, p in enumerate(policies) for s in range(seeds) for n in range(1, iterations + 1) for m, f in metrics.items()]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in policies:
        for n in range(1, iterations + 1):
            gen = path / p / "seed-0" / f"gen-{n}"
            gen.mkdir(parents=True)
            for name, data in (samples or {}).items():
                (gen / name).write_bytes(data)
    return path


def test_a_section_opens_with_its_claim_the_paper_its_metrics_and_a_config_that_runs(tmp_path):
    run = linreg_run(tmp_path / "run")
    out = report.write_report([run], tmp_path / "rep")
    page, summary = (out / "index.html").read_text(), (out / "summary.md").read_text()
    spec = load_family("linreg")
    for text in (page, summary):
        assert "Claim." in text and spec.claim.split(":")[0] in text
        assert "Fig. 7" in text  # the paper's analogue
        assert "test_error: E‖ŵ − w*‖²" in text and "[unit (units of y)²; lower is better]" in text
        assert "20 seeds, 6 iterations, status done" in text and "smoke test" not in text
        assert "mean ± 95% CI over 20 seeds" in text
    assert "href='configs/lin.toml'" in page and "[config](configs/lin.toml)" in summary
    again = configlib.load(out / "configs" / "lin.toml")  # one click away, and `modelcollapse run` takes it
    assert again.model_dump() == configlib.from_dict(json.loads((run / "manifest.json").read_text())["config"]).model_dump()


def test_one_seed_has_no_interval_and_too_few_iterations_is_a_smoke_test(tmp_path):
    fake_run(tmp_path / "vae-quick", "vae", {"test_nelbo": lambda i, n: 100 + 10 * n * (1 - i)}, seeds=1, iterations=3)
    out = report.write_report([tmp_path / "vae-quick"], tmp_path / "rep")
    for text in ((out / "index.html").read_text(), (out / "summary.md").read_text()):
        assert "one seed: no interval" in text and "over 1 seed" not in text and "(n=1)" not in text
        assert "A smoke test: 3 iterations, too few to show the claim (the vae family needs at least 4)" in text
        assert "test_nelbo: negative ELBO on real held-out images" in text and "[unit nats/image; lower is better]" in text
    assert report.seeds_phrase(3, 3) == "mean ± 95% CI over 3 seeds"


def test_a_family_that_declares_no_words_gets_the_papers_claim_and_says_what_it_lacks(tmp_path):
    fake_run(tmp_path / "mine", "no_such_module_anywhere", {"score": lambda i, n: n}, seeds=4, iterations=5)
    out = report.write_report([tmp_path / "mine"], tmp_path / "rep")
    page = (out / "index.html").read_text()
    assert DEFAULT_CLAIM in page and "score: (the no_such_module_anywhere family declares no definition)" in page
    assert "smoke test" not in page  # 5 iterations >= the default minimum of 2


def test_bad_words_in_a_family_are_one_line_of_bad_input(tmp_path):
    example = (Path(__file__).resolve().parents[1] / "examples" / "poisson.py").read_text()
    family = tmp_path / "poisson.py"
    family.write_text(example + '\nMETRICS = {"test_nll": "nats"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'name = "p"\nfamily = "{family}"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n')
    r = cli("run", cfg, "--out", tmp_path / "out")
    assert r.returncode == 2 and "METRICS['test_nll'] must be (definition, unit, better)" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_theory_is_dashed_above_its_data_and_the_legend_covers_no_panel(tmp_path):
    run = report.Run(linreg_run(tmp_path / "run", seeds=5, iterations=4))
    fig, axes = report.panels(1, 3)
    report.draw_panel(axes[0], run, "test_error", report.colors_for([run]))
    data = [ln for ln in axes[0].lines if ln.get_linestyle() == "-" and len(ln.get_xdata())]
    theory = [ln for ln in axes[0].lines if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert len(theory) == 2 and min(t.get_zorder() for t in theory) > max(d.get_zorder() for d in data)
    report.save(fig, tmp_path / "f.png")
    assert axes[0].get_legend() is None and len(fig.legends) == 1  # one legend, outside the panels
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["replace (5 seeds)", "accumulate (5 seeds)", "dashed: exact expectation"]
    plt.close("all")


def test_class_frequencies_share_one_panel(tmp_path):
    metrics = {"test_nelbo": lambda i, n: 100.0, "recall": lambda i, n: 0.5 / n} | {f"class_freq_{k}": (lambda i, n, k=k: 0.1 + 0.01 * k * i) for k in range(10)}
    fake_run(tmp_path / "vae-cpu", "vae", metrics, seeds=2, iterations=4)
    names = [m for m in metrics if m != "test_nelbo"]
    assert report.groups("vae", names) == [("recall", ["recall"]), ("class_freq_*", names[1:])]
    assert report.groups("unknown_family", ["class_freq_a", "class_freq_b", "x"]) == [("class_freq_*", ["class_freq_a", "class_freq_b"]), ("x", ["x"])]
    out = report.write_report([tmp_path / "vae-cpu"], tmp_path / "rep")
    assert (out / "vae-cpu-metrics.png").exists()
    page = (out / "index.html").read_text()
    assert page.count("class_freq_*: share of sampled images the judge labels as each class. [no unit;") == 1


def test_runs_of_one_name_are_told_apart_and_files_are_named_after_runs(tmp_path):
    linreg_run(tmp_path / "a" / "first", name="lin", seeds=3, iterations=2)
    linreg_run(tmp_path / "b" / "second", name="lin", seeds=3, iterations=2)
    out = report.write_report([tmp_path / "a" / "first", tmp_path / "b" / "second"], tmp_path / "rep")
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["index.html", "lin-first-metrics.png", "lin-first.toml", "lin-second-metrics.png", "lin-second.toml",
                     "linreg-test_error.png", "summary.md"]
    page = (out / "index.html").read_text()
    assert "lin (first)" in page and "lin (second)" in page and "run0" not in page
    assert "A smoke test: 2 iterations" in page  # linreg needs 4


def test_sample_text_with_control_bytes_is_valid_text_and_images_link_to_full_size(tmp_path):
    story = "Once upon a time\x00 there was\x03 a cat \ufffd\x7f.\n".encode() + b"\xff\xfe broken bytes\n"
    png = (tmp_path / "p.png")
    plt.imsave(png, [[0.0, 1.0], [1.0, 0.0]])
    fake_run(tmp_path / "lm-quick", "lm", {"test_ce": lambda i, n: 5.0 + n * (1 - i)},
             samples={"samples.txt": story, "samples.png": png.read_bytes()})
    out = report.write_report([tmp_path / "lm-quick"], tmp_path / "rep")
    page = (out / "index.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert not [c for c in page if unicodedata.category(c) == "Cc" and c not in "\n\t"]
    assert "time\\x00 there was\\x03 a cat \ufffd\\x7f." in page and "\ufffd\ufffd broken bytes" in page
    assert "marks bytes the model sampled that are not UTF-8" in page
    assert "<a href='samples/lm-quick-replace-gen-1.png'><img src='samples/lm-quick-replace-gen-1.png'" in page
    assert (out / "samples" / "lm-quick-replace-gen-1.png").read_bytes() == png.read_bytes()


@pytest.mark.parametrize("family", ["linreg", "gaussian", "categorical", "kde", "vae", "lm", "conformer"])
def test_every_builtin_family_defines_its_primary_metric_and_states_a_claim(family):
    spec = load_family(family)
    assert spec.claim != DEFAULT_CLAIM and spec.min_iterations >= 2
    primary = spec.metric_info(spec.primary_metric)
    assert primary is not None and primary.better and primary.definition


def test_a_sweep_and_a_run_of_one_family_and_name_keep_their_figures_apart(tmp_path):
    from modelcollapse.sweep import run_sweep

    sweep = tmp_path / "s.toml"
    sweep.write_text('[base]\nname = "linreg"\nfamily = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 2\n'
                     '[base.linreg]\nd = 2\n[grid]\n"linreg.T" = [6, 9]\n')
    run_sweep(sweep, tmp_path / "sweep")
    linreg_run(tmp_path / "run", name="linreg", seeds=2, iterations=2)
    out = report.write_report([tmp_path / "sweep", tmp_path / "run"], tmp_path / "rep")
    assert {"linreg-test_error.png", "linreg-2-test_error.png", "linreg-metrics.png"} <= {p.name for p in out.iterdir()}
    page = (out / "index.html").read_text()
    assert "linreg: a linreg sweep over T" in page and "linreg [T=6]" in page and "<h2>linreg: linreg</h2>" in page


def test_differences_are_paired_by_seed_with_their_interval(tmp_path):
    """Seeds far apart (0, 10, 20) whose changes agree: paired, the interval is the changes' spread, not the
    seeds'."""
    run = fake_run(tmp_path / "vae-cpu", "vae", {"test_nelbo": lambda i, n: 0.0}, seeds=3, iterations=2)
    rise = {"replace": [1.0, 1.2, 0.8], "accumulate": [0.1, 0.2, 0.0]}
    rows = [dict(policy=p, seed=s, iteration=n, metric="test_nelbo", value=10.0 * s + (rise[p][s] if n == 2 else 0.0))
            for p in rise for s in range(3) for n in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    header, body = report.tables.paired_table(report.Run(run), ["test_nelbo"])
    assert header == ["metric (paired by seed)", "replace: last − first", "accumulate: last − first", "replace − accumulate (last)"]
    half = 4.302653 / 3**0.5  # t(0.975, 2 df) / sqrt(n), times the sd: 0.2, 0.1 and 0.1
    assert body == [["test_nelbo", f"+1 ± {0.2 * half:.2g}", f"+0.1 ± {0.1 * half:.2g}", f"+0.9 ± {0.1 * half:.2g}"]]
    summary = (report.write_report([run], tmp_path / "rep") / "summary.md").read_text()
    assert "| test_nelbo | +1 ± 0.5 | +0.1 ± 0.25 | +0.9 ± 0.25 |" in summary
    one = fake_run(tmp_path / "one", "vae", {"test_nelbo": lambda i, n: n}, seeds=1, iterations=2)
    assert report.tables.paired_table(report.Run(one), ["test_nelbo"]) is None
