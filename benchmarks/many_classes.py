"""Many classes: 118 output channels (TotalSegmentator's 117 + background) at the demo phantoms' size.

One demo-size phantom (48 x 40 x 40 voxels, one window), a network with 118 outputs and random
weights (``--arch``: nnU-Net's PlainConvUNet at the demo widths, or the demo UNet), plus a constant logit bump that makes every class win in its own slab
(so all 118 classes are predicted and explained; the bump adds nothing to the gradients or cost).
Vanilla gradients (saliency), RoIs = the 118 predicted segments. Each setting runs in a fresh
subprocess, measuring the wall time of ``explain_volume`` (median of ``--repeats``) and the peak
memory (ru_maxrss) minus a baseline subprocess that builds the model and runs one forward:

* the 17-class demo layout (baseline in the same run) and 118 classes, ratio printed;
* 118 classes with ``class_chunk`` = all, 32 and 8: peak memory is bounded by the chunk;
* store: one 118-class patient's rows written with ``Store.write_patient`` (seconds, rows, bytes).

    python benchmarks/many_classes.py --arch nnunet --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPE = (48, 40, 40)


def network(arch: str, n: int) -> torch.nn.Module:
    """``demo``: the demo UNet's architecture with n outputs (its last residual unit runs at n channels,
    so its cost grows with n²); ``nnunet``: nnU-Net's PlainConvUNet (TotalSegmentator's topology, a
    1x1x1 segmentation head) at the demo UNet's widths 8-16-32-64."""
    torch.manual_seed(0)
    if arch == "demo":
        from monai.networks.nets import UNet

        from engine.models import DEMO_ARCH

        return UNet(**{**DEMO_ARCH, "out_channels": n})
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 4, (8, 16, 32, 64), torch.nn.Conv3d, 3, (1, 2, 2, 2), (2, 2, 2, 2), n, (2, 2, 2),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


class EveryClassSomewhere(torch.nn.Module):
    def __init__(self, n: int, arch: str = "demo") -> None:
        super().__init__()
        self.net = network(arch, n)
        voxels = SHAPE[0] * SHAPE[1] * SHAPE[2]
        region = (torch.arange(voxels) * n // voxels).reshape(SHAPE)
        self.register_buffer("bump", 20.0 * torch.nn.functional.one_hot(region, n).permute(3, 0, 1, 2).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bump


def _image() -> torch.Tensor:
    from engine.phantoms import make_phantom
    from engine.training import scale_hu

    return torch.from_numpy(scale_hu(make_phantom(0, seed=0).image)).float()[None]


def child(n: int, chunk: int | None, repeats: int, baseline: bool, arch: str) -> dict:
    from engine.attribution import explain_volume

    torch.set_num_threads(1)
    model = EveryClassSomewhere(n, arch).eval()
    image = _image()
    if baseline:
        with torch.no_grad():
            model(image[None])
        return {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    names = [f"c{i:03d}" for i in range(n)]
    times, ex = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex = explain_volume(model, image, method="saliency", class_names=names, window=SHAPE, class_chunk=chunk)
        times.append(time.perf_counter() - t0)
    assert ex is not None
    out = {"seconds": statistics.median(times), "targets": len(ex.targets), "rows": ex.importances.height,
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if n > 17 and chunk is None:
        out["store"] = store_figures(ex, n)
    return out


def store_figures(ex, n: int) -> dict:
    import polars as pl

    from engine.store import PatientResult, Store

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.duckdb"
        predictions = pl.DataFrame({"class": list(ex.class_names), "voxels": list(ex.voxels().values()),
                                    "dice": [None] * n, "iou": [None] * n},
                                   schema={"class": pl.String, "voxels": pl.Int64, "dice": pl.Float64,
                                           "iou": pl.Float64})
        imp = ex.importances.with_columns(pl.lit("saliency").alias("method"))
        with Store(path, read_only=False) as store:
            store.create_run("r", config={})
            ids = [f"p{i}" for i in range(5)]
            store.register_patients("r", pl.DataFrame({"patient_id": ids, "image_path": ["x"] * 5}))
            times = []
            for pid in ids:
                t0 = time.perf_counter()
                store.write_patient("r", PatientResult(pid, imp, predictions))
                times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    return {"write_seconds": statistics.median(times), "rows_per_patient": imp.height,
            "db_bytes_per_patient": size / 5}


def run_child(args: list[str], arch: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arch", arch, "--child", *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--arch", choices=("demo", "nnunet"), default="nnunet")
    p.add_argument("--chunks", default="all,32,8", help="class_chunk settings for 118 classes")
    p.add_argument("--child", nargs=4, metavar=("N", "CHUNK", "REPEATS", "BASELINE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        n, chunk, repeats, baseline = a.child
        print(json.dumps(child(int(n), None if chunk == "all" else int(chunk), int(repeats), baseline == "1",
                               a.arch)))
        return
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
                     "shape": SHAPE, "arch": a.arch}
    for n in (17, 118):
        base = run_child([str(n), "all", "1", "1"], a.arch)["maxrss_mb"]
        for chunk in (["all"] if n == 17 else a.chunks.split(",")):
            r = run_child([str(n), chunk, str(a.repeats), "0"], a.arch)
            r["peak_over_baseline_mb"] = round(r["maxrss_mb"] - base, 1)
            results[f"{n}_classes_chunk_{chunk}"] = r
            print(f"{n:4d} classes, class_chunk={chunk:>3}: {r['seconds']:.2f} s/patient, {r['targets']} targets, "
                  f"{r['rows']} rows, peak memory +{r['peak_over_baseline_mb']:.0f} MB over the model's forward")
    ratio = results["118_classes_chunk_all"]["seconds"] / results["17_classes_chunk_all"]["seconds"]
    results["time_ratio_118_over_17"] = ratio
    print(f"118 / 17 classes: {ratio:.2f}x the time")
    s = results["118_classes_chunk_all"]["store"]
    print(f"store: {s['rows_per_patient']} rows per patient, written in {s['write_seconds']:.3f} s, "
          f"{s['db_bytes_per_patient'] / 1e6:.2f} MB per patient on disk")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
