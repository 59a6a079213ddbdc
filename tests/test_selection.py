"""The selection stage and the weight of real data (issue 13): selectors, their bad input, linreg's scores."""

import json

import numpy as np
import pytest

from conftest import cli
from modelcollapse import config as configlib
from modelcollapse.errors import BadInput, RunFailed
from modelcollapse.families import categorical, common, gaussian, kde, linreg
from modelcollapse.loop import run_experiment, simulate
from modelcollapse.policies import from_spec
from modelcollapse.seeding import stream_keys
from modelcollapse.selection import SelectSpec, select
from modelcollapse.store import read_json, read_metrics
from modelcollapse.testing import check_family

BASE = {"name": "sel", "family": "linreg", "iterations": 4, "seeds": 3, "linreg": {"d": 3, "T": 16}}


def spec(**kw):
    return SelectSpec(**kw)


# -- the selectors ------------------------------------------------------------------------------------------


def test_top_fraction_keeps_the_best_overall_or_each_inputs_best():
    scores = np.array([[0.1, 5.0, 0.3, 4.0, 0.2, 0.0]])  # 3 examples × 2 candidates: candidate c of example j at c·3 + j
    kept, m = select(scores, 3, spec(name="top-fraction", score="x", oversample=2), np.zeros(1, np.uint64), per_input=False)
    assert kept.tolist() == [[1, 2, 3]]  # the three best of six
    kept, m = select(scores, 3, spec(name="top-fraction", score="x", oversample=2), np.zeros(1, np.uint64), per_input=True)
    assert kept.tolist() == [[3, 1, 2]]  # example 0: 4.0 (index 3) beats 0.1; example 1: 5.0 (1); example 2: 0.3 (2)
    assert m["select_kept_frac"][0] == 0.5
    assert m["select_score_kept"][0] == pytest.approx((4.0 + 5.0 + 0.3) / 3)
    assert m["select_score_rejected"][0] == pytest.approx((0.1 + 0.2 + 0.0) / 3)


def test_threshold_fails_with_the_numbers_unless_short_sets_are_allowed():
    scores = np.array([[0.1, 5.0, 0.3, 4.0, 0.2, 0.0]])
    with pytest.raises(RunFailed, match=r"min_score = 1 kept 2 of the 3 synthetic examples needed \(of 6 candidates; their scores range from 0 to 5\)"):
        select(scores, 3, spec(name="threshold", score="x", oversample=2, min_score=1.0), np.zeros(1, np.uint64), per_input=False)
    kept, m = select(scores, 3, spec(name="threshold", score="x", oversample=2, min_score=1.0, allow_short=True), np.zeros(1, np.uint64), per_input=False)
    assert kept.tolist() == [[1, 3]] and m["select_kept_frac"][0] == pytest.approx(2 / 6)
    kept, _ = select(scores, 3, spec(name="threshold", score="x", oversample=2, min_score=0.15), np.zeros(1, np.uint64), per_input=True)
    assert sorted(kept[0].tolist()) == [1, 2, 3]  # each example's first candidate that passes


def test_k_choice_picks_each_candidate_with_its_softmax_probability():
    """Ferbach et al.'s curation: among k candidates, candidate c with probability exp(s_c/τ) / Σ exp(s/τ)."""
    S, k, tau = 20000, 3, 0.5
    scores = np.tile(np.array([0.0, 0.5, 1.0]), (S, 1))  # one example, three candidates
    kept, _ = select(scores, 1, spec(name="k-choice", score="x", k=k, temperature=tau), stream_keys(np.arange(S), "k"), per_input=True)
    freq = np.bincount(kept[:, 0], minlength=k) / S
    p = np.exp(np.array([0.0, 0.5, 1.0]) / tau)
    p /= p.sum()
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / S)), (freq, p)


