"""The CPU heap setting (``engine.runtime.heap``) against glibc's defaults, in fresh processes.

glibc's malloc decides from a process's first allocations whether window-sized buffers are reused
or faulted in afresh at every forward and VJP, so the engine's CPU attribution runs in one of two
speeds for the life of a process. This script starts ``--rounds`` rounds of fresh processes, one
per ``AGG2EXP_CPU_HEAP`` setting (``--settings``, the first the baseline: ``default`` and the
engine's ``keep``), alternating their order, and in each times ``--repeats`` calls of
``explain_volume`` on the demo UNet (one thread, saliency and SmoothGrad with 6 samples, all
classes; the demo-size phantom and window unless ``--shape`` / ``--roi``), after one untimed call.
It prints each process's median and peak RSS, the median and spread (max / min) over processes
per setting, and the baseline's median over each setting's; the maps must be bitwise equal.

    python benchmarks/cpu_heap.py --rounds 6 --json heap.json
    python benchmarks/cpu_heap.py --growth 60 --settings keep,keep-all --json growth.json
    python benchmarks/cpu_heap.py --growth 1000 --settings keep,keep-all --roi 96 96 96 --classes 1 \\
        --json growth96.json
    python benchmarks/cpu_heap.py --rounds 3 --methods saliency --settings default,keep,keep-all \\
        --shape 96 96 96 --roi 96 96 96 --json heap96.json

The load average is recorded: on a shared machine compare only figures from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import write_json  # benchmarks/, the script's own folder

def _engine(roi: tuple[int, ...] | None) -> tuple[Any, Any, Any, Any]:
    """A fresh process's set-up, shared by both children: the heap setting as the environment says
    (before anything allocates), then the demo UNet on one thread and the window; returns the
    setting's result, the model, the window and ``explain_volume``."""
    from engine.runtime.heap import keep_cpu_heap

    tuning = keep_cpu_heap()
    import torch

    from engine.attribution import SlidingWindow, explain_volume
    from engine.models import DEMO_ROI_SIZE, demo_model

    torch.set_num_threads(1)
    return tuning, demo_model().module.eval(), SlidingWindow(roi_size=roi or DEMO_ROI_SIZE, overlap=0.25), explain_volume


