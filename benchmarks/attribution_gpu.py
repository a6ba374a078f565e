"""Attribution core on one GPU: the engine against the reference strategy, FLOP utilisation, bf16 fidelity.

Prepared for a single-GPU machine that has PyTorch and nothing else of ours. It

1. installs the few wheels the engine's attribution path imports from ``benchmarks/wheels`` (filled
   by ``benchmarks/fetch_gpu_wheels.sh``), offline and without dependencies: monai (needs only torch
   and numpy), captum (installed for completeness; the gradient path imports none of it), einops (SwinUNETR) and numpy if it is missing. polars is not
   installed (a ~40 MB wheel only needed for the engine's importance tables): when it is absent a
   stub stands in, and the script calls the engine's ``compute_maps`` + ``roi_statistics`` directly;
2. builds a SwinUNETR (feature_size 48, use_v2=True, 17 classes, random weights) with 96³ windows on
   a volume the size of a 1.5 mm chest CT (256 x 256 x 224), overlap 0.25;
3. times per patient (a) the engine: clean stitched prediction, SmoothGrad maps of all 17 classes
   with bf16 autocast, several windows per batch and looped class VJPs (vmap-batched ones are timed
   too, for comparison), and its RoI statistics; (b) the reference strategy: fp32, one window at a
   time, one class input gradient at a time with the exact seed M_c·w/Ω, then one masked
   full-volume sum per (class, RoI) in numpy. The reference is warmed up, timed on a subset of
   classes and windows and extrapolated (the output says so);
4. counts FLOPs of one window forward and one input VJP with ``FlopCounterMode`` and reports the
   engine's model FLOP utilisation against the device's peak dense bf16 FLOP/s;
5. measures bf16 fidelity: Spearman rank correlation of the RoI mass vectors, bf16 vs fp32.

Random weights predict few classes, so M_c comes from a synthetic 17-class label map (smooth
blobs) instead of the argmax; the work per class is the same as for a predicted structure.

    python benchmarks/attribution_gpu.py --json gpu.json           # on the GPU machine, < 8 min
    python benchmarks/attribution_gpu.py --dry-run --skip-install  # same code path, CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "wheels"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Peak dense bf16 tensor FLOP/s by device name (no sparsity), looked up by substring, first match.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("A6000", 155e12),
)

NOTES: list[str] = []


def note(msg: str) -> None:
    NOTES.append(msg)
    print(f"note: {msg}", flush=True)


# ----------------------------------------------------------------------------- installation


def _missing(mods: list[str]) -> list[str]:
    return [m for m in mods if importlib.util.find_spec(m) is None]


def install(wheels: Path, need_einops: bool = True) -> None:
    """pip install --no-index --no-deps from the local wheel folder what is not importable yet."""
    wanted = {"monai": "monai", "captum": "captum", "numpy": "numpy"}
    if need_einops:
        wanted["einops"] = "einops"
    missing = _missing(list(wanted))
    if not missing:
        print("install: monai, captum, einops, numpy already importable")
        return
    if not wheels.is_dir():
        raise SystemExit(f"install: {missing} missing and no wheel folder {wheels}; run benchmarks/fetch_gpu_wheels.sh "
                         "on a machine with network access and carry benchmarks/wheels")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
           *[wanted[m] for m in missing]]
    print("install:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def import_engine() -> types.SimpleNamespace:
    """The engine's attribution core, tolerating an environment without polars or matplotlib.

    * polars (only for the engine's importance tables, unused here): a stub module when absent;
    * captum is imported only by the perturbation methods, when they run, so the gradient path
      needs none of it (nor its matplotlib dependency).
    """
    if importlib.util.find_spec("polars") is None:
        stub = types.ModuleType("polars")

        class _Any:
            def __init__(self, *a: object, **k: object) -> None:
                pass

            def __getattr__(self, name: str) -> Any:
                raise RuntimeError("polars is not installed on this machine (stub)")

        def _getattr(name: str) -> Any:
            if name.startswith("__"):  # inspect and pickle probe modules' dunders; a stub has none
                raise AttributeError(name)
            return _Any

        stub.__getattr__ = _getattr  # type: ignore[attr-defined]
        sys.modules["polars"] = stub
        note("polars absent: a stub stands in (the engine's importance tables are not built; "
             "compute_maps + roi_statistics are called directly)")
    from engine.aggregate import roi_statistics
    from engine.attribution.explain import compute_maps
    from engine.attribution.gradients import Saliency, SmoothGrad
    from engine.attribution.sliding import SlidingWindow, stitched_forward, window_geometry

    return types.SimpleNamespace(compute_maps=compute_maps, roi_statistics=roi_statistics, SmoothGrad=SmoothGrad,
                                 Saliency=Saliency,
                                 SlidingWindow=SlidingWindow, stitched_forward=stitched_forward,
                                 window_geometry=window_geometry)


# ----------------------------------------------------------------------------- model and data


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if args.dry_run and not args.dry_swin:
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=3, in_channels=1, out_channels=args.classes, channels=(8, 16, 32), strides=(2, 2),
                     num_res_units=1)
        note("dry run uses a small MONAI UNet: SwinUNETR needs windows of at least 64^3 (its 32x-downsampled "
             "bottleneck is instance-normalised) and takes tens of seconds per 64^3 window on a CPU "
             "(--dry-swin runs it anyway)")
        return model.to(device).eval(), "small MONAI UNet (dry run), random weights"
    if importlib.util.find_spec("einops") is not None:
        from monai.networks.nets import SwinUNETR

        model = SwinUNETR(in_channels=1, out_channels=args.classes, feature_size=args.feature_size, use_v2=True,
                          spatial_dims=3)
        desc = f"SwinUNETR v2 feature_size {args.feature_size}, random weights"
    else:
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=3, in_channels=1, out_channels=args.classes, channels=(8, 16, 32), strides=(2, 2),
                     num_res_units=1)
        desc = "small MONAI UNet (einops absent, SwinUNETR cannot run), random weights"
        note("einops is not installed: a small MONAI UNet replaces SwinUNETR")
    return model.to(device).eval(), desc


def synthetic_case(shape: tuple[int, ...], n_classes: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image (1, *S) in [0, 1] with smooth structure and a label map (*S) of smooth blobs covering every class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *[max(2, s // 16) for s in shape]), generator=g)
    image = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0]
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    fields = torch.rand((1, n_classes, *[max(2, s // 24) for s in shape]), generator=g)
    fields[0, 0] += 0.2  # a background-heavy class 0, like CT
    labels = F.interpolate(fields, size=shape, mode="trilinear", align_corners=False)[0].argmax(0)
    counts = torch.bincount(labels.flatten(), minlength=n_classes)
    for c in torch.nonzero(counts == 0).flatten().tolist():  # paint a small cube for any class left out
        corner = [int(torch.randint(0, max(1, s - s // 8), (1,), generator=g)) for s in shape]
        labels[tuple(slice(o, o + max(1, s // 8)) for o, s in zip(corner, shape))] = c
    return image.clamp(0, 1).to(device), labels.to(device)


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return value
    return None


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho with average ranks for ties."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double().flatten().cpu()
        order = torch.argsort(x, stable=True)
        sorted_x = x[order]
        r = torch.empty_like(x)
        i, n = 0, x.numel()
        pos = torch.arange(1, n + 1, dtype=torch.float64)
        # average ranks over runs of equal values
        boundaries = torch.nonzero(torch.diff(sorted_x) != 0).flatten().tolist() + [n - 1]
        for j in boundaries:
            r[order[i:j + 1]] = pos[i:j + 1].mean()
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return max(-1.0, min(1.0, float((ra * rb).sum() / den))) if den > 0 else float("nan")


def count_flops(model: torch.nn.Module, roi: tuple[int, ...], device: torch.device) -> tuple[int, int]:
    """FLOPs of one window forward and of one input VJP (FlopCounterMode, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 1, *roi), device=device, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        torch.autograd.grad(out, x, torch.ones_like(out))
    return int(fwd), int(fc.get_total_flops())


def window_batch(model, args, device, layout: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random batch of ``window_batch`` windows that requires grad, with the model and the batch in
    ``layout`` ("contiguous" or "channels_last", the model's 5-D weights converted in place)."""
    from engine.attribution.sliding import prepare_model

    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    prepare_model(model, fmt)
    x = torch.rand((args.window_batch, 1, *args.roi), generator=generator)
    return x.to(device).contiguous(memory_format=fmt).requires_grad_(True)


def time_primitives(model, args, device, n_classes: int, fwd_flops: int, vjp_flops: int, peak: float | None,
                    repeats: int = 3, layout: str = "contiguous") -> dict[str, Any]:
    """Forward and VJP throughput on one window batch in bf16 autocast, as the engine runs them.

    Times (median of ``repeats`` after one warm-up) the forward of ``window_batch`` windows with
    the graph kept, all classes' VJPs batched in one call (``is_grads_batched``), and the same
    VJPs one class at a time; FLOP/s = counted model FLOPs / time, utilisation against ``peak``.
    """
    wb = args.window_batch
    x = window_batch(model, args, device, layout, generator=torch.Generator(device="cpu").manual_seed(1))

    def forward() -> torch.Tensor:
        with torch.enable_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return model(x)

    def timed(fn) -> float:
        out = []
        for r in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r:
                out.append(time.perf_counter() - t0)
        out.sort()
        return out[len(out) // 2]

    t_fwd = timed(forward)
    logits = forward()
    seeds = torch.zeros((n_classes, *logits.shape), device=device, dtype=logits.dtype)
    for c in range(n_classes):
        seeds[c, :, c] = 1.0 / logits[0, 0].numel()
    res: dict[str, Any] = {"layout": layout, "window_batch": wb, "classes": n_classes, "forward_s": t_fwd,
                           "forward_flops_per_s": wb * fwd_flops / t_fwd}
    try:
        t_b = timed(lambda: torch.autograd.grad(logits, x, seeds, retain_graph=True, is_grads_batched=True))
        res.update(vjp_batched_s=t_b, vjp_batched_flops_per_s=n_classes * wb * vjp_flops / t_b)
    except Exception as exc:  # an op without a vmap rule
        res["vjp_batched_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    t_l = timed(lambda: [torch.autograd.grad(logits, x, seeds[c], retain_graph=True) for c in range(n_classes)])
    res.update(vjp_loop_s=t_l, vjp_loop_flops_per_s=n_classes * wb * vjp_flops / t_l)
    if peak:
        for k in ("forward", "vjp_batched", "vjp_loop"):
            if f"{k}_flops_per_s" in res:
                res[f"{k}_mfu"] = res[f"{k}_flops_per_s"] / peak
    del logits, seeds, x
    if device.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.empty_cache()
    return res


def profile_kernels(model, args, device, layout: str, top: int = 12) -> list[dict[str, Any]]:
    """The device kernels of one bf16 forward of a window batch and one class VJP, by total time."""
    from torch.profiler import ProfilerActivity, profile

    x = window_batch(model, args, device, layout)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with torch.enable_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(x)
        seed = torch.zeros_like(out)
        seed[:, 1] = 1.0
        torch.autograd.grad(out, x, seed)
        sync(device)
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = []
    for e in prof.key_averages():
        t = getattr(e, attr, 0) or getattr(e, "cuda_time_total", 0) or 0
        if device.type == "cuda" and not getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            continue
        rows.append({"name": e.key[:110], "ms": t / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    return rows[:top]


def compile_trial(model, args, device, n_classes: int, reps: int = 3) -> dict[str, Any]:
    """``torch.compile`` of the model: compile time, and one window batch's bf16 forward + looped class
    VJPs (the engine's step) eager against compiled, median of ``reps`` after the first call.

    Both copies run with frozen parameters, as the engine attributes: a compiled backward built while
    the weights require grad would also compute their gradients, work the engine never does."""
    import copy

    wb = args.window_batch
    x = torch.rand((wb, 1, *args.roi), device=device).requires_grad_(True)
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    for p in (*eager.parameters(), *compiled_model.parameters()):
        p.requires_grad_(False)
    compiled = torch.compile(compiled_model)

    def step(m: torch.nn.Module) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.enable_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = m(x)
        seed = torch.zeros_like(out)
        for c in range(n_classes):
            seed.zero_()
            seed[:, c] = 1.0
            torch.autograd.grad(out, x, seed, retain_graph=c < n_classes - 1)
        sync(device)
        return time.perf_counter() - t0

    first = step(compiled)  # compiles the forward and the backward graph
    step(eager)
    e_t, c_t = [], []
    for _ in range(reps):
        e_t.append(step(eager))
        c_t.append(step(compiled))
    e_t.sort()
    c_t.sort()
    e, c = e_t[len(e_t) // 2], c_t[len(c_t) // 2]
    saved = e - c
    return {"window_batch": wb, "classes": n_classes, "compile_s": first - c, "eager_step_s": e,
            "compiled_step_s": c, "speedup": e / c, "steps_to_pay_off": (first - c) / saved if saved > 0 else None}


def exactness_check(eng, device) -> dict[str, Any]:
    """The engine's fp32 maps on this device against float64 (a small UNet, 17 classes, 3 windows).

    Also one window's input gradient through plain PyTorch with TF32 on (its cuDNN default) and
    off, to show what the engine's exact mode guards against. Errors are relative L2 norms.
    """
    import copy

    from monai.networks.nets import UNet

    torch.manual_seed(0)
    # batch-norm in eval mode (an affine map): instance norm over near-constant channels of a random
    # network amplifies float32 rounding ~1e3-fold, which would hide the TF32 effect this measures
    net = UNet(spatial_dims=3, in_channels=1, out_channels=17, channels=(16, 32, 64), strides=(2, 2),
               num_res_units=1, norm="batch").to(device).eval()
    shape, roi = (64, 48, 40), (48, 48, 40)
    image, labels = synthetic_case(shape, 17, device, seed=1)
    x = image[None].float()
    classes = list(range(17))
    window = eng.SlidingWindow(roi_size=roi, overlap=0.25, window_batch=2)
    net64 = copy.deepcopy(net).double()
    m32, _ = eng.compute_maps(net, x, labels, classes, eng.Saliency(), window=window)
    m64, _ = eng.compute_maps(net64, x.double(), labels, classes, eng.Saliency(), window=window)
    res: dict[str, Any] = {"engine_fp32_vs_fp64_rel": float((m32.double() - m64).norm() / m64.norm())}

    def input_gradient(model: torch.nn.Module, window_input: torch.Tensor) -> torch.Tensor:
        inp = window_input.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(inp)[:, 1].sum(), inp)
        return g.double()

    w = x[..., :roi[0], :roi[1], :roi[2]]
    g64 = input_gradient(net64, w.double())
    for name, tf32 in (("tf32_on", True), ("tf32_off", False)):
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            g = input_gradient(net, w)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        res[f"plain_pytorch_{name}_vs_fp64_rel"] = float((g - g64).norm() / g64.norm())
    return res


# ----------------------------------------------------------------------------- engine


def run_engine(eng, model, image, labels, classes, args, device, *, bf16: bool, samples: int, cfg: dict[str, Any]):
    """The engine's path for one patient: clean stitched forward, maps of all classes, RoI statistics."""
    x = image[None].float()
    dtype = torch.bfloat16 if bf16 else None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    window = eng.SlidingWindow(roi_size=args.roi, overlap=args.overlap, window_batch=cfg["window_batch"],
                               autocast=dtype, vjp=cfg["vjp"], memory_format=cfg.get("memory_format", "auto"))
    geometry = window.geometry(x.shape[2:], device=device)
    eng.stitched_forward(model, x, window)  # the clean prediction
    maps, work = eng.compute_maps(
        model, x, labels, classes, eng.SmoothGrad(n_samples=samples, sigma=0.1), window=window, seed=0,
        class_chunk=cfg["class_chunk"],
    )
    stats = eng.roi_statistics(maps.sum(dim=1), labels, args.classes)
    mass = stats.mass.cpu()
    sync(device)
    seconds = time.perf_counter() - t0
    work["forwards"] += geometry.n_windows
    if device.type == "cuda":
        work["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return seconds, mass, work


def engine_with_fallback(eng, model, image, labels, classes, args, device, cfg, **kw):
    """Run the engine; on out-of-memory step down (fewer windows per batch, then class chunks, then a loop)."""
    ladder = [dict(cfg)]
    wb, cc = cfg["window_batch"], cfg["class_chunk"]
    while wb > 1:
        wb = max(1, wb // 2)
        ladder.append({**cfg, "window_batch": wb})
    for chunk in (8, 4):
        if cc is None or chunk < cc:
            ladder.append({**cfg, "window_batch": 1, "class_chunk": chunk})
    ladder.append({**cfg, "window_batch": 1, "class_chunk": None, "vjp": "loop"})
    for i, c in enumerate(ladder):
        try:
            out = run_engine(eng, model, image, labels, classes, args, device, cfg=c, **kw)
            if i:
                note(f"engine failed (out of memory or vmap) with {cfg}; used {c}")
            cfg.update(c)
            return out
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if i == len(ladder) - 1:
                raise
        except RuntimeError as exc:  # e.g. an op without a vmap rule in the class-batched backward
            if c["vjp"] != "batched":
                raise
            note(f"class-batched VJP failed ({type(exc).__name__}: {str(exc)[:200]}); falling back to vjp='loop'")
            ladder[i + 1:] = [{**c, "vjp": "loop", "class_chunk": None}]
    raise AssertionError


# ----------------------------------------------------------------------------- reference


def run_reference_subset(model, image, labels, classes, args, device, n_classes: int, n_windows: int):
    """The reference strategy on a subset, extrapolated to all classes, windows and samples.

    fp32 (TF32 as PyTorch's defaults leave it), one window at a time, for each class in sequence:
    forward, input gradient with the seed M_c·w/Ω. Warmed up first (cuDNN's autotuning is not timed).
    """
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers import sliding_window_inference
    from monai.inferers.utils import _get_scan_interval
    import numpy as np

    x = image[None].float()
    size = tuple(x.shape[2:])
    roi = tuple(args.roi)
    interval = _get_scan_interval(size, roi, 3, (args.overlap,) * 3)
    slices = dense_patch_slices(size, roi, interval)
    w = compute_importance_map(roi, mode="constant", device=device).reshape(roi).float()
    omega = torch.zeros(size, device=device)
    for s in slices:
        omega[s] += w
    # warm-up, untimed: cuDNN autotunes each new shape (batch 1, fp32) on first use, seconds on a GPU
    win0 = x[(slice(None), slice(None), *slices[0])].clone().requires_grad_(True)
    with torch.no_grad():
        model(win0.detach())
    torch.autograd.grad(model(win0)[0, 0].sum(), win0)
    # clean prediction, fp32, one window at a time (timed in full)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(x, roi, 1, model, overlap=args.overlap)
    sync(device)
    t_predict = time.perf_counter() - t0
    # gradient loop on a subset
    sub_classes = classes[:n_classes]
    sub_windows = list(range(0, len(slices), max(1, len(slices) // n_windows)))[:n_windows]
    std = float(0.1 * (x.max() - x.min()))
    xn = x + std * torch.randn(x.shape, device=device)
    units = 0
    sync(device)
    t0 = time.perf_counter()
    for c in sub_classes:
        acc = torch.zeros_like(x)
        for j in sub_windows:
            s = slices[j]
            mask = (labels[s] == c).float()
            win = xn[(slice(None), slice(None), *s)].clone().requires_grad_(True)
            out = model(win)
            seed = torch.zeros_like(out)
            seed[0, c] = mask * w / omega[s]
            (g,) = torch.autograd.grad(out, win, seed)  # the input's gradient only, as Captum takes it
            acc[(slice(None), slice(None), *s)] += g
            units += 1
        acc_np = acc[0, 0].cpu().numpy()  # the reference aggregates on the host
    sync(device)
    t_unit = (time.perf_counter() - t0) / max(units, 1)
    # numpy aggregation: one full-volume masked sum per (class, RoI); time one class, extrapolate
    lab = labels.cpu().numpy()
    t0 = time.perf_counter()
    a = acc_np.astype(np.float64)
    phis = (np.abs(a), np.maximum(a, 0), np.maximum(-a, 0))
    for r in range(args.classes):
        m = lab == r
        for p in phis:
            tot = p.sum()
            _ = p[m].sum() / tot if tot > 0 else 0.0
    t_agg_class = time.perf_counter() - t0
    n_units = len(classes) * len(slices) * args.samples
    total = t_predict + t_unit * n_units + t_agg_class * len(classes)
    return total, {"predict_s": t_predict, "per_window_class_s": t_unit, "aggregate_per_class_s": t_agg_class,
                   "timed_classes": len(sub_classes), "timed_windows": len(sub_windows), "extrapolated_units": n_units}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="same code path on the CPU at tiny sizes (seconds)")
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--dry-swin", action="store_true", help="dry run with SwinUNETR (64^3 windows; minutes on a CPU)")
    ap.add_argument("--wheels", type=Path, default=WHEELS)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="volume (default 256 256 224; dry run 48 48 48)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="window (default 96 96 96; dry run 32 32 32)")
    ap.add_argument("--feature-size", type=int, default=None, help="SwinUNETR feature size (48; dry run 12)")
    ap.add_argument("--classes", type=int, default=None, help="output classes, all explained (17; dry run 3)")
    ap.add_argument("--samples", type=int, default=None, help="SmoothGrad samples (2; dry run 1)")
    ap.add_argument("--repeats", type=int, default=None, help="engine repeats (2; dry run 1)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--window-batch", type=int, default=4)
    ap.add_argument("--class-chunk", type=int, default=None, help="classes per VJP batch (default all)")
    ap.add_argument("--vjp", default="loop", choices=["batched", "loop"],
                    help="class VJPs looped (the engine's default) or vmap-batched")
    ap.add_argument("--ref-classes", type=int, default=2, help="classes timed for the reference (extrapolated)")
    ap.add_argument("--ref-windows", type=int, default=4, help="windows timed for the reference (extrapolated)")
    ap.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                    help="layout of the model and window batches in the engine (auto: the engine's choice)")
    ap.add_argument("--compare-vjp", default=None, choices=["batched", "loop"],
                    help="also time the engine with this VJP mode (default: the other one)")
    ap.add_argument("--skip-fp32", action="store_true", help="skip the fp32 engine run (and the bf16 fidelity)")
    ap.add_argument("--profile", action="store_true", help="print the top device kernels of one forward + VJP")
    ap.add_argument("--compile", action="store_true",
                    help="last, within the budget: torch.compile's compile time and speed on one window batch")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop optional steps past this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dry = args.dry_run
    dry_shape, dry_roi = ((80, 64, 64), (64, 64, 64)) if args.dry_swin else ((48, 48, 48), (32, 32, 32))
    args.shape = tuple(args.shape or (dry_shape if dry else (256, 256, 224)))
    args.roi = tuple(args.roi or (dry_roi if dry else (96, 96, 96)))
    args.feature_size = args.feature_size or (12 if dry else 48)
    args.classes = args.classes or (3 if dry else 17)
    args.samples = args.samples or (1 if dry else 2)
    args.repeats = args.repeats or (1 if dry else 2)

    if not args.skip_install:
        install(args.wheels)
    eng = import_engine()
    if dry:
        device = torch.device("cpu")
        note("dry run: CPU, tiny sizes; figures exercise the code path, they are not measurements")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --dry-run on a CPU machine")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    peak = peak_flops(dev_name) if device.type == "cuda" else None
    result: dict[str, Any] = {
        "device": dev_name, "torch": torch.__version__, "dry_run": dry, "peak_bf16_flops": peak,
        "config": {"shape": list(args.shape), "roi": list(args.roi), "overlap": args.overlap, "classes": args.classes,
                   "samples": args.samples, "feature_size": args.feature_size},
        "notes": NOTES,
    }

    def write() -> None:
        result["wall_s"] = time.perf_counter() - t_start
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))

    try:
        model, desc = build_model(args, device)
        result["model"] = desc
        image, labels = synthetic_case(args.shape, args.classes, device)
        classes = list(range(args.classes))
        present = int(torch.unique(labels).numel())
        n_windows = eng.window_geometry(args.shape, args.roi, overlap=args.overlap).n_windows
        result["config"]["windows"] = n_windows
        print(f"device {dev_name}; torch {torch.__version__}; model {desc}")
        print(f"volume {args.shape}, roi {args.roi}, overlap {args.overlap}: {n_windows} windows; {present} classes in the "
              f"synthetic label map (M_c); SmoothGrad {args.samples} samples", flush=True)

        fwd_flops, vjp_flops = count_flops(model, args.roi, device)
        result.update(flops_forward=fwd_flops, flops_vjp=vjp_flops)
        print(f"FLOPs: one window forward {fwd_flops / 1e9:.1f} GFLOP, one input VJP {vjp_flops / 1e9:.1f} GFLOP")

        budget_left = lambda frac: time.perf_counter() - t_start < args.budget_s * frac  # noqa: E731

        # exactness of the fp32 engine on this device (small UNet, float64 reference)
        try:
            ex = exactness_check(eng, device)
            result["exactness"] = ex
            print(f"exactness: engine fp32 maps vs float64 {ex['engine_fp32_vs_fp64_rel']:.1e} (relative L2); plain "
                  f"PyTorch input gradient with TF32 on {ex['plain_pytorch_tf32_on_vs_fp64_rel']:.1e}, off "
                  f"{ex['plain_pytorch_tf32_off_vs_fp64_rel']:.1e}", flush=True)
        except Exception as exc:  # a figure lost, not the run
            note(f"exactness check failed: {type(exc).__name__}: {str(exc)[:300]}")
        write()

        # forward and VJP throughput on one window batch, in both layouts
        layouts = ["contiguous", "channels_last"] if device.type == "cuda" or not dry else ["contiguous"]
        result["primitives_bf16"] = {}
        for layout in layouts:
            try:
                prim = time_primitives(model, args, device, len(classes), fwd_flops, vjp_flops, peak, layout=layout)
                result["primitives_bf16"][layout] = prim
                pct = (lambda k: f" ({100 * prim[k]:.1f}% of peak)" if k in prim else "")  # noqa: E731
                print(f"{layout}: one batch of {prim['window_batch']} windows, bf16: forward {prim['forward_s'] * 1e3:.1f} ms, "
                      f"{prim['forward_flops_per_s'] / 1e12:.1f} TFLOP/s{pct('forward_mfu')}; {len(classes)} class VJPs "
                      f"batched {prim.get('vjp_batched_s', float('nan')) * 1e3:.1f} ms, "
                      f"{prim.get('vjp_batched_flops_per_s', float('nan')) / 1e12:.1f} TFLOP/s{pct('vjp_batched_mfu')}; "
                      f"looped {prim['vjp_loop_s'] * 1e3:.1f} ms, {prim['vjp_loop_flops_per_s'] / 1e12:.1f} TFLOP/s"
                      f"{pct('vjp_loop_mfu')}; peak {prim.get('peak_gib', 'n/a')} GiB", flush=True)
            except torch.OutOfMemoryError as exc:
                note(f"primitive timing ({layout}) ran out of memory at window_batch {args.window_batch}: {str(exc)[:200]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write()
        if args.profile:
            fmt_name = args.memory_format if args.memory_format != "auto" else "contiguous"
            rows = profile_kernels(model, args, device, fmt_name)
            result["profile"] = {"layout": fmt_name, "top_kernels": rows}
            print(f"top device kernels, one bf16 forward of {args.window_batch} windows + one class VJP ({fmt_name}):")
            for r in rows:
                print(f"  {100 * r['share']:5.1f}%  {r['ms']:8.2f} ms  x{r['calls']:<4d} {r['name']}")
            write()

        cfg = {"window_batch": args.window_batch, "class_chunk": args.class_chunk, "vjp": args.vjp,
               "memory_format": args.memory_format}
        # warm-up (cudnn autotuning, allocator) on a one-sample run, untimed
        engine_with_fallback(eng, model, image, labels, classes, args, device, cfg, bf16=True, samples=1)
        times, mass_bf16, work = [], None, {}
        for r in range(args.repeats):
            t, mass_bf16, work = engine_with_fallback(eng, model, image, labels, classes, args, device, cfg,
                                                      bf16=True, samples=args.samples)
            times.append(t)
            print(f"engine repeat {r + 1}: {t:.2f} s/patient", flush=True)
            if not budget_left(0.35) and r + 1 < args.repeats:
                note(f"stopped engine repeats after {r + 1} to stay within the time budget")
                break
        times.sort()
        engine_s = times[len(times) // 2]
        flops = work["forwards"] * fwd_flops + work["vjps"] * vjp_flops
        achieved = flops / engine_s
        result.update(engine_s=engine_s, engine_s_all=times, engine_config=dict(cfg), engine_work=work,
                      engine_flops=flops, achieved_flops_per_s=achieved,
                      flop_utilisation=(achieved / peak) if peak else None)
        util = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "n/a (no peak for this device)"
        print(f"engine: {engine_s:.2f} s/patient (median of {len(times)}), config {cfg}, work {work}; "
              f"{achieved / 1e12:.2f} TFLOP/s achieved, model FLOP utilisation {util}", flush=True)
        write()

        # reference strategy, subset timed and extrapolated
        ref_s, ref_info = run_reference_subset(model, image, labels, classes, args, device,
                                               n_classes=min(args.ref_classes, len(classes)),
                                               n_windows=min(args.ref_windows, n_windows))
        result.update(reference_s=ref_s, reference=ref_info, speedup_vs_reference=ref_s / engine_s,
                      reference_extrapolated=True)
        print(f"reference (fp32, one window, one class input gradient at a time): {ref_s:.1f} s/patient, EXTRAPOLATED "
              f"from {ref_info['timed_classes']} classes x {ref_info['timed_windows']} windows x 1 sample "
              f"({ref_info['per_window_class_s'] * 1e3:.1f} ms per window-class) to {ref_info['extrapolated_units']} "
              f"window-class-sample units; prediction {ref_info['predict_s']:.2f} s timed in full")
        print(f"speed-up of the engine (bf16) over the reference: {ref_s / engine_s:.1f}x", flush=True)
        write()

        # the other VJP mode, the whole patient, same settings otherwise
        other = args.compare_vjp or ("loop" if cfg["vjp"] == "batched" else "batched")
        if other != cfg["vjp"] and budget_left(0.55):
            other_cfg = {**cfg, "vjp": other, "class_chunk": None}
            t_other, _, work_other = engine_with_fallback(eng, model, image, labels, classes, args, device, other_cfg,
                                                          bf16=True, samples=args.samples)
            loop_s, batched_s = (t_other, engine_s) if other == "loop" else (engine_s, t_other)
            result.update(engine_other_vjp={"vjp": other, "s": t_other, "work": work_other, "config": other_cfg},
                          batched_speedup_over_loop=loop_s / batched_s)
            print(f"vjp={other}: {t_other:.2f} s/patient ({other_cfg}); class-batched / looped speed: "
                  f"{loop_s / batched_s:.2f}x", flush=True)
        else:
            note("VJP-mode comparison skipped (time budget)")
        write()

        # fp32 (exact: TF32 off inside the engine) and bf16 fidelity against it (same noise: same seed)
        if not args.skip_fp32 and budget_left(0.6):
            t_fp32, mass_fp32, work_fp32 = engine_with_fallback(eng, model, image, labels, classes, args, device,
                                                                dict(cfg), bf16=False, samples=args.samples)
            rho_all = spearman(mass_bf16, mass_fp32)
            rho_abs = spearman(mass_bf16[:, 0], mass_fp32[:, 0])
            per_class = sorted(spearman(mass_bf16[k, 0], mass_fp32[k, 0]) for k in range(len(classes)))
            result.update(engine_fp32_s=t_fp32, engine_fp32_work=work_fp32, spearman_bf16_vs_fp32=rho_all,
                          spearman_abs_mass=rho_abs, spearman_abs_mass_min_per_class=per_class[0],
                          spearman_abs_mass_median_per_class=per_class[len(per_class) // 2],
                          bf16_speedup_over_fp32=t_fp32 / engine_s, fp32_speedup_vs_reference=ref_s / t_fp32)
            print(f"bf16 fidelity: Spearman of RoI mass vectors bf16 vs fp32 {rho_all:.4f} (abs mass {rho_abs:.4f}, "
                  f"per class median {per_class[len(per_class) // 2]:.4f}, worst {per_class[0]:.4f}); engine in exact "
                  f"fp32 {t_fp32:.2f} s/patient (bf16 {t_fp32 / engine_s:.2f}x faster; fp32 {ref_s / t_fp32:.1f}x the "
                  f"reference)", flush=True)
        else:
            note("fp32 run and bf16 fidelity skipped (--skip-fp32 or time budget)")
        write()

        if args.compile and budget_left(0.75):
            try:
                ct = compile_trial(model, args, device, len(classes))
                result["compile"] = ct
                print(f"torch.compile: {ct['compile_s']:.1f} s to compile; one batch of {ct['window_batch']} windows, "
                      f"forward + {ct['classes']} looped VJPs: eager {ct['eager_step_s']:.3f} s, compiled "
                      f"{ct['compiled_step_s']:.3f} s ({ct['speedup']:.2f}x); pays off after "
                      f"{ct['steps_to_pay_off']} batches", flush=True)
            except Exception as exc:  # compile failures are a finding, not a lost run
                note(f"torch.compile trial failed: {type(exc).__name__}: {str(exc)[:300]}")
        elif args.compile:
            note("torch.compile trial skipped (time budget)")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        write()
        return 1
    write()
    print(f"done in {result['wall_s']:.1f} s" + (f"; wrote {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
