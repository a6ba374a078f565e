"""``kernels="compiled"`` against ``kernels="engine"`` on whole volumes: when the compile pays (issue 16).

``kernels="compiled"`` fuses the backward of each instance norm with the PReLU after it into one
``torch.compile``d kernel (``engine.attribution.kernels._NormActivation``); ``kernels="auto"`` does so for
windows of at least ``FUSE_MIN_VOXELS`` (2^19, about 81^3) voxels. For each window size, in a fresh process with its
own empty Inductor cache (the compile a new worker pays; ``--warm`` keeps the user's cache), the demo
UNet explains a phantom one window in size (saliency, every class), alternating engine and compiled
over ``--repeats`` after one untimed call of each:

* median seconds per volume of each, their ratio, and the maps' largest relative difference;
* the first compiled call's extra time (the compile) and the number of volumes after which it has paid
  for itself (extra time / time saved per volume);
* with ``--float64``, both fp32 maps against the same explanation in float64 (PyTorch's kernels on a
  float64 copy of the model): max-norm and L2 relative error, worst class.

    python benchmarks/compiled_kernels.py --rois 48,40,40 64,64,64 96,96,96 --json compiled.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import write_json  # noqa: E402  (benchmarks/, the script's own folder)


def one_roi(roi: tuple[int, int, int], repeats: int, heap: str, threads: int, float64: bool = False) -> dict[str, Any]:
    """Both kernel sets on one window-sized phantom, in this process."""
    import torch

    from engine.attribution import SlidingWindow, explain_volume
    from engine.attribution.kernels import resolve_fused
    from engine.labels import THORAX_CLASSES
    from engine.models import demo_model
    from engine.runtime.heap import keep_cpu_heap

    tuning = keep_cpu_heap(heap)
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from attribution_speed import make_image

    model = demo_model().module.eval()
    image = make_image(roi)
    classes = list(range(len(THORAX_CLASSES)))

    def run(kernels: str, m: torch.nn.Module = model, x: torch.Tensor = image) -> tuple[float, torch.Tensor]:
        window = SlidingWindow(roi_size=roi, kernels=kernels, memory_format="contiguous" if kernels == "torch" else "auto")
        t0 = time.perf_counter()
        e = explain_volume(m, x, method="saliency", window=window, targets=classes,
                           class_names=THORAX_CLASSES, return_maps=True)
        dt = time.perf_counter() - t0
        return dt, torch.stack([e.maps[name] for name in sorted(e.maps)])  # the classes the volume holds

    first_engine, _ = run("engine")
    first_compiled, _ = run("compiled")
    times: dict[str, list[float]] = {"engine": [], "compiled": []}
    maps: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for kernels in times:
            t, maps[kernels] = run(kernels)
            times[kernels].append(t)
        print(f"  {roi} repeat {r + 1}: engine {times['engine'][-1]:.2f}s, compiled {times['compiled'][-1]:.2f}s",
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = med["engine"] - med["compiled"]
    compile_s = first_compiled - med["compiled"]
    diff = max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
               for a, b in zip(maps["compiled"], maps["engine"]))
    yardstick: dict[str, Any] = {}
    if float64:
        import copy

        _, ref = run("torch", copy.deepcopy(model).double(), image.double())

        def errs(a: torch.Tensor) -> dict[str, float]:
            return {"max": max(float((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, ref)),
                    "l2": max(float((x.double() - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, ref))}

        yardstick = {"vs_float64": {k: errs(v) for k, v in maps.items()}}
    return {**yardstick, "roi": list(roi), "voxels_per_window": roi[0] * roi[1] * roi[2], "classes": len(maps["engine"]),
            "seconds": med, "seconds_all": times, "first_call_s": {"engine": first_engine, "compiled": first_compiled},
            "speedup": med["engine"] / med["compiled"], "compile_s": compile_s,
            "volumes_to_pay_off": compile_s / saved if saved > 0 else None,
            "maps_rel_diff_compiled_vs_engine": diff, "auto_compiles": resolve_fused("auto", roi),
            "cpu_heap": tuning.reason}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rois", nargs="+", default=["48,40,40", "64,64,64", "96,96,96"],
                    help="window sizes, each D,H,W (the volume is one window)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo's actors use 1)")
    ap.add_argument("--heap", default="keep", choices=["keep", "keep-all", "default"],
                    help="the CPU heap setting (engine.runtime.heap)")
    ap.add_argument("--warm", action="store_true", help="keep the user's Inductor cache (default: a fresh one)")
    ap.add_argument("--float64", action="store_true", help="also compare both maps with float64's (slow)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one window size, in this process
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.one:
        roi = tuple(int(v) for v in args.one.split(","))
        print(json.dumps(one_roi(roi, args.repeats, args.heap, args.threads, args.float64)))  # type: ignore[arg-type]
        return 0
    load_before = os.getloadavg()
    rows = []
    for spec in args.rois:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ)
            if not args.warm:
                env["TORCHINDUCTOR_CACHE_DIR"] = cache
            cmd = [sys.executable, __file__, "--one", spec, "--repeats", str(args.repeats), "--threads",
                   str(args.threads), "--heap", args.heap, *(["--float64"] if args.float64 else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        s = row["seconds"]
        pay = row["volumes_to_pay_off"]
        print(f"window {' x '.join(map(str, row['roi']))} ({row['classes']} classes, auto compiles: "
              f"{row['auto_compiles']}): engine {s['engine']:.2f} s, compiled {s['compiled']:.2f} s per volume "
              f"({row['speedup']:.2f}x); compile {row['compile_s']:.1f} s, paid off after "
              f"{'never' if pay is None else f'{pay:.1f}'} volumes; maps differ by {row['maps_rel_diff_compiled_vs_engine']:.1e}",
              flush=True)
        if "vs_float64" in row:
            print("  vs float64 (max / L2 relative, worst class): " + ", ".join(
                f"{k} {v['max']:.1e} / {v['l2']:.1e}" for k, v in row["vs_float64"].items()), flush=True)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (shared machine); "
          f"Inductor cache: {'warm (the user’s)' if args.warm else 'fresh per window size'}; CPU heap: {args.heap}")
    write_json(args.json, {"rows": rows, "repeats": args.repeats, "threads": args.threads, "heap": args.heap,
                           "warm_cache": args.warm, "load_average_before": load_before,
                           "load_average_after": load_after})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