def child(method: str, repeats: int, maps_out: Path | None, shape: tuple[int, ...] | None,
          roi: tuple[int, ...] | None) -> None:
    """One fresh process: the engine's heap setting as the environment says, then timed calls."""
    tuning, model, window, explain_volume = _engine(roi)
    import resource

    import torch
    from attribution_speed import make_image

    from engine.models import THORAX_CLASSES

    image = make_image(shape)
    options = {"n_samples": 6, "sigma": 0.1} if method == "smoothgrad" else {}

    def call() -> tuple[float, object]:
        t0 = time.perf_counter()
        e = explain_volume(model, image, method=method, window=window, class_names=THORAX_CLASSES,
                           return_maps=True, **options)
        return time.perf_counter() - t0, e

    call()
    times = []
    for _ in range(repeats):
        t, e = call()
        times.append(t)
    if maps_out is not None:
        torch.save(dict(e.maps), maps_out)  # type: ignore[attr-defined]
    print(json.dumps({"applied": tuning.applied, "reason": tuning.reason, "times": times,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def growth_child(calls: int, seed: int, roi: tuple[int, ...] | None, targets: list[int]) -> None:
    """One fresh process: ``calls`` saliency volumes of varying sizes (seeded; each axis 48-112 voxels
    with the demo's windows, else from the window's side to 5/3 of it), recording the resident memory
    after each (does the heap keep growing?)."""
    tuning, model, window, explain_volume = _engine(roi)
    import random

    from attribution_speed import make_image

    from engine.models import THORAX_CLASSES

    rng = random.Random(seed)
    page = os.sysconf("SC_PAGE_SIZE")
    ranges = [(48, 113)] * 3 if roi is None else [(r, r + 2 * r // 3 + 1) for r in roi]
    rss, times, shapes = [], [], []
    for i in range(calls):
        shape = tuple(rng.randrange(lo, hi, 8) for lo, hi in ranges)
        image = make_image(shape)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        explain_volume(model, image, method="saliency", window=window, targets=targets,
                       class_names=THORAX_CLASSES)
        times.append(time.perf_counter() - t0)
        shapes.append(shape)
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * page / 2**20)
        if (i + 1) % max(1, calls // 20) == 0:  # progress on stderr; the result is stdout's last line
            print(f"{i + 1}/{calls} volumes, {sum(times):.0f} s, resident {rss[-1]:.0f} MB", file=sys.stderr, flush=True)
    print(json.dumps({"applied": tuning.applied, "reason": tuning.reason, "rss_mb": rss,
                      "times": times, "shapes": shapes}))


def run_child(setting: str, method: str, repeats: int, maps_out: Path | None, shape: list[int] | None,
              roi: list[int] | None) -> dict[str, object]:
    env = {**os.environ, "AGG2EXP_CPU_HEAP": setting}
    cmd = [sys.executable, __file__, "--_child", method, "--repeats", str(repeats)]
    if maps_out is not None:
        cmd += ["--_maps", str(maps_out)]
    if shape:
        cmd += ["--shape", *map(str, shape)]
    if roi:
        cmd += ["--roi", *map(str, roi)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _blocks(values: list[float], n: int, fn: Any) -> list[float]:
    """``fn`` of each of ``n`` consecutive blocks of ``values`` as equal as they can be (fewer when
    there are fewer values)."""
    n = min(n, len(values))
    return [fn(values[i * len(values) // n:(i + 1) * len(values) // n]) for i in range(n)]


def growth(args: argparse.Namespace) -> int:
    """``--growth N``: resident memory over N varying volumes, one fresh process per setting (run side
    by side: each is one thread)."""
    settings = tuple(x.strip() for x in args.settings.split(","))
    load_before = os.getloadavg()
    result: dict[str, object] = {"growth_calls": args.growth, "settings": settings, "load_average_before": load_before,
                                 "roi": args.roi, "classes": args.classes, "runs": {}}
    cmd = [sys.executable, __file__, "--_growth", str(args.growth), "--classes", args.classes]
    if args.roi:
        cmd += ["--roi", *map(str, args.roi)]
    procs = {s: subprocess.Popen(cmd, env={**os.environ, "AGG2EXP_CPU_HEAP": s}, stdout=subprocess.PIPE, text=True)
             for s in settings}
    for s, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the {s} process failed (exit {proc.returncode}); see its output above")
        run = json.loads(out.strip().splitlines()[-1])
        rss = run["rss_mb"]
        half = len(rss) // 2
        summary = {"rss_after_first_10_mb": rss[min(9, len(rss) - 1)], "rss_max_mb": max(rss), "rss_end_mb": rss[-1],
                   "rss_max_first_half_mb": max(rss[:half] or rss), "rss_max_second_half_mb": max(rss[half:]),
                   "rss_max_per_tenth_mb": _blocks(rss, 10, max),
                   "median_s_per_tenth": _blocks(run["times"], 10, statistics.median),
                   "total_s": sum(run["times"]), "reason": run["reason"]}
        result["runs"][s] = {**summary, "rss_mb": rss, "times": run["times"]}  # type: ignore[index]
        print(f"{s:8s}: {args.growth} volumes in {summary['total_s']:.0f} s; resident memory after 10 "
              f"{summary['rss_after_first_10_mb']:.0f} MB, peak in the first half {summary['rss_max_first_half_mb']:.0f} MB, "
              f"in the second half {summary['rss_max_second_half_mb']:.0f} MB, at the end {summary['rss_end_mb']:.0f} MB",
              flush=True)
        print(f"{'':8s}  peak per tenth (MB): {' '.join(f'{m:.0f}' for m in summary['rss_max_per_tenth_mb'])}; "
              f"median s/volume per tenth: {' '.join(f'{t:.2f}' for t in summary['median_s_per_tenth'])}", flush=True)
    result["load_average_after"] = os.getloadavg()
    write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of fresh processes (one per setting) per method")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    ap.add_argument("--methods", default="saliency,smoothgrad")
    ap.add_argument("--settings", default="default,keep", help="AGG2EXP_CPU_HEAP values; the first is the baseline")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="volume size (default: the demo phantom's)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="window size (default: the demo's)")
    ap.add_argument("--growth", type=int, default=0, metavar="N",
                    help="instead: one process per setting explains N volumes of varying sizes and records its "
                         "resident memory after each (heap growth over a long run)")
    ap.add_argument("--classes", default="1,2,8", help="--growth: the classes explained per volume")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_growth", dest="growth_child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_maps", dest="maps", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.growth_child:
        growth_child(args.growth_child, seed=0, roi=tuple(args.roi) if args.roi else None,
                     targets=[int(c) for c in args.classes.split(",")])
        return 0
    if args.growth:
        return growth(args)
    if args.child:
        child(args.child, args.repeats, args.maps, tuple(args.shape) if args.shape else None,
              tuple(args.roi) if args.roi else None)
        return 0
    import torch

    settings = tuple(x.strip() for x in args.settings.split(","))
    base = settings[0]
    load_before = os.getloadavg()
    result: dict[str, object] = {"rounds": args.rounds, "repeats": args.repeats, "load_average_before": load_before,
                                 "settings": settings, "shape": args.shape, "roi": args.roi,
                                 "python": sys.version.split()[0], "torch": torch.__version__, "methods": {}}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"cpu_heap_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        per: dict[str, list[float]] = {s: [] for s in settings}
        rss: dict[str, list[float]] = {s: [] for s in settings}
        reasons: dict[str, str] = {}
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for s in order:
                maps = tmp / f"{method}_{s}.pt" if r == 0 else None
                out = run_child(s, method, args.repeats, maps, args.shape, args.roi)
                reasons[s] = str(out["reason"])
                per[s].append(statistics.median(out["times"]))  # type: ignore[arg-type]
                rss[s].append(float(out["max_rss_mb"]))  # type: ignore[arg-type]
                print(f"{method} round {r + 1} {s:8s}: {per[s][-1]:.3f} s per call, peak RSS {rss[s][-1]:.0f} MB",
                      flush=True)
        ref = torch.load(tmp / f"{method}_{base}.pt")
        equal = {}
        for s in settings:
            other = torch.load(tmp / f"{method}_{s}.pt")
            equal[s] = ref.keys() == other.keys() and all(torch.equal(ref[k], other[k]) for k in ref)
        med = {s: statistics.median(v) for s, v in per.items()}
        spread = {s: max(v) / min(v) for s, v in per.items()}
        over = {s: med[base] / med[s] for s in settings}
        result["methods"][method] = {  # type: ignore[index]
            "per_process_s": per, "median_s": med, "spread_max_over_min": spread, "baseline": base,
            "baseline_over": over, "default_over_keep": over.get("keep"), "peak_rss_mb": rss,
            "maps_bitwise_equal": all(equal.values()), "reasons": reasons,
        }
        for s in settings:
            print(f"{method} {s:8s}: median {med[s]:.3f} s (spread {spread[s]:.2f}x), peak RSS median "
                  f"{statistics.median(rss[s]):.0f} MB; {base} / {s} = {over[s]:.2f}", flush=True)
        print(f"{method}: maps bitwise equal across settings: {all(equal.values())}", flush=True)
    result["load_average_after"] = os.getloadavg()
    print(f"load average before {load_before[0]:.1f}, after {result['load_average_after'][0]:.1f}")  # type: ignore[index]
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
