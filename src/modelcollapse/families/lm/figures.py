"""The `lm` family's own report figure: the distribution of the sampled stories' perplexity under the
reference model (generation 1's, or the base), generation by generation — Shumailov et al.'s (Nature 2024)
Fig. 1b: as the generations go, low-perplexity text piles up and the tail of rare, high-perplexity text thins
out (or, in a degrading model, the whole distribution moves right)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TITLE = "perplexity of each sampled story under the reference model, by generation (every seed pooled)"


def _generations(seed_dir: Path) -> dict[int, np.ndarray]:
    out = {}
    for gen in seed_dir.glob("gen-*"):
        path = gen / "sample_ppl.npy"
        if path.exists() and (gen / "metrics.json").exists():  # finished generations only
            out[int(gen.name.split("-")[1])] = np.load(path)
    return out


def report_figures(run_dir: Path, out_dir: Path) -> list[tuple[str, str]]:
    """One figure, a panel per policy: the share of stories in each of 40 log-spaced perplexity bins, a line
    per generation."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    policies, seeds = manifest.get("policy_labels") or [], manifest["config"]["seeds"]
    data = {}
    for p in policies:
        pooled: dict[int, list[np.ndarray]] = {}
        for s in seeds:
            for n, v in _generations(Path(run_dir) / p / f"seed-{s}").items():
                pooled.setdefault(n, []).append(v)
        if pooled:
            data[p] = {n: np.concatenate(v) for n, v in sorted(pooled.items())}
    if not data:
        return []
    values = np.concatenate([v for gens in data.values() for v in gens.values()])
    values = values[np.isfinite(values) & (values > 0)]
    bins = np.geomspace(values.min(), values.max() * 1.0001, 40)
    last = max(n for gens in data.values() for n in gens)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(data), figsize=(4.6 * len(data), 3.6), sharex=True, sharey=True, squeeze=False)
    for ax, (policy, gens) in zip(axes[0], data.items()):
        for n, v in gens.items():
            ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), histtype="step", lw=1.6, color=cmap((n - 1) / max(1, last - 1)),
                    label=f"gen {n}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(policy)
        ax.set_xlabel("perplexity")
    axes[0][0].set_ylabel("share of stories")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "sample-ppl.png", dpi=110)
    plt.close(fig)
    return [(TITLE, "sample-ppl.png")]
