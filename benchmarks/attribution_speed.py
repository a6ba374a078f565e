"""Speed toward the hardware on the CPU, side by side in one process (issue 16).

For the demo UNet on a demo phantom (one 48x40x40 window by default; ``--shape`` for larger,
tiled volumes), interleaved over ``--repeats``:

* **Captum's segmentation recipe**: for each predicted class c, ``captum.attr.Saliency`` on
  S_c(x) = sum over the predicted mask of c of MONAI's ``sliding_window_inference(x)``_c, on the
  model as loaded (what a user writes instead of the engine);
* **the engine, exact fp32**: the default (``memory_format="auto"`` = channels_last_3d on CPUs,
  ``kernels="auto"`` = the engine's CPU kernels: oneDNN convolutions and PReLU's input gradient,
  :mod:`engine.attribution.kernels`), the same layout with PyTorch's own kernels
  (``kernels="torch"``, the previous default) and the contiguous layout with PyTorch's kernels (the
  one before), maps compared with Captum's (max-norm relative error, goal <= 1e-5) and the ratio
  Captum / engine (goal >= 2.5);
* **the engine with ``kernels="compiled"``** (its instance-norm + activation backward fused by
  ``torch.compile``; ``kernels="auto"`` does that from 2^19-voxel windows), its ratio to the fp32 engine
  and its maps' relative error;
* **the engine with bf16 autocast** (opt-in), its ratio to the fp32 engine (goal >= 1.8) and its
  maps' relative error;
* **FLOP/s**: the FLOPs of one window forward and of one class VJP counted by
  ``torch.utils.flop_counter.FlopCounterMode``, divided by their measured median times, against
  this process's measured fp32 (and bf16) matrix-multiply rate (goal >= 30% in fp32);
* optionally ``--compile``: ``torch.compile`` of the model, its compile time and its forward/VJP
  speed-up, to tell whether it pays for a cohort.

The load average (``os.getloadavg()``) is recorded before and after: on a shared machine only the
ratios measured within one run mean anything.

    python benchmarks/attribution_speed.py --repeats 3 --json speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from captum.attr import Saliency as CaptumSaliency  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula  # noqa: E402

from engine.attribution import SlidingWindow, explain_volume  # noqa: E402
from engine.attribution.kernels import engine_kernels  # noqa: E402
from engine.attribution.sliding import _in_layout  # noqa: E402
from engine.labels import THORAX_CLASSES  # noqa: E402
from engine.models import DEMO_ROI_SIZE, demo_model  # noqa: E402
from engine.phantoms import make_phantom  # noqa: E402
from engine.runtime.heap import keep_cpu_heap  # noqa: E402
from engine.training import scale_hu  # noqa: E402

from _common import write_json  # noqa: E402  (benchmarks/, the script's own folder)


@register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
def _onednn_conv_flop(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the engine's oneDNN convolutions, so that the counter sees the work they do."""
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


@register_flop_formula(torch.ops.mkldnn._convolution_transpose_pointwise)
def _onednn_conv_transpose_flop(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=True)


def make_image(shape: tuple[int, int, int] | None) -> torch.Tensor:
    """Phantom 0 (the demo's size by default, else ``shape`` over the same field of view), scaled HU."""
    if shape is None:
        ph = make_phantom(0)
    else:
        ph = make_phantom(0, shape=shape, spacing=(336.0 / shape[0], 280.0 / shape[1], 280.0 / shape[2]))
    return torch.from_numpy(np.ascontiguousarray(scale_hu(ph.image))).float()[None]


def captum_recipe(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...], overlap: float,
                  pred: torch.Tensor, classes: list[int]) -> tuple[float, torch.Tensor]:
    """Saliency of the masked, summed stitched output, one class at a time, as Captum users write it."""
    x = image[None]
    t0 = time.perf_counter()
    maps = []
    for c in classes:
        mask = pred == c

        def forward(inp: torch.Tensor, c: int = c, mask: torch.Tensor = mask) -> torch.Tensor:
            z = sliding_window_inference(inp, roi, 1, model, overlap=overlap)
            return (torch.as_tensor(z)[:, c] * mask).flatten(1).sum(1)

        maps.append(CaptumSaliency(forward).attribute(x, abs=False)[0])
    return time.perf_counter() - t0, torch.stack(maps)


