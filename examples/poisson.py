"""A family of your own: fit a Poisson rate to counts, generation after generation."""

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import poisson

PRIMARY_METRIC = "rate_sq_error"
CLAIM = "The fitted rate drifts away from the truth under replace and stays near it under accumulate."  # the report's words
METRICS = {  # name: (definition, unit, which way is better)
    "rate_sq_error": ("(λ̂ − λ₀)², the fitted rate's squared error", "(counts/draw)²", "lower"),
    "test_nll": ("mean negative log-likelihood of real held-out counts", "nats/count", "lower"),
}


class Config(BaseModel):  # the config's [poisson] table, named after this file
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(4.0, gt=0, description="the true rate λ₀")
    n: int = Field(100, ge=1, description="real counts per generation")


class Family:
    def __init__(self, config: Config, *, device: str, cache_dir: Path):
        self.config = config

    def real_data(self, split, seed, draw=0):  # a fresh draw for every (seed, split, draw)
        g = np.random.default_rng([seed, split == "test", draw])
        return g.poisson(self.config.rate, self.config.n)

    def size(self, data):
        return len(data)

    def concat(self, datasets):
        return np.concatenate(datasets)

    def subsample(self, data, size, seed):
        return np.random.default_rng(seed).choice(data, size, replace=False)

    def fit(self, train, seed, workdir):
        return float(train.mean())  # the maximum-likelihood rate

    def evaluate(self, rate, test, seed, workdir):
        return {"rate_sq_error": (rate - self.config.rate) ** 2,
                "test_nll": -poisson.logpmf(test, max(rate, 1e-12)).mean()}

    def sample(self, rate, size, like, seed, workdir):
        counts = np.random.default_rng(seed).poisson(rate, size)
        np.save(Path(workdir) / "counts.npy", counts)
        return counts

    def load_sample(self, workdir):
        return np.load(Path(workdir) / "counts.npy")

    def save_model(self, rate, workdir):
        (Path(workdir) / "rate.json").write_text(json.dumps(rate))

    def load_model(self, workdir):
        return json.loads((Path(workdir) / "rate.json").read_text())
