"""Exactness of the engine's layouts and kernels across MONAI architectures, against float64.

For each architecture (untrained, seeded, smooth GELU activations so that fp32 must agree with
float64 to rounding: no ReLU kinks to flip), Saliency of every class over one window is computed
in float64 (contiguous, PyTorch's kernels: the reference) and in float32 three ways: contiguous on
PyTorch's kernels, channels-last on PyTorch's kernels, and channels-last on the engine's kernels
(the CPU default). It prints the worst class's max-norm relative error of each against the
reference. Without the engine's instance-norm guard, channels-last runs of models whose instance
norm is followed by GELU or an in-place residual add were off by errors of order 1
(``engine.attribution.kernels``, BENCHMARKS.md).

    python benchmarks/layout_exactness.py --json layouts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.attribution import SlidingWindow, explain_volume  # noqa: E402

#: (label, memory_format, kernels); the last is the engine's CPU default
VARIANTS = (("contiguous/torch", "contiguous", "torch"),
            ("channels-last/torch", "channels_last", "torch"),
            ("channels-last/engine", "channels_last", "engine"))


def architectures() -> dict[str, Callable[[], torch.nn.Module]]:
    from monai.networks import nets

    dyn = dict(kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], act_name="gelu")
    return {
        "UNet (instance norm)": lambda: nets.UNet(3, 1, 4, (8, 16, 32), (2, 2), num_res_units=1, act="gelu"),
        "UNet (batch norm)": lambda: nets.UNet(3, 1, 4, (8, 16, 32), (2, 2), num_res_units=2, act="gelu",
                                               norm="batch"),
        "DynUNet, residual blocks": lambda: nets.DynUNet(3, 1, 4, res_block=True, **dyn),
        "DynUNet, plain blocks": lambda: nets.DynUNet(3, 1, 4, res_block=False, **dyn),
        "DynUNet, residual, batch norm": lambda: nets.DynUNet(3, 1, 4, res_block=True, norm_name="batch", **dyn),
        "SegResNet (group norm)": lambda: nets.SegResNet(3, 8, 1, 4, act="gelu"),
        "BasicUNet": lambda: nets.BasicUNet(3, 1, 4, features=(8, 8, 16, 32, 64, 8), act="gelu"),
    }


def maps(model: torch.nn.Module, image: torch.Tensor, size: tuple[int, ...], fmt: str, kernels: str) -> dict[str, Any]:
    window = SlidingWindow(roi_size=size, memory_format=fmt, kernels=kernels)  # type: ignore[arg-type]
    return explain_volume(model, image, method="saliency", window=window, class_names=[f"c{i}" for i in range(4)],
                          return_maps=True).maps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32, help="window and volume side (default 32)")
    ap.add_argument("--only", nargs="*", default=None, help="architectures to run (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    size = (args.size,) * 3
    rows: dict[str, dict[str, float]] = {}
    for name, make in architectures().items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = make().eval()
        image = torch.rand(1, *size)
        ref = maps(copy.deepcopy(model).double(), image.double(), size, "contiguous", "torch")
        rows[name] = {}
        for label, fmt, kernels in VARIANTS:
            got = maps(copy.deepcopy(model), image, size, fmt, kernels)
            rows[name][label] = max(float((got[c].double() - ref[c]).abs().max() / ref[c].abs().max()) for c in ref)
        print(f"{name:30s} " + "  ".join(f"{k} {v:.1e}" for k, v in rows[name].items()), flush=True)
    worst = max(v for r in rows.values() for v in r.values())
    print(f"worst fp32 error against float64: {worst:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "errors": rows, "worst": worst}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
