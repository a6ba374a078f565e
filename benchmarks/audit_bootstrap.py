"""The audit's effect-size interval: the rank-based bootstrap against the pairwise baseline.

One two-group test (Mann-Whitney, rank-biserial) at several cohort sizes, in the same run:

(a) baseline: the former pairwise definition, all ``n_boot`` resamples at once, an
    (n_boot, n_x, n_y) array of differences - O(B n^2) time and memory;
(b) the engine: ``engine.analytics.audit.compare_groups`` - ranks sorted once, each resample its
    counts of each value, BOOT_BATCH resamples at a time (O(n log n) + O(B n) time, O(BOOT_BATCH n)
    memory); above ``BOOT_MAX_N`` patients DeLong's interval (O(n log n)).

It prints seconds and peak traced memory (tracemalloc) per test, and baseline/engine ratios where
the baseline fits in memory (it is skipped above ``--baseline-max-n``).

    python benchmarks/audit_bootstrap.py --sizes 200,1000,10000,100000 --n-boot 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from typing import Any

import numpy as np

from engine.analytics.audit import BOOT_MAX_N, compare_groups


def pairwise_baseline(x: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    bx = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    by = y[rng.integers(0, y.size, size=(n_boot, y.size))]
    d = bx[:, :, None] - by[:, None, :]
    r = ((d > 0).sum(axis=(1, 2)) - (d < 0).sum(axis=(1, 2))) / (x.size * y.size)
    lo, hi = np.percentile(r, [2.5, 97.5])
    return float(lo), float(hi)


def measure(fn: Any) -> tuple[float, float, Any]:
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,1000,10000,100000", help="patients per test, comma-separated")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--baseline-max-n", type=int, default=400, help="largest n for the O(B n^2) baseline")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(0)
        x, y = rng.normal(0.2, 1, n // 2), rng.normal(0, 1, n - n // 2)
        s_new, m_new, res = measure(lambda: compare_groups([x, y], n_boot=args.n_boot, rng=np.random.default_rng(1)))
        row: dict[str, Any] = {"n": n, "engine_s": round(s_new, 3), "engine_peak_mb": round(m_new, 1),
                               "interval": "delong" if n > BOOT_MAX_N else "bootstrap",
                               "ci": [round(res["ci_low"], 4), round(res["ci_high"], 4)]}
        if n <= args.baseline_max_n:
            s_old, m_old, ci = measure(lambda: pairwise_baseline(x, y, args.n_boot, np.random.default_rng(1)))
            row |= {"baseline_s": round(s_old, 3), "baseline_peak_mb": round(m_old, 1),
                    "time_ratio": round(s_old / s_new, 2), "memory_ratio": round(m_old / max(m_new, 1e-6), 1),
                    "baseline_ci": [round(ci[0], 4), round(ci[1], 4)]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "n_boot": args.n_boot, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
