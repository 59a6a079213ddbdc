"""`check_family`: does a family keep the contract? In the spirit of scikit-learn's `check_estimator`.

    from modelcollapse.testing import check_family
    check_family("path/to/my_family.py", {"n": 50})      # or "my_package.my_module", or a built-in name

It runs the family's real code, small: every method once by hand (fit / evaluate / sample / save / load round
trips, sizes, the same seed giving the same result), then the real loop over every registered policy, twice
(the same numbers), and once more cut short by a failure and resumed (the same metrics.jsonl as the
uninterrupted run). A batched family is also checked one seed at a time against every seed at once.
It raises AssertionError saying what broke; it returns the uninterrupted run's metric rows.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import numpy as np

from modelcollapse import config as configlib
from modelcollapse.families import load_family
from modelcollapse.policies import POLICIES
from modelcollapse.seeding import stream_keys, stream_seed
from modelcollapse.store import read_metrics


def _policies() -> list:
    """One entry of every registered policy (those with parameters at a middling value)."""
    out = []
    for name, cls in POLICIES.items():
        required = {k: 0.5 for k, f in cls.model_fields.items() if k != "name" and f.is_required()}
        out.append({"name": name, **required})
    return out


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: metric names differ ({sorted(a)} vs {sorted(b)})"
    for k in a:
        x, y = np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float)
        assert np.allclose(x, y, rtol=1e-7, atol=1e-9, equal_nan=False), f"{what}: {k} differs ({x} vs {y})"


def check_family(family: str, config: dict | None = None, *, seeds: int = 2, iterations: int = 3, policies: list | None = None) -> list[dict]:
    """Check the family `family` (as a config names it) with `config` as its table; see the module docstring.
    `policies` (default: every registered one) trims the loop's part for families whose fits take seconds."""
    spec = load_family(family)
    table = dict(config or {})
    fc = spec.Config(**table)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fam = spec.build(fc, "cpu", tmp / "cache")
        batched = bool(getattr(fam, "batched", False))
        base = np.array([0]) if batched else 0

        def key(*path):
            return stream_keys([0], *path) if batched else stream_seed(0, *path)

        # real data: both splits, sizes, concat and subsample
        real, test = fam.real_data("train", base), fam.real_data("test", base)
        n = fam.size(real)
        assert isinstance(n, (int, np.integer)) and n > 1, f"size(real) must be a count > 1 (got {n!r})"
        assert fam.size(fam.concat([real, real])) == 2 * n, "size(concat([real, real])) must be twice size(real)"
        half = fam.subsample(real, n // 2, key("check", 1, "policy"))
        if getattr(fam, "grouped", False):  # whole groups: at least what was asked, less than everything
            assert n // 2 <= fam.size(half) < n, f"subsample(real, {n // 2}) of {n} holds {fam.size(half)} examples"
        else:
            assert fam.size(half) == n // 2, f"subsample(real, {n // 2}) holds {fam.size(half)} examples"

        # fit / evaluate / sample and their files
        gen = tmp / "gen"
        gen.mkdir()
        model = fam.fit(real, key("check", 1, "fit"), gen)
        metrics = fam.evaluate(model, test, key("check", 1, "evaluate"), gen)
        assert isinstance(metrics, dict) and metrics, "evaluate must return named metrics"
        assert all(np.all(np.isfinite(np.asarray(v, dtype=float))) for v in metrics.values()), f"metrics must be finite: {metrics}"
        if spec.primary_metric is not None:
            assert spec.primary_metric in metrics, f"PRIMARY_METRIC {spec.primary_metric!r} is not among {sorted(metrics)}"
        (tmp / "gen-again").mkdir()
        again = fam.evaluate(fam.fit(real, key("check", 1, "fit"), tmp / "gen-again"), test, key("check", 1, "evaluate"), tmp / "gen-again")
        _same(metrics, again, "the same seed must give the same fit and metrics")
        fam.save_model(model, gen)
        _same(metrics, fam.evaluate(fam.load_model(gen), test, key("check", 1, "evaluate"), gen), "load_model(save_model(model)) must evaluate alike")
        for size in (n, 2 * n, max(1, n // 3)):
            synthetic = fam.sample(model, size, real, key("check", 2, "sample"), gen)
            assert fam.size(synthetic) == size, f"sample(model, {size}) holds {fam.size(synthetic)} examples"
            reopened = fam.load_sample(gen)
            assert fam.size(reopened) == size, "load_sample must reopen what sample wrote"
            fits = [tmp / f"fit-{size}-{k}" for k in range(2)]
            for d in fits:
                d.mkdir()
            _same(fam.evaluate(fam.fit(synthetic, key("check", 2, "fit"), fits[0]), test, key("check", 2, "evaluate"), fits[0]),
                  fam.evaluate(fam.fit(reopened, key("check", 2, "fit"), fits[1]), test, key("check", 2, "evaluate"), fits[1]),
                  "a model fit on load_sample's data must equal one fit on sample's")

        # the real loop: every policy, twice, then cut short and resumed
        raw = {"name": "check", "family": family, "policies": policies or _policies(), "iterations": iterations, "seeds": seeds,
               spec.table: table}
        runs = {}
        from modelcollapse.loop import run_experiment

        for name in ("a", "b"):
            runs[name] = read_metrics(run_experiment(configlib.from_dict(raw), tmp / name, progress=False))
        expected_rows = len(raw["policies"]) * seeds * iterations * len(metrics)
        written = sum(not r["metric"].startswith("select_") for r in runs["a"])  # a selection adds its own rows
        assert written == expected_rows, f"the run wrote {written} metric rows, expected {expected_rows}"
        assert runs["a"] == runs["b"], "the same config must give the same metrics"
        _check_resume(spec.Family, raw, tmp, runs["a"])
        if batched:
            one = read_metrics(run_experiment(configlib.from_dict(raw | {spec.table: table | {"method": "loop"}}), tmp / "loop", progress=False))
            by_key = {(r["policy"], r["seed"], r["iteration"], r["metric"]): r["value"] for r in one}
            for r in runs["a"]:
                v = by_key[r["policy"], r["seed"], r["iteration"], r["metric"]]
                assert math.isclose(v, r["value"], rel_tol=1e-9, abs_tol=1e-9), f"one seed at a time must equal every seed at once: {r} vs {v}"
    return runs["a"]


def _check_resume(family_cls, raw: dict, tmp: Path, whole: list[dict]) -> None:
    """Fail the run part-way (the k-th fit raises), resume it, and compare with the uninterrupted run."""
    fit, calls = family_cls.fit, [0]

    @functools.wraps(fit)  # the same signature: the loop gives it what it gives fit (e.g. `previous`)
    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("check_family: a failure injected part-way through the run")
        return fit(self, *a, **k)

    from modelcollapse.loop import run_experiment

    family_cls.fit = failing
    try:
        run_experiment(configlib.from_dict(raw), tmp / "cut", progress=False)
    except RuntimeError:
        pass
    finally:
        family_cls.fit = fit
    assert calls[0] >= 3, "the injected failure never happened: the run fit fewer than three models"
    resumed = read_metrics(run_experiment(configlib.from_dict(raw), tmp / "cut", progress=False))
    assert resumed == whole, "a resumed run must end with the metrics of an uninterrupted one"

