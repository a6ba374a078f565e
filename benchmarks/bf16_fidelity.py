"""Fidelity and speed of bf16 autocast: RoI importances and timings against fp32 on the same inputs.

Runs anywhere bf16 autocast does (CPU here; on a GPU pass --device cuda). For each demo phantom
and each explained class, the Spearman correlation between the fp32 and bf16 RoI-mass vectors
(sign abs; goals: median >= 0.999, minimum >= 0.99), the bf16 speed-up over fp32 measured on the
same patients in the same process (goal >= 1.8), and, with ``--anomaly``, how much the
isolation-forest anomaly ranking of the patients changes (Spearman and top-k overlap of the
per-patient mean score, same forest seed).

    python benchmarks/bf16_fidelity.py --patients 8 --samples 6 --anomaly --json bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import phantoms  # noqa: E402
from engine.attribution import SlidingWindow, explain_volume  # noqa: E402
from engine.labels import THORAX_CLASSES  # noqa: E402
from engine.models import DEMO_ROI_SIZE, demo_model  # noqa: E402
from engine.runtime.heap import keep_cpu_heap  # noqa: E402
from engine.training import scale_hu  # noqa: E402


def anomaly_scores(mass: dict[str, dict[tuple[str, str], float]], seed: int = 0) -> np.ndarray:
    """Per-patient mean isolation-forest score over classes (higher = more anomalous), as the demo ranks."""
    from sklearn.ensemble import IsolationForest

    patients = sorted(mass)
    targets = sorted({t for p in mass.values() for t, _ in p})
    rois = sorted({r for p in mass.values() for _, r in p})
    scores = np.zeros(len(patients))
    for t in targets:
        feats = np.array([[mass[p].get((t, r), 0.0) for r in rois] for p in patients])
        forest = IsolationForest(n_estimators=100, random_state=seed).fit(feats)
        scores += -forest.score_samples(feats)
    return scores / max(len(targets), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--anomaly", action="store_true", help="also compare the anomaly rankings of the patients")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    heap = keep_cpu_heap()  # as the engine's workers and the CLI set it (engine.runtime.heap)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = demo_model().module.to(args.device).eval()
    rhos: list[float] = []
    t32: list[float] = []
    t16: list[float] = []
    mass32: dict[str, dict[tuple[str, str], float]] = {}
    mass16: dict[str, dict[tuple[str, str], float]] = {}
    kw = dict(method="smoothgrad", n_samples=args.samples, sigma=0.1, input_range=(0.0, 1.0),
              class_names=THORAX_CLASSES, device=args.device, joined_rois={"lung": THORAX_CLASSES[1:6]})
    # the demo cohort's phantoms (seed 0, 16% with planted anomalies)
    schedule = phantoms.anomaly_schedule(args.patients, seed=0, anomaly_fraction=0.16)
    for i in range(args.patients):
        ph = phantoms.make_phantom(i, seed=0, anomaly_type=schedule[i])
        x = torch.from_numpy(scale_hu(ph.image))[None].float()
        t0 = time.perf_counter()
        fp32 = explain_volume(model, x, window=SlidingWindow(roi_size=DEMO_ROI_SIZE), **kw).importances
        t1 = time.perf_counter()
        bf16 = explain_volume(model, x, window=SlidingWindow(roi_size=DEMO_ROI_SIZE, autocast=torch.bfloat16),
                              **kw).importances
        t2 = time.perf_counter()
        if i > 0:  # the first patient warms oneDNN's kernel caches of both precisions
            t32.append(t1 - t0)
            t16.append(t2 - t1)
        both = fp32.join(bf16, on=["target", "roi", "stat", "sign"], suffix="_bf16")
        both = both.filter((both["stat"] == "mass") & (both["sign"] == "abs"))
        mass32[str(i)] = {(t, r): v for t, r, v in both.select("target", "roi", "value").iter_rows()}
        mass16[str(i)] = {(t, r): v for t, r, v in both.select("target", "roi", "value_bf16").iter_rows()}
        for target in both["target"].unique().to_list():
            part = both.filter(both["target"] == target)
            rhos.append(float(spearmanr(part["value"], part["value_bf16"]).statistic))
        print(f"patient {i}: fp32 {t1 - t0:.2f}s, bf16 {t2 - t1:.2f}s", flush=True)
    out = {"pairs": len(rhos), "median": float(np.median(rhos)), "min": float(np.min(rhos)),
           "device": args.device, "patients": args.patients, "samples": args.samples, "threads": args.threads,
           "fp32_s_per_patient": statistics.median(t32) if t32 else None,
           "bf16_s_per_patient": statistics.median(t16) if t16 else None,
           "bf16_speedup": statistics.median(a / b for a, b in zip(t32, t16)) if t32 else None,
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_heap": heap.reason}
    print(f"bf16 vs fp32 RoI mass rankings over {out['pairs']} (patient, class) pairs on {args.device}: "
          f"Spearman median {out['median']:.4f} (goal >= 0.999), min {out['min']:.4f} (goal >= 0.99)")
    if t32:
        print(f"s/patient: fp32 {out['fp32_s_per_patient']:.2f}, bf16 {out['bf16_s_per_patient']:.2f}: "
              f"bf16 speed-up {out['bf16_speedup']:.2f} (goal >= 1.8)")
    if args.anomaly and args.patients >= 3:
        s32, s16 = anomaly_scores(mass32), anomaly_scores(mass16)
        k = max(1, round(0.16 * args.patients))
        top32, top16 = set(np.argsort(-s32)[:k].tolist()), set(np.argsort(-s16)[:k].tolist())
        out["anomaly_rank_spearman"] = float(spearmanr(s32, s16).statistic)
        out["anomaly_top_k"] = k
        out["anomaly_top_k_overlap"] = len(top32 & top16) / k
        print(f"anomaly ranking of the patients: Spearman {out['anomaly_rank_spearman']:.3f}, top-{k} overlap "
              f"{out['anomaly_top_k_overlap']:.2f}")
    print(f"load average before {load_before[0]:.1f}, after {out['load_average_after'][0]:.1f} (shared machine); "
          f"CPU heap: {heap.reason}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