@pytest.mark.parametrize("table,message", [
    ({"name": "best"}, "select.name"),
    ({"name": "top-fraction"}, "needs a score"),
    ({"name": "top-fraction", "score": "beauty"}, "provides no score 'beauty'; it has oracle, verifier, self"),
    ({"name": "top-fraction", "score": "oracle", "oversample": 0}, "select.oversample"),
    ({"name": "k-choice", "score": "oracle", "k": 1}, "select.k"),
    ({"name": "threshold", "score": "oracle"}, "needs min_score"),
    ({"name": "top-fraction", "score": "oracle", "k": 3}, "k does not apply to the 'top-fraction' selector"),
    ({"name": "k-choice", "score": "oracle", "allow_short": True}, "allow_short applies only"),
], ids=["unknown selector", "no score", "unknown score", "oversample 0", "k 1", "threshold without min", "stray key", "allow_short"])
def test_bad_selection_is_one_line_exit_2_before_anything_runs(tmp_path, table, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "linreg"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n[select]\n' +
                   "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_family_without_scores_or_weights_refuses_selection_and_real_weight(tmp_path):
    example = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "poisson.py"
    raw = {"family": str(example), "policies": ["replace"], "iterations": 2, "seeds": 1}
    with pytest.raises(BadInput, match="the poisson family cannot select synthetic data"):
        configlib.from_dict(raw | {"select": {"name": "top-fraction", "score": "x"}})
    with pytest.raises(BadInput, match="real_weight: the poisson family cannot weight"):
        configlib.from_dict(raw | {"real_weight": 0.5})


# -- linreg's scores and weights ------------------------------------------------------------------------------


def chains(policy, seeds=400, iterations=8, select=None, **config):
    family = linreg.Family(linreg.Config(d=5, T=20, n_test=10, **config))
    return simulate(family, from_spec(policy), list(range(seeds)), iterations, select=select)


def test_an_oracle_selector_keeps_replace_bounded_and_a_biased_verifier_pulls_towards_its_bias():
    plain = chains("replace")["test_error"].mean(0)
    oracle = chains("replace", select=spec(name="top-fraction", score="oracle"))["test_error"].mean(0)
    assert plain[-1] > 4 * plain[0] and oracle[-1] < oracle[0]  # replace grows; with an oracle filter it does not
    bias = 0.3
    biased = chains("replace", select=spec(name="top-fraction", score="verifier"), verifier_bias=bias)
    assert biased["test_error"].mean(0)[-1] == pytest.approx(5 * bias**2, rel=0.25)  # ŵ settles near w* + bias·1
    noisy = chains("replace", select=spec(name="top-fraction", score="verifier"), verifier_noise=2.0)["test_error"].mean(0)
    assert noisy[-1] > 2 * oracle[-1]


def test_selection_is_recorded_and_one_seed_at_a_time_equals_every_seed_at_once(tmp_path):
    raw = BASE | {"policies": ["replace", {"name": "mix", "real_fraction": 0.25, "select": {"name": "k-choice", "score": "self", "k": 3}}],
                  "select": {"name": "top-fraction", "score": "verifier", "oversample": 3}}
    fast = run_experiment(configlib.from_dict(raw), tmp_path / "fast", progress=False)
    loop = run_experiment(configlib.from_dict(raw | {"linreg": BASE["linreg"] | {"method": "loop"}}), tmp_path / "loop", progress=False)
    assert read_json(fast / "manifest.json")["policy_labels"] == ["replace", "mix-0.25+k-choice-self-k3-t1"]
    a = {(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(fast)}
    b = {(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(loop)}
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-9
    assert a["replace", 0, 1, "select_kept_frac"] == pytest.approx(1 / 3) and ("replace", 0, 4, "select_kept_frac") not in a
    assert a["replace", 0, 2, "select_score_kept"] > a["replace", 0, 2, "select_score_rejected"]
    assert (loop / "replace" / "seed-0" / "gen-1" / "selected.npy").exists()
    # resumed half-way, one seed at a time, the selection reopens the same sets
    for gen in loop.glob("*/seed-*/gen-[34]"):
        for f in gen.iterdir():
            f.unlink()
        gen.rmdir()
    run_experiment(configlib.from_dict(raw | {"linreg": BASE["linreg"] | {"method": "loop"}}), loop, progress=False)
    assert {(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(loop)} == b


def test_a_selection_larger_than_the_real_set_relabels_the_real_inputs_cycled(tmp_path):
    """replace-grown's generation n draws n·T examples: with a selection, example j's candidates are labels of
    real input j mod T (as the family's own sample cycles through the design), and the fast path still equals
    the loop on the same draws."""
    family = linreg.Family(linreg.Config(d=3, T=8))
    seeds = np.arange(3)
    real = family.real_data("train", seeds)
    model = family.fit(real, None, None)
    from modelcollapse.selection import synthesize

    spec3 = spec(name="top-fraction", score="oracle", oversample=3)
    data, metrics = synthesize(family, model, 20, real, stream_keys(seeds, "t", 2, "sample"), stream_keys(seeds, "t", 2, "select"),
                               None, spec3, model, len(seeds))
    rows, x, y, _ = data.labels_at(np.broadcast_to(np.arange(20), (3, 20)))
    assert (rows == np.arange(20) % 8).all()
    # each kept label is the best of its input's 3 candidates under the oracle
    w_star = family.truth(seeds)[1]
    candidates = family.sample(model, 60, family.take(real, np.broadcast_to(np.arange(20) % 8, (3, 20))),
                               stream_keys(seeds, "t", 2, "sample"), None)
    _, cx, cy, _ = candidates.labels_at(np.broadcast_to(np.arange(60), (3, 60)))
    best = np.abs(cy - np.einsum("snd,sd->sn", cx, w_star)).reshape(3, 3, 20).min(1)
    assert np.allclose(np.abs(y - np.einsum("snd,sd->sn", x, w_star)), best)
    raw = BASE | {"policies": ["replace-grown"], "select": {"name": "top-fraction", "score": "oracle", "oversample": 2}}
    fast = run_experiment(configlib.from_dict(raw), tmp_path / "fast", progress=False)
    loop = run_experiment(configlib.from_dict(raw | {"linreg": BASE["linreg"] | {"method": "loop"}}), tmp_path / "loop", progress=False)
    a = {(r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(fast)}
    b = {(r["seed"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(loop)}
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-9
    assert a[0, 3, "select_kept_frac"] == 0.5


def test_real_weight_is_weighted_least_squares_on_the_stacked_labels():
    family = linreg.Family(linreg.Config(d=3, T=16))
    seeds = np.array([1, 2])
    real = family.real_data("train", seeds)
    w = np.random.default_rng(1).standard_normal((2, 3))
    synthetic = family.sample(linreg.Fitted(w), 16, real, stream_keys(seeds, "t", 2, "sample"), None)
    train = family.concat([family.subsample(real, 4, stream_keys(seeds, "t", 2, "policy")), synthetic])  # 4 real + 16 synthetic
    weighted = family.fit(train, None, None, real_weight=0.7).w_hat_
    _, x, y, is_real = train.labels_at(np.broadcast_to(np.arange(20), (2, 20)))
    assert is_real.sum(1).tolist() == [4, 4]
    sw = np.sqrt(np.where(is_real, 0.7 / 4, 0.3 / 16))
    for i in range(2):
        assert np.allclose(weighted[i], np.linalg.lstsq(x[i] * sw[i, :, None], y[i] * sw[i], rcond=None)[0], atol=1e-10)
    plain = family.fit(train, None, None).w_hat_
    assert not np.allclose(plain, weighted)


def test_real_weight_per_policy_is_labelled_and_changes_the_chain(tmp_path):
    raw = BASE | {"policies": [{"name": "fresh", "real_fraction": 0.25}, {"name": "fresh", "real_fraction": 0.25, "real_weight": 0.8}]}
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(out)
    assert {r["policy"] for r in rows} == {"fresh-0.25", "fresh-0.25+w0.8"}
    last = {p: np.mean([r["value"] for r in rows if r["policy"] == p and r["iteration"] == 4 and r["metric"] == "test_error"])
            for p in ("fresh-0.25", "fresh-0.25+w0.8")}
    assert last["fresh-0.25"] != last["fresh-0.25+w0.8"]


# -- the vae's classifier confidence and weights ---------------------------------------------------------------


def test_vae_selection_by_a_verifier_classifier_and_its_real_weight(tmp_path, monkeypatch):
    """The verifier is a classifier of its own (not the judge); selection keeps the images it is surest of; a
    real weight reaches the fit as per-image loss weights."""
    from modelcollapse.families import vae

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table = dict(dataset="digits", channels=[8, 16], latent_dim=4, epochs=2, classifier_steps=50, eval_samples=100)
    raw = {"name": "v", "family": "vae", "iterations": 2, "seeds": 1, "device": "cpu", "vae": table,
           "policies": [{"name": "replace", "select": {"name": "top-fraction", "score": "classifier_confidence", "oversample": 2}},
                        {"name": "mix", "real_fraction": 0.5, "real_weight": 0.8}]}
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = {(r["policy"], r["iteration"], r["metric"]): r["value"] for r in read_metrics(out)}
    assert rows["replace+top-fraction-classifier_confidence-x2", 1, "select_kept_frac"] == 0.5
    assert rows["replace+top-fraction-classifier_confidence-x2", 1, "select_score_kept"] > rows["replace+top-fraction-classifier_confidence-x2", 1, "select_score_rejected"]
    family = vae.Family(vae.Config(**table), device="cpu", cache_dir=tmp_path / "cache")
    judge, verifier = family.classifier("judge"), family.classifier("verifier")
    assert not all(np.array_equal(a.detach(), b.detach()) for a, b in zip(judge.parameters(), verifier.parameters()))
    w = common.example_weights(np.array([True] * 3 + [False] * 9), 0.8)
    assert w.mean() == pytest.approx(1) and w[:3].sum() / w.sum() == pytest.approx(0.8)
    terms = np.array([5, 1, 2, 4, 4, 4])  # an LM story's predicted tokens: the shares count terms, not examples
    w = common.example_weights(np.array([True, True, False, False, False, False]), 0.25, terms)
    assert (w * terms)[:2].sum() / (w * terms).sum() == pytest.approx(0.25) and (w * terms).sum() == pytest.approx(terms.sum())


# -- the exact families: gaussian, kde, categorical -------------------------------------------------------------

EXACT_POLICIES = ["replace", {"name": "replace", "select": {"name": "top-fraction", "score": "likelihood", "oversample": 3}},
                  {"name": "accumulate-subsample", "real_weight": 0.7, "select": {"name": "k-choice", "score": "verifier", "k": 2}},
                  {"name": "mix", "real_fraction": 0.5, "real_weight": 0.3}, {"name": "accumulate", "real_weight": 0.3},
                  {"name": "fresh", "real_fraction": 0.5, "real_weight": 0.8}]


@pytest.mark.parametrize("family,table", [
    ("gaussian", {"d": 2, "n": 10, "verifier_noise": 0.5, "verifier_bias": 0.2}),
    ("kde", {"n": 12, "n_test": 20, "verifier_noise": 0.3, "dataset": "circles"}),
    ("categorical", {"k": 6, "n": 12, "verifier_noise": 0.3, "smoothing": 0.5}),
])
def test_exact_families_select_and_weigh_alike_one_seed_at_a_time_and_all_at_once(family, table):
    """check_family runs every policy above twice, cut short and resumed, and one seed at a time against
    every seed at once: the same numbers on the same draws."""
    policies = [json.loads(json.dumps(p).replace('"likelihood"', '"reward"')) if family == "categorical" else p for p in EXACT_POLICIES]
    rows = check_family(family, table, policies=policies)
    kept = [r for r in rows if r["metric"] == "select_kept_frac"]
    assert {r["value"] for r in kept} == {1 / 3, 1 / 2}


def test_gaussian_scores_are_log_densities_under_the_truth_and_the_verifier():
    from scipy.stats import multivariate_normal

    cov = [[2.0, 0.5], [0.5, 1.0]]
    fam = gaussian.Family(gaussian.Config(d=2, n=10, cov=cov, mean=[1.0, -1.0], verifier_bias=0.3))
    seeds = np.array([3, 4])
    real = fam.real_data("train", seeds)
    x = real.points_at(np.broadcast_to(np.arange(10), (2, 10)))
    assert np.allclose(fam.score(real, "likelihood", None, None, None), multivariate_normal([1.0, -1.0], cov).logpdf(x))
    assert np.allclose(fam.score(real, "verifier", None, None, None), multivariate_normal([1.3, -0.7], cov).logpdf(x))
    kept = fam.take(real, np.array([[9, 0], [4, 4]]))
    assert np.allclose(kept.parts[0].x, x[[[0], [1]], [[9, 0], [4, 4]]]) and kept.real_at(np.array([[0, 1], [0, 1]])).all()


@pytest.mark.parametrize("estimator", ["mle", "unbiased"])
def test_gaussian_real_weight_is_the_weighted_mean_and_scatter(estimator):
    fam = gaussian.Family(gaussian.Config(d=3, n=12, estimator=estimator))
    seeds = np.array([1, 2])
    real = fam.real_data("train", seeds)
    model = gaussian.Fitted(np.ones((2, 3)), np.broadcast_to(2 * np.eye(3), (2, 3, 3)))
    synthetic = fam.sample(model, 12, real, stream_keys(seeds, "t", 2, "sample"), None)
    pool = fam.concat([real, synthetic])
    train = fam.subsample(pool, 15, stream_keys(seeds, "t", 2, "policy"))  # a mix whose counts differ by seed
    w = 0.8
    fitted = fam.fit(train, None, None, real_weight=w)
    x, real_mask = train.parts[0].x, train.parts[0].real
    for s in range(2):
        a = np.where(real_mask[s], w / real_mask[s].sum(), (1 - w) / (~real_mask[s]).sum())
        mean = a @ x[s]
        cov = (a[:, None] * (x[s] - mean)).T @ (x[s] - mean) / (1 - (a**2).sum() if estimator == "unbiased" else 1)
        assert np.allclose(fitted.mean_[s], mean) and np.allclose(fitted.chol_[s] @ fitted.chol_[s].T, cov)


def test_categorical_scores_take_and_weighted_counts():
    S = 20000
    fam = categorical.Family(categorical.Config(k=5, n=20, reward=[0.0, 1.0, 2.0, 3.0, 4.0], verifier_noise=0.5))
    seeds = np.arange(S)
    real = fam.real_data("train", seeds)
    model = fam.fit(real, None, None)
    drawn = fam.sample(model, 30, real, stream_keys(seeds, "t", 2, "sample"), None)
    outcomes = drawn.outcomes()
    assert np.array_equal(np.stack([np.bincount(o, minlength=5) for o in outcomes[:50]]), drawn.counts[:50])
    assert np.array_equal(fam.score(drawn, "reward", model, None, None), outcomes.astype(float))
    verifier = fam.score(drawn, "verifier", model, None, None)
    assert np.allclose(verifier, np.take_along_axis(fam.verifier(seeds), outcomes, 1)) and not np.allclose(verifier, outcomes)
    kept = fam.take(drawn, np.tile(np.arange(10), (S, 1)))
    assert np.array_equal(kept.counts[:50], np.stack([np.bincount(o[:10], minlength=5) for o in outcomes[:50]]))
    # weighted counts: w·c_real/n_real + (1 − w)·c_syn/n_syn, and draws that follow them
    train = fam.concat([fam.subsample(real, 5, stream_keys(seeds, "t", 2, "policy")), drawn])
    fitted = fam.fit(train, None, None, real_weight=0.6)
    c_real = train.real.astype(float)
    expected = 0.6 * c_real / 5 + 0.4 * (train.counts - c_real) / 30
    assert np.allclose(fitted.p_, expected)
    again = fam.sample(fitted, 25, real, stream_keys(seeds, "t", 3, "sample"), None).counts
    q = expected.mean(0)  # E[count] = 25 p̂, averaged over seeds
    assert np.all(np.abs(again.mean(0) / 25 - q) < 4.5 * np.sqrt(q * (1 - q) / (25 * S)) + 1e-12)


def test_kde_truth_densities_integrate_to_one_and_weighted_kernels_are_the_weighted_kde():
    from scipy.stats import multivariate_normal

    for dataset, noise, lo, hi in (("moons", 0.1, -1.8, 2.8), ("circles", 0.05, -1.4, 1.4), ("blobs", 0.5, -5.0, 6.5)):
        t = np.linspace(lo, hi, 200)
        g = np.stack(np.meshgrid(t, t), -1).reshape(1, -1, 2)
        mass = np.exp(kde.truth_log_density(dataset, noise, g)).sum() * (t[1] - t[0]) ** 2
        assert mass == pytest.approx(1, abs=1e-5), dataset
    x = g[:, ::397]
    blobs = np.mean([multivariate_normal(c, 0.25).pdf(x[0]) for c in kde.BLOB_CENTRES], axis=0)
    assert np.allclose(kde.truth_log_density("blobs", 0.5, x)[0], np.log(blobs))
    fam = kde.Family(kde.Config(n=8, n_test=30, bandwidth=0.3))
    seeds = np.array([5])
    real, test = fam.real_data("train", seeds), fam.real_data("test", seeds)
    synthetic = fam.sample(fam.fit(real, None, None), 4, real, stream_keys(seeds, "t", 2, "sample"), None)
    train = fam.concat([real, synthetic])
    metrics = fam.evaluate(fam.fit(train, None, None, real_weight=0.25), test, None, None)
    points = np.concatenate(train.parts, axis=1)[0]
    a = np.array([0.25 / 8] * 8 + [0.75 / 4] * 4)
    density = sum(ai * multivariate_normal(p, 0.09).pdf(test.x[0]) for ai, p in zip(a, points))
    assert metrics["test_nll"][0] == pytest.approx(-np.log(density).mean())
    mean = a @ points
    assert metrics["mean_sq_error"][0] == pytest.approx(np.sum((mean - test.mean[0]) ** 2))
    assert metrics["trace_ratio"][0] == pytest.approx((a @ ((points - mean) ** 2).sum(1) + 2 * 0.09) / test.trace[0])


def test_a_kde_without_noise_has_no_likelihood_to_select_by(tmp_path):
    """Refused when the config is read (one line, exit 2, nothing written), not at the first selection."""
    fam = kde.Family(kde.Config(noise=0.0))
    real = fam.real_data("train", np.array([0]))
    with pytest.raises(BadInput, match="kde.noise = 0: the moons distribution has no density"):
        fam.score(real, "likelihood", None, None, None)
    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "kde"\npolicies = ["accumulate", {name = "replace", select = {name = "top-fraction", score = "verifier"}}]\n'
                   'iterations = 2\nseeds = 1\n[kde]\nnoise = 0.0\n')
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: config error: kde.noise = 0: the moons distribution has no density, so the "
                                             "'verifier' score is undefined; give noise > 0"]
    assert not (tmp_path / "run").exists()
    configlib.from_dict({"family": "kde", "policies": ["replace"], "iterations": 2, "seeds": 1, "kde": {"noise": 0.0}})  # no selection: fine


def test_the_report_draws_a_familys_curve_for_the_runs_own_selection(tmp_path):
    """A top-level [select] reaches the family's theory: categorical k-choice on the reward has a curve, a
    gaussian with a selection has none (its plain curve would be wrong)."""
    from modelcollapse.report import Run, theory_for

    raw = {"name": "c", "family": "categorical", "policies": ["replace"], "iterations": 3, "seeds": 2,
           "categorical": {"k": 3, "n": 6}, "select": {"name": "k-choice", "score": "reward", "k": 3}}
    run = Run(run_experiment(configlib.from_dict(raw), tmp_path / "c", progress=False))
    curve = theory_for(run, "replace", "reward", 3)
    plain = categorical.theory(categorical.Config(k=3, n=6), from_spec("replace"), 3)["reward"]
    assert curve is not None and curve[1] > plain[1] + 0.05
    raw = {"name": "g", "family": "gaussian", "policies": ["replace"], "iterations": 2, "seeds": 2, "gaussian": {"d": 2, "n": 5},
           "select": {"name": "top-fraction", "score": "likelihood"}}
    assert theory_for(Run(run_experiment(configlib.from_dict(raw), tmp_path / "g", progress=False)), "replace", "trace_ratio", 2) is None
