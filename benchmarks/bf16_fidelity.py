"""Fidelity of bf16 autocast: rank correlation of RoI importances against fp32 on the same inputs.

Runs anywhere bf16 autocast does (CPU here; on a GPU pass --device cuda). For each phantom and
each explained class, the Spearman correlation between the fp32 and bf16 mass vectors (sign abs).

    python benchmarks/bf16_fidelity.py --patients 4 --samples 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from engine import phantoms
from engine.attribution import SlidingWindow, explain_volume
from engine.labels import THORAX_CLASSES
from engine.models import DEMO_ROI_SIZE, demo_model
from engine.training import scale_hu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model = demo_model().module.to(args.device)
    rhos: list[float] = []
    for i in range(args.patients):
        ph = phantoms.make_phantom(i, seed=1)
        x = torch.from_numpy(scale_hu(ph.image))[None].float()
        kw = dict(method="smoothgrad", n_samples=args.samples, class_names=THORAX_CLASSES, device=args.device)
        fp32 = explain_volume(model, x, window=SlidingWindow(roi_size=DEMO_ROI_SIZE), **kw).importances
        bf16 = explain_volume(model, x, window=SlidingWindow(roi_size=DEMO_ROI_SIZE, autocast=torch.bfloat16),
                              **kw).importances
        both = fp32.join(bf16, on=["target", "roi", "stat", "sign"], suffix="_bf16")
        both = both.filter((both["stat"] == "mass") & (both["sign"] == "abs"))
        for target in both["target"].unique().to_list():
            part = both.filter(both["target"] == target)
            rhos.append(float(spearmanr(part["value"], part["value_bf16"]).statistic))
    out = {"pairs": len(rhos), "median": float(np.median(rhos)), "min": float(np.min(rhos)),
           "device": args.device, "patients": args.patients, "samples": args.samples}
    print(f"bf16 vs fp32 RoI mass rankings over {out['pairs']} (patient, class) pairs on {args.device}: "
          f"Spearman median {out['median']:.4f}, min {out['min']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