def engine(model: torch.nn.Module, image: torch.Tensor, window: SlidingWindow,
           classes: list[int]) -> tuple[float, torch.Tensor, dict[str, float]]:
    t0 = time.perf_counter()
    e = explain_volume(model, image, method="saliency", window=window, targets=classes,
                       class_names=THORAX_CLASSES, return_maps=True)
    dt = time.perf_counter() - t0
    return dt, torch.stack([e.maps[THORAX_CLASSES[c]] for c in classes]), e.timings


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error per class, worst class (robust to the few voxels where a ReLU-type kink within
    rounding of zero takes the other branch in float64)."""
    return max(float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)) for x, y in zip(a, b))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative error per class, worst class."""
    return max(float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n x n matrix multiply in ``dtype`` (median of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def primitives(model: torch.nn.Module, roi: tuple[int, ...], fmt: torch.memory_format, autocast: torch.dtype | None,
               reps: int, fast: bool = False, fuse: bool = False) -> dict[str, float]:
    """FLOPs and median seconds of one window forward and one class VJP (with the engine's CPU kernels
    when ``fast``, and their compiled fused norm + activation backward when also ``fuse``, as
    ``kernels="compiled"`` runs them: ``first_step_s`` is the first forward + VJP, compile included;
    parameters frozen, as the engine runs them).

    ``*_flops`` are the model's: a dense forward and VJP, counted on PyTorch's kernels. ``*_flops_run``
    are those the kernels that ran executed (the engine's VJP skips the head's dead channels), counted
    with formulas for its oneDNN calls; utilisation is computed on these.
    """
    model.to(memory_format=fmt)
    x = _in_layout(torch.rand((1, 1, *roi)), fmt).requires_grad_(True)  # as the engine lays out its windows
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast is not None else (lambda: torch.enable_grad())
    guard = fmt == torch.channels_last_3d  # the instance-norm guard where the engine applies it
    counted: dict[str, float] = {}
    for kernels, tag in ((False, ""), (True, "_run")) if fast else ((False, ""),):
        with engine_kernels(model, kernels, guard=guard):
            with FlopCounterMode(display=False) as fc, ctx():
                out = model(x)
            counted["forward_flops" + tag] = fc.get_total_flops()
            seed = class_seed(out)
            with FlopCounterMode(display=False) as fc:
                torch.autograd.grad(out, x, seed, retain_graph=True)
            counted["vjp_flops" + tag] = fc.get_total_flops()
    if not fast:  # PyTorch's kernels run the model's FLOPs
        counted.update(forward_flops_run=counted["forward_flops"], vjp_flops_run=counted["vjp_flops"])
    first: dict[str, float] = {}
    with engine_kernels(model, fast, guard=guard, fuse=fuse) as mode:
        if fuse:  # the compile happens in the first VJP: timed apart, not in the medians
            t0 = time.perf_counter()
            _timed(model, x, ctx, 1, mode)
            first["first_step_s"] = time.perf_counter() - t0
        timed = _timed(model, x, ctx, reps, mode if fast else None)
    f, v = timed["forward_s"], timed["vjp_s"]
    return {**counted, **timed, **first, "forward_flop_s": counted["forward_flops_run"] / f,
            "vjp_flop_s": counted["vjp_flops_run"] / v, "vjp_model_flop_s": counted["vjp_flops"] / v}


def class_seed(out: torch.Tensor, mode: Any = None) -> torch.Tensor:
    """Class 1's seed for logits ``out``: ones on its channel, in the layout the engine builds its seeds
    in (``EngineKernels.seed_layout`` of the engine's kernels ``mode``; contiguous without them)."""
    layout = mode.seed_layout(out) if mode is not None else torch.contiguous_format
    seed = torch.zeros(out.shape, dtype=out.dtype).contiguous(memory_format=layout)
    seed[:, 1] = 1.0
    return seed


def _timed(model: torch.nn.Module, x: torch.Tensor, ctx: Any, reps: int, mode: Any = None) -> dict[str, float]:
    """Median forward and VJP times; with the engine's kernels (``mode``) told the seed's live channel,
    as the engine tells them."""
    fwd_t, vjp_t = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with ctx():
            out = model(x)
        fwd_t.append(time.perf_counter() - t0)
        s = class_seed(out, mode)  # built before its VJP, as the engine builds it: not timed
        values = s[:, 1:2].contiguous()  # the engine's seed builder hands the kernels its live channel
        t1 = time.perf_counter()
        with mode.seed_channels(s, (1,), values) if mode is not None else contextlib.nullcontext():
            torch.autograd.grad(out, x, s)
        vjp_t.append(time.perf_counter() - t1)
    return {"forward_s": statistics.median(fwd_t), "vjp_s": statistics.median(vjp_t)}


def compile_trial(model: torch.nn.Module, roi: tuple[int, ...], reps: int) -> dict[str, float]:
    """``torch.compile`` of the channels-last model against the engine's eager step: compile time, and
    one window's forward + one class VJP (input gradient only).

    Both run with frozen parameters, as the engine attributes: a compiled backward built while the
    weights require grad would compute their gradients too. Eager is the engine's default (its CPU
    kernels, which narrow the head's VJP to the live channel); compiled is Inductor's graph of the
    model, whose backward is dense.
    """
    fmt = torch.channels_last_3d
    eager = copy.deepcopy(model).to(memory_format=fmt)
    compiled_model = copy.deepcopy(eager)
    for p in (*eager.parameters(), *compiled_model.parameters()):
        p.requires_grad_(False)
    compiled = torch.compile(compiled_model)
    x = torch.rand((1, 1, *roi)).contiguous(memory_format=fmt).requires_grad_(True)

    def step(m: torch.nn.Module, mode: Any = None) -> float:
        t0 = time.perf_counter()
        out = m(x)
        seed = class_seed(out, mode)
        values = seed[:, 1:2].contiguous()
        with mode.seed_channels(seed, (1,), values) if mode is not None else contextlib.nullcontext():
            torch.autograd.grad(out, x, seed)
        return time.perf_counter() - t0

    def engine_step() -> float:
        with engine_kernels(eager, True, guard=True) as mode:  # not around the compiled model: its graph is fixed
            return step(eager, mode)

    first = step(compiled)  # includes compiling the forward and the backward graph
    engine_step()
    e_t, c_t = [], []
    for _ in range(reps):
        e_t.append(engine_step())
        c_t.append(step(compiled))
    e, c = statistics.median(e_t), statistics.median(c_t)
    saved = e - c
    return {"compile_s": first - c, "eager_step_s": e, "compiled_step_s": c, "speedup": e / c,
            "steps_to_pay_off": (first - c) / saved if saved > 0 else None}


def add_utilisation(prim: dict[str, dict[str, float]], mm32: float, mm16: float) -> None:
    """Each primitive's share of this process's matmul rate (bf16 against bf16's), added in place."""
    for name, p in prim.items():
        peak = mm16 if name.startswith("bf16") else mm32
        p["forward_of_matmul"], p["vjp_of_matmul"] = p["forward_flop_s"] / peak, p["vjp_flop_s"] / peak


def print_primitives(prim: dict[str, dict[str, float]]) -> None:
    g = 1e9
    for name, p in prim.items():
        print(f"{name}: forward {p['forward_flops_run'] / g:.2f} GFLOP in {p['forward_s'] * 1e3:.1f} ms = "
              f"{p['forward_flop_s'] / g:.0f} GFLOP/s ({100 * p['forward_of_matmul']:.0f}% of matmul); VJP "
              f"{p['vjp_flops_run'] / g:.2f} GFLOP run (model: {p['vjp_flops'] / g:.2f}) in {p['vjp_s'] * 1e3:.1f} ms"
              f" = {p['vjp_flop_s'] / g:.0f} GFLOP/s ({100 * p['vjp_of_matmul']:.0f}%)")


def primitives_only(model: torch.nn.Module, roi: tuple[int, ...], args: argparse.Namespace, heap: str,
                    load_before: tuple[float, float, float]) -> int:
    """``--primitives-only``: the engine's forward and class VJP (fp32, then bf16) at ``roi`` against
    this process's matmul rates."""
    g = 1e9
    mm32, mm16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    prim = {"fp32_channels_last": primitives(model, roi, torch.channels_last_3d, None, args.prim_reps, fast=True),
            "fp32_compiled": primitives(model, roi, torch.channels_last_3d, None, args.prim_reps, fast=True,
                                        fuse=True),
            "bf16_channels_last": primitives(model, roi, torch.channels_last_3d, torch.bfloat16, args.prim_reps,
                                             fast=True)}
    print(f"matmul: fp32 {mm32 / g:.0f} GFLOP/s, bf16 {mm16 / g:.0f} GFLOP/s; the engine's forward and VJP at a "
          f"{' x '.join(map(str, roi))} window:")
    add_utilisation(prim, mm32, mm16)
    print_primitives(prim)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (shared machine); CPU heap: {heap}")
    write_json(args.json, {"primitives_roi": list(roi), "matmul_fp32_flop_s": mm32, "matmul_bf16_flop_s": mm16,
                           "primitives": prim, "load_average_before": load_before, "load_average_after": load_after,
                           "cpu_heap": heap, "torch": torch.__version__, "threads": args.threads,
                           "goals": {"of_matmul_fp32": 0.30}})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="volume size (default: the demo phantom's)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo's actors use 1)")
    ap.add_argument("--prim-reps", type=int, default=7, help="timed forward/VJP pairs per layout")
    ap.add_argument("--prim-roi", type=int, nargs=3, default=None,
                    help="the window of the forward/VJP primitives (default: the demo's, 48 x 40 x 40; the "
                         "issue's goal is worded at 48 48 48)")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    ap.add_argument("--primitives-only", action="store_true",
                    help="only the engine's fp32 and bf16 forward/VJP primitives against the matmul rate, in a "
                         "fresh process (no Captum or whole-volume runs before them)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    heap = keep_cpu_heap()  # as the engine's workers and the CLI set it (engine.runtime.heap)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    roi = DEMO_ROI_SIZE
    loaded = demo_model().module.eval()
    if args.primitives_only:
        return primitives_only(loaded, tuple(args.prim_roi) if args.prim_roi else roi, args, heap.reason, load_before)
    image = make_image(tuple(args.shape) if args.shape else None)
    ref_model = copy.deepcopy(loaded)  # stays in the layout it was loaded in, as a Captum user's model
    eng_model = copy.deepcopy(loaded)
    with torch.no_grad():
        pred = sliding_window_inference(image[None], roi, 1, ref_model, overlap=args.overlap)[0].argmax(0)
    classes = torch.unique(pred).tolist()
    variants = {
        "engine_fp32_contiguous": SlidingWindow(roi_size=roi, overlap=args.overlap, memory_format="contiguous",
                                                kernels="torch"),
        "engine_fp32_torch_kernels": SlidingWindow(roi_size=roi, overlap=args.overlap, kernels="torch"),
        "engine_fp32": SlidingWindow(roi_size=roi, overlap=args.overlap),
        "engine_fp32_compiled": SlidingWindow(roi_size=roi, overlap=args.overlap, kernels="compiled"),
        "engine_bf16": SlidingWindow(roi_size=roi, overlap=args.overlap, autocast=torch.bfloat16),
    }
    print(f"volume {tuple(image.shape[1:])}, roi {roi}, {len(classes)} classes, {args.threads} thread(s); "
          f"load average {load_before[0]:.1f}", flush=True)
    # warm-up, untimed: oneDNN primitive caches of both layouts and bf16
    for w in variants.values():
        engine(eng_model, image, w, classes[:1])
    captum_recipe(ref_model, image, roi, args.overlap, pred, classes[:1])
    times: dict[str, list[float]] = {k: [] for k in ("captum", *variants)}
    maps: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        t, maps["captum"] = captum_recipe(ref_model, image, roi, args.overlap, pred, classes)
        times["captum"].append(t)
        for name, w in variants.items():
            t, maps[name], _ = engine(eng_model, image, w, classes)
            times[name].append(t)
        print(f"repeat {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    # An independent yardstick for both fp32 maps: Captum's recipe in float64 on the same masks
    _, maps["float64"] = captum_recipe(copy.deepcopy(ref_model).double(), image.double(), roi, args.overlap, pred,
                                       classes)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    prim_roi = tuple(args.prim_roi) if args.prim_roi else roi
    prim = {
        "fp32_contiguous": primitives(eng_model, prim_roi, torch.contiguous_format, None, args.prim_reps),
        "fp32_channels_last_torch_kernels": primitives(eng_model, prim_roi, torch.channels_last_3d, None, args.prim_reps),
        "fp32_channels_last": primitives(eng_model, prim_roi, torch.channels_last_3d, None, args.prim_reps, fast=True),
        "fp32_compiled": primitives(eng_model, prim_roi, torch.channels_last_3d, None, args.prim_reps, fast=True,
                                    fuse=True),
        "bf16_channels_last": primitives(eng_model, prim_roi, torch.channels_last_3d, torch.bfloat16, args.prim_reps,
                                        fast=True),
    }
    mm32, mm16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    add_utilisation(prim, mm32, mm16)
    result: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor(), "torch": torch.__version__,
                    "threads": args.threads},
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_heap": heap.reason,
        "volume": list(image.shape[1:]), "roi": list(roi), "primitives_roi": list(prim_roi), "classes": len(classes), "repeats": args.repeats,
        "seconds": med, "seconds_all": times,
        "captum_over_engine_fp32": ratio("captum", "engine_fp32"),
        "captum_over_engine_fp32_contiguous": ratio("captum", "engine_fp32_contiguous"),
        "captum_over_engine_fp32_torch_kernels": ratio("captum", "engine_fp32_torch_kernels"),
        "contiguous_over_channels_last": ratio("engine_fp32_contiguous", "engine_fp32_torch_kernels"),
        "torch_kernels_over_engine_kernels": ratio("engine_fp32_torch_kernels", "engine_fp32"),
        "bf16_speedup_over_fp32": ratio("engine_fp32", "engine_bf16"),
        "compiled_speedup_over_fp32": ratio("engine_fp32", "engine_fp32_compiled"),
        "maps_rel_err_fp32_vs_captum": rel_err(maps["engine_fp32"], maps["captum"]),
        "maps_rel_err_fp32_contiguous_vs_captum": rel_err(maps["engine_fp32_contiguous"], maps["captum"]),
        "maps_rel_err_fp32_torch_kernels_vs_captum": rel_err(maps["engine_fp32_torch_kernels"], maps["captum"]),
        "maps_rel_err_bf16_vs_captum": rel_err(maps["engine_bf16"], maps["captum"]),
        "maps_rel_err_compiled_vs_captum": rel_err(maps["engine_fp32_compiled"], maps["captum"]),
        "maps_rel_err_fp32_vs_float64": rel_err(maps["engine_fp32"], maps["float64"]),
        "maps_rel_err_captum_vs_float64": rel_err(maps["captum"], maps["float64"]),
        "maps_rel_l2_fp32_vs_float64": rel_l2(maps["engine_fp32"], maps["float64"]),
        "maps_rel_l2_captum_vs_float64": rel_l2(maps["captum"], maps["float64"]),
        "matmul_fp32_flop_s": mm32, "matmul_bf16_flop_s": mm16, "primitives": prim,
        "goals": {"captum_over_engine_fp32": 2.5, "maps_rel_err": 1e-5, "bf16_speedup": 1.8, "of_matmul_fp32": 0.30},
    }
    if args.compile:
        result["compile"] = compile_trial(eng_model, roi, args.prim_reps)
    g = 1e9
    print(f"\nmedian s/volume: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print(f"Captum recipe / engine fp32: {result['captum_over_engine_fp32']:.2f} (goal >= 2.5; with PyTorch's "
          f"kernels {result['captum_over_engine_fp32_torch_kernels']:.2f}, contiguous layout "
          f"{result['captum_over_engine_fp32_contiguous']:.2f}); the engine's kernels' speed-up "
          f"{result['torch_kernels_over_engine_kernels']:.2f}, channels-last's {result['contiguous_over_channels_last']:.2f}")
    print(f"maps vs Captum, max relative error: fp32 {result['maps_rel_err_fp32_vs_captum']:.1e} (goal <= 1e-5), "
          f"bf16 {result['maps_rel_err_bf16_vs_captum']:.1e}; bf16 speed-up over fp32 "
          f"{result['bf16_speedup_over_fp32']:.2f} (goal >= 1.8)")
    print(f"kernels='compiled' (the norm + activation backward fused by torch.compile; 'auto' from 2^19-voxel windows): "
          f"{result['compiled_speedup_over_fp32']:.2f}x the fp32 engine, maps vs Captum "
          f"{result['maps_rel_err_compiled_vs_captum']:.1e}")
    print(f"maps vs float64 (Captum's recipe in float64 on the same masks), max relative error: engine fp32 "
          f"{result['maps_rel_err_fp32_vs_float64']:.1e}, Captum fp32 {result['maps_rel_err_captum_vs_float64']:.1e}; "
          f"relative L2: engine {result['maps_rel_l2_fp32_vs_float64']:.1e}, Captum "
          f"{result['maps_rel_l2_captum_vs_float64']:.1e}")
    print(f"matmul: fp32 {mm32 / g:.0f} GFLOP/s, bf16 {mm16 / g:.0f} GFLOP/s; forward and VJP at a "
          f"{' x '.join(map(str, prim_roi))} window:")
    print_primitives(prim)
    if "compile" in result:
        c = result["compile"]
        print(f"torch.compile: {c['compile_s']:.1f} s to compile, forward+VJP {c['eager_step_s'] * 1e3:.0f} -> "
              f"{c['compiled_step_s'] * 1e3:.0f} ms ({c['speedup']:.2f}x), pays off after {c['steps_to_pay_off']} steps")
    print(f"load average before {load_before[0]:.1f}, after {result['load_average_after'][0]:.1f} (shared machine); "
          f"CPU heap: {heap.reason}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
