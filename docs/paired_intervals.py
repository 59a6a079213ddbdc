"""Last-iteration values per policy and seed-paired differences, with 95% t-intervals, from a run's metrics.jsonl.

    python docs/paired_intervals.py RUN_DIR [METRIC ...]

For each metric: each policy's value at the last iteration (mean ± half-width of the 95% t-interval over
seeds); its rise from iteration 1 to the last, paired by seed; and replace − accumulate, paired by seed, at the
last iteration and for the rise. Seeds must be the same under every policy (paired).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats


def interval(x) -> str:
    x = np.asarray(x, dtype=float)
    h = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return f"{x.mean():+.4f} ± {h:.4f} [{x.mean() - h:+.4f}, {x.mean() + h:+.4f}]"


def main(run: Path, metrics: list[str]) -> None:
    table = defaultdict(dict)  # (metric, policy) -> {(seed, iteration): value}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        table[r["metric"], r["policy"]][r["seed"], r["iteration"]] = r["value"]
    for metric in metrics or ["test_loss"]:
        policies = [p for (m, p) in table if m == metric]
        last = max(n for p in policies for (_, n) in table[metric, p])
        seeds = sorted({s for p in policies for (s, n) in table[metric, p] if n == last})
        print(f"{metric} ({len(seeds)} seeds, iteration {last}):")
        rise = {}
        for p in policies:
            values = table[metric, p]
            print(f"  {p:<12} last {interval([values[s, last] for s in seeds])}")
            rise[p] = [values[s, last] - values[s, 1] for s in seeds]
            print(f"  {p:<12} rise {interval(rise[p])}")
        if {"replace", "accumulate"} <= set(policies):
            r, a = table[metric, "replace"], table[metric, "accumulate"]
            print(f"  replace − accumulate, last: {interval([r[s, last] - a[s, last] for s in seeds])}")
            print(f"  replace − accumulate, rise: {interval(np.subtract(rise['replace'], rise['accumulate']))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
