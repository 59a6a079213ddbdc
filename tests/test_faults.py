"""Fault injection, short form: real runs of linreg, a tiny LM and a tiny VAE killed, interrupted and damaged
at random moments, resumed, and compared with uninterrupted runs byte for byte. The long form is
`python -m modelcollapse.testing.faults --rounds 30 --out DIR` (README, "The run directory")."""

import os

from modelcollapse.testing import faults


def test_runs_killed_interrupted_and_damaged_at_random_end_as_uninterrupted_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(faults.Path(faults.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    # a few faults a round: every process start costs seconds of imports, and the long form runs hundreds
    results = faults.run(["linreg"], 2, tmp_path / "linreg", seed=1, log=lambda line: None, max_faults=3)
    results += faults.run(["lm", "vae"], 1, tmp_path / "nets", seed=2, log=lambda line: None, max_faults=2)
    assert sum(len(r.faults) for r in results) >= 4  # faults did land
    assert all(r.outcome == "identical" for r in results), [(r.family, r.outcome, r.faults, r.detail) for r in results]
