"""RoI aggregation speed at demo and CT size, against two baselines in the same run.

``engine.aggregate.roi_statistics`` (two float64 ``bincount`` passes per class, one per sign) is timed
against

* **one scatter of the stacked signs** (the engine's previous formulation, kept here as the
  baseline): φ(a) = (|a|, max(a, 0), max(−a, 0)) stacked in float64, the voxels inside a RoI gathered,
  and one ``bincount`` over sign-offset labels; and
* **masked sums per (class, RoI)** (the reference implementation's formulation), timed on the first
  ``--loop-classes`` classes and extrapolated per class, since it costs K x R full-volume passes.

All three are checked against each other (float64 sums, max relative difference). Synthetic maps and
labels (seeded, uniform RoI labels with −1 outside); one torch thread by default (an actor's). The
load average is recorded: on a shared machine only the ratios mean anything.

    python benchmarks/aggregation.py --json aggregation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.aggregate import roi_statistics  # noqa: E402


def stacked_scatter(maps: torch.Tensor, roi_labels: torch.Tensor, n_rois: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous formulation: (K, 3, R) sums and (K, 3) totals from one scatter of the stacked signs."""
    k = maps.shape[0]
    labels = roi_labels.reshape(-1).long()
    inside = labels >= 0
    index = (labels[inside][None, :] + torch.arange(3)[:, None] * n_rois).reshape(-1)
    sums = torch.empty((k, 3, n_rois), dtype=torch.float64)
    totals = torch.empty((k, 3), dtype=torch.float64)
    flat = maps.reshape(k, -1)
    for c in range(k):
        a = flat[c].double()
        p = torch.stack([a.abs(), a.clamp_min(0), (-a).clamp_min(0)])
        totals[c] = p.sum(dim=1)
        sums[c] = torch.bincount(index, weights=p[:, inside].reshape(-1), minlength=3 * n_rois).reshape(3, n_rois)
    return sums, totals


def masked_sums(maps: torch.Tensor, roi_labels: torch.Tensor, n_rois: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference implementation's way: one masked full-volume sum per (class, RoI, sign)."""
    k = maps.shape[0]
    sums = torch.empty((k, 3, n_rois), dtype=torch.float64)
    totals = torch.empty((k, 3), dtype=torch.float64)
    for c in range(k):
        a = maps[c].double()
        phis = (a.abs(), a.clamp_min(0), (-a).clamp_min(0))
        for s, p in enumerate(phis):
            totals[c, s] = p.sum()
            for r in range(n_rois):
                sums[c, s, r] = p[roi_labels == r].sum()
    return sums, totals


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up, and the value compared
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def case(shape: tuple[int, int, int], k: int, n_rois: int, repeats: int, loop_classes: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn((k, *shape), generator=g)
    labels = torch.randint(-1, n_rois, shape, generator=g)
    t_engine, stats = timed(lambda: roi_statistics(maps, labels, n_rois), repeats)
    t_stacked, (s_sums, s_tot) = timed(lambda: stacked_scatter(maps, labels, n_rois), repeats)
    kl = min(loop_classes, k)
    t_loop, (l_sums, l_tot) = timed(lambda: masked_sums(maps[:kl], labels, n_rois), max(1, repeats // 2))
    t_loop_per_class = t_loop / kl
    return {
        "shape": list(shape), "classes": k, "rois": n_rois, "voxels": int(labels.numel()),
        "engine_s": t_engine, "stacked_scatter_s": t_stacked,
        "masked_sums_s_per_class": t_loop_per_class, "masked_sums_classes_timed": kl,
        "masked_sums_s_extrapolated": t_loop_per_class * k,
        "stacked_over_engine": t_stacked / t_engine,
        "masked_sums_over_engine": t_loop_per_class * k / t_engine,
        "engine_s_per_class": t_engine / k,
        "engine_voxels_per_s": k * labels.numel() / t_engine,
        "rel_diff_engine_vs_stacked": max(rel_diff(stats.sums, s_sums), rel_diff(stats.totals, s_tot)),
        "rel_diff_engine_vs_masked_sums": max(rel_diff(stats.sums[:kl], l_sums), rel_diff(stats.totals[:kl], l_tot)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-shape", type=int, nargs=3, default=(48, 40, 40))
    ap.add_argument("--ct-shape", type=int, nargs=3, default=(256, 256, 224), help="0 0 0 to skip")
    ap.add_argument("--classes", type=int, default=17)
    ap.add_argument("--ct-classes", type=int, default=4, help="classes timed at CT size (per-class figures scale)")
    ap.add_argument("--rois", type=int, default=104, help="RoIs at CT size (TotalSegmentator's 104); demo: --classes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-classes", type=int, default=1, help="classes timed with the masked-sum loop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cases = {"demo": case(tuple(args.demo_shape), args.classes, args.classes, args.repeats, args.loop_classes)}
    if all(args.ct_shape):
        cases["ct"] = case(tuple(args.ct_shape), args.ct_classes, args.rois, max(1, args.repeats // 2),
                           args.loop_classes)
    result = {"machine": {"nproc": os.cpu_count(), "cpu": platform.processor(), "torch": torch.__version__,
                          "threads": args.threads},
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "cases": cases}
    for name, c in cases.items():
        print(f"{name}: {c['classes']} classes x {c['rois']} RoIs on {tuple(c['shape'])}: engine "
              f"{c['engine_s'] * 1e3:.1f} ms ({c['engine_s_per_class'] * 1e3:.1f} ms/class, "
              f"{c['engine_voxels_per_s'] / 1e6:.0f} M voxel-classes/s); stacked scatter "
              f"{c['stacked_over_engine']:.2f}x slower; masked sums per RoI {c['masked_sums_over_engine']:.0f}x slower "
              f"(timed on {c['masked_sums_classes_timed']} class(es), extrapolated); max relative difference "
              f"{c['rel_diff_engine_vs_stacked']:.1e} / {c['rel_diff_engine_vs_masked_sums']:.1e}")
    print(f"load average before {load_before[0]:.1f}, after {result['load_average_after'][0]:.1f} (shared machine)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
