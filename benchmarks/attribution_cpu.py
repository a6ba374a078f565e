"""Attribution core on the CPU: the engine against the reference strategy and the irreducible work.

On one volume and one model this measures, per patient:

(a) the engine: ``explain_volume`` (SmoothGrad, all predicted classes, RoI aggregation included);
(b) the reference strategy (MI2DataLab/agg2exp) re-implemented with corrected maths: for each
    class in sequence, loop over the windows one at a time in fp32, forward, backward with the
    exact seed M_c·w/Ω; then numpy aggregation with one full-volume masked sum per (class, RoI);
(c) the irreducible work, timed as bare primitives in the same run: the clean prediction's
    forwards (no grad, one per window), then per sample and window one forward with grad and one
    ``torch.autograd.grad`` per class present in the window (seeds built outside the timer), in
    the layout and on the kernels the engine uses by default (channels-last and the engine's CPU
    kernels, :mod:`engine.attribution.kernels`), so that engine/irreducible is the engine's own
    overhead.

It prints seconds per patient (medians over ``--repeats``), engine/irreducible and
reference/engine, the engine's cost in forward-pass equivalents (from the measured VJP/forward
time ratio), the maps' agreement with the reference, and peak memory (ru_maxrss of a fresh
subprocess minus a baseline subprocess that loads the model and runs one forward) for 1, 8 and
17 classes with maps not kept.

Model: the demo UNet with trained weights if ``engine/assets/demo_unet.pt`` exists. When its
prediction does not cover all 17 classes (always for the untrained UNet) it is wrapped with a
pointwise intensity prior (class c wins where the intensity is nearest the c-th of 17 levels), so
that the 1/8/17-class comparison has 17 real classes; the UNet's cost is unchanged.

    python benchmarks/attribution_cpu.py --repeats 3 --samples 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.attribution import SlidingWindow, explain_volume  # noqa: E402
from engine.attribution.kernels import engine_kernels, resolve_kernels  # noqa: E402
from engine.attribution.sliding import prepare_model, resolve_memory_format, window_geometry  # noqa: E402
from engine.labels import THORAX_CLASSES  # noqa: E402
from engine.models import DEMO_ROI_SIZE, DEMO_WEIGHTS, demo_model  # noqa: E402
from engine.phantoms import make_phantom  # noqa: E402
from engine.training import scale_hu  # noqa: E402

from _common import write_json  # noqa: E402  (benchmarks/, the script's own folder)

N_CLASSES = len(THORAX_CLASSES)
SMALL_ROI = (16, 16, 16)


# ----------------------------------------------------------------------------- model and input


class IntensityPrior(torch.nn.Module):
    """``model(x) + strength · (−(x − μ_c)²)``: class c wins where x is nearest μ_c (pointwise).

    Makes any segmentation network predict all of its classes on a CT volume, at the network's
    own cost (the prior is a handful of elementwise ops), so that benchmarks over K classes are
    possible with untrained weights.
    """

    def __init__(self, model: torch.nn.Module, levels: torch.Tensor, strength: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("levels", levels.reshape(1, -1, 1, 1, 1).float())
        self.strength = float(strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - self.strength * (x - self.levels) ** 2


def make_image(shape: tuple[int, int, int]) -> torch.Tensor:
    """Phantom 0 at ``shape`` over the default 336 x 280 x 280 mm field of view, scaled HU: (1, *S)."""
    spacing = (336.0 / shape[0], 280.0 / shape[1], 280.0 / shape[2])
    ph = make_phantom(0, shape=shape, spacing=spacing)
    return torch.from_numpy(np.ascontiguousarray(scale_hu(ph.image))).float()[None]


def build_model(image: torch.Tensor, roi: tuple[int, ...], overlap: float, weights: str) -> tuple[torch.nn.Module, str, str]:
    """The demo UNet (trained if available), wrapped with the intensity prior unless it predicts 17 classes."""
    path = DEMO_WEIGHTS if weights == "auto" else (None if weights == "none" else Path(weights))
    if path is not None and not Path(path).is_file():
        path = None
    unet = demo_model(weights=path).module.eval()
    source = f"demo UNet ({'trained: ' + str(path) if path else 'untrained'})"
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        pred = sliding_window_inference(image[None], roi, 1, unet, overlap=overlap)[0].argmax(0)
    n_present = int(torch.unique(pred).numel())
    if n_present >= N_CLASSES:
        return unet, source + f", predicts {n_present} classes", str(path) if path else "none"
    x = image.flatten()
    lo, hi = torch.quantile(x[:: max(1, x.numel() // 200000)], torch.tensor([0.005, 0.995])).tolist()
    levels = torch.linspace(lo, hi, N_CLASSES)
    gap = float(levels[1] - levels[0]) if hi > lo else 1.0
    model = IntensityPrior(unet, levels, strength=200.0 / gap**2).eval()
    return (model, source + f" predicts {n_present} classes; wrapped with a pointwise intensity prior so all 17 are predicted",
            str(path) if path else "none")


def choose_roi(shape: tuple[int, ...], roi: list[int] | None) -> tuple[int, int, int]:
    if roi:
        return tuple(int(r) for r in roi)  # type: ignore[return-value]
    return DEMO_ROI_SIZE if all(s >= r for s, r in zip(shape, DEMO_ROI_SIZE)) else SMALL_ROI


# ----------------------------------------------------------------------------- (a) engine


def run_engine(model, image, roi, overlap, samples, sigma, seed, targets=None, return_maps=True, kernels="auto"):
    t0 = time.perf_counter()
    e = explain_volume(
        model, image, method="smoothgrad", window=SlidingWindow(roi_size=roi, overlap=overlap, kernels=kernels),
        seed=seed,
        n_samples=samples,
        sigma=sigma, targets=targets, return_maps=return_maps, class_names=THORAX_CLASSES,
    )
    return time.perf_counter() - t0, e


# ----------------------------------------------------------------------------- (b) reference strategy


def _reference_windows(image_size, roi, overlap):
    """MONAI's window layout, computed from MONAI's own helpers (independently of the engine)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    nd = len(image_size)
    pad = []
    for d in reversed(range(nd)):
        diff = max(roi[d] - image_size[d], 0)
        pad.extend([diff // 2, diff - diff // 2])
    padded = tuple(max(image_size[d], roi[d]) for d in range(nd))
    interval = _get_scan_interval(padded, roi, nd, (float(overlap),) * nd)
    slices = dense_patch_slices(padded, roi, interval)
    w = compute_importance_map(roi, mode="constant", device="cpu").reshape(roi).float()
    omega = torch.zeros(padded)
    for s in slices:
        omega[s] += w
    return pad, padded, slices, w, omega


def run_reference(model, image, roi, overlap, samples, sigma, seed, classes):
    """One class at a time; per class every sample and window: fp32 forward + exact-seed backward."""
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    x = image[None].float()
    with torch.no_grad():
        pred = sliding_window_inference(x, roi, 1, model, overlap=overlap)[0].argmax(0)
    if classes is None:
        classes = torch.unique(pred).tolist()
    size = tuple(x.shape[2:])
    pad, padded, slices, w, omega = _reference_windows(size, roi, overlap)
    pred_p = F.pad(pred[None, None].float(), pad, value=-1)[0, 0].long() if any(pad) else pred
    std = float(sigma * (x.max() - x.min()))
    g = torch.Generator().manual_seed(int(seed))
    noisy = [x + torch.normal(0.0, torch.full_like(x, std), generator=g) for _ in range(samples)]
    noisy = [F.pad(n, pad) if any(pad) else n for n in noisy]
    maps = np.zeros((len(classes), *size), dtype=np.float32)
    for k, c in enumerate(classes):
        acc = torch.zeros((1, 1, *padded))
        for xn in noisy:
            for s in slices:
                mask = (pred_p[s] == c).float()
                if not bool(mask.any()):
                    continue
                win = xn[(slice(None), slice(None), *s)].clone().requires_grad_(True)
                out = model(win)
                seed_t = torch.zeros_like(out)
                seed_t[0, c] = mask * w / omega[s]
                out.backward(seed_t)
                acc[(slice(None), slice(None), *s)] += win.grad / samples
        full = acc[0, 0]
        if any(pad):
            idx = tuple(slice(pad[2 * (2 - d)], pad[2 * (2 - d)] + size[d]) for d in range(3))
            full = full[idx]
        maps[k] = full.numpy()
    # numpy aggregation: a separate full-volume masked sum for every (class, RoI) pair
    pred_np = pred.numpy()
    rois = np.unique(pred_np).tolist()
    mass = np.zeros((len(classes), 3, len(rois)))
    for k in range(len(classes)):
        a = maps[k].astype(np.float64)
        phis = (np.abs(a), np.maximum(a, 0), np.maximum(-a, 0))
        for j, r in enumerate(rois):
            m = pred_np == r
            for si, p in enumerate(phis):
                tot = p.sum()
                mass[k, si, j] = p[m].sum() / tot if tot > 0 else 0.0
    return time.perf_counter() - t0, maps, mass, classes, rois


# ----------------------------------------------------------------------------- (c) irreducible work


def run_irreducible(model, image, roi, overlap, samples, sigma, seed, prediction, classes):
    """Only the primitives: clean forwards, then per sample/window a forward and one VJP per class present."""
    x = image[None].float()
    geo = window_geometry(tuple(x.shape[2:]), roi, overlap=overlap)
    xp = geo.pad_input(x)
    pred_p = F.pad(prediction[None, None].float(), geo.pad, value=-1)[0, 0].long() if any(geo.pad) else prediction
    std = float(sigma * (x.max() - x.min()))
    g = torch.Generator().manual_seed(int(seed))
    noisy = [geo.pad_input(x + torch.normal(0.0, torch.full_like(x, std), generator=g)) for _ in range(samples)]
    wins = [[n[(slice(None), slice(None), *s)].clone() for s in geo.slices] for n in noisy]
    clean = [xp[(slice(None), slice(None), *s)].clone() for s in geo.slices]
    present = []  # per window: the classes with a voxel in it
    for s in geo.slices:
        present.append([c for c in classes if bool((pred_p[s] == c).any())])

    def seed_of(j: int, c: int) -> torch.Tensor:  # built outside the timed region
        s = geo.slices[j]
        t = torch.zeros((1, N_CLASSES, *roi))
        t[0, c] = (geo.weight / geo.overlap_weight[s]) * (pred_p[s] == c)
        return t

    fmt = resolve_memory_format("auto", x.device, 3)
    if fmt is not None:
        prepare_model(model, fmt)
        wins = [[w.contiguous(memory_format=fmt) for w in sample] for sample in wins]
        clean = [w.contiguous(memory_format=fmt) for w in clean]
    with engine_kernels(model, resolve_kernels("auto", x.device)):
        return _time_primitives(model, clean, wins, present, seed_of)


def _time_primitives(model, clean, wins, present, seed_of):
    fwd_times, vjp_times, total = [], [], 0.0
    with torch.no_grad():
        for w in clean:
            t0 = time.perf_counter()
            model(w)
            total += time.perf_counter() - t0
    n_vjp = 0
    for sample in wins:
        for j, w in enumerate(sample):
            w.requires_grad_(True)
            t0 = time.perf_counter()
            out = model(w)
            t1 = time.perf_counter()
            fwd_times.append(t1 - t0)
            total += t1 - t0
            for i, c in enumerate(present[j]):
                sd = seed_of(j, c)
                t0 = time.perf_counter()
                torch.autograd.grad(out, w, sd, retain_graph=i < len(present[j]) - 1)
                dt = time.perf_counter() - t0
                vjp_times.append(dt)
                total += dt
                n_vjp += 1
            del out
    return total, {"forward_s": statistics.median(fwd_times), "vjp_s": statistics.median(vjp_times) if vjp_times else float("nan"),
                   "forwards": len(clean) + len(clean) * len(wins), "vjps": n_vjp}


# ----------------------------------------------------------------------------- memory (subprocesses)


def _child(args: argparse.Namespace) -> None:
    """A fresh process: load the model and the saved volume, then the baseline forward or the engine."""
    torch.set_num_threads(args.threads)
    image = torch.from_numpy(np.load(args.image))
    roi = tuple(args.roi)
    unet = demo_model(weights=None if args.weights == "none" else Path(args.weights)).module.eval()
    model: torch.nn.Module = unet
    if args.levels:
        levels = torch.tensor([float(v) for v in args.levels.split(",")])
        model = IntensityPrior(unet, levels, strength=200.0 / float(levels[1] - levels[0]) ** 2).eval()
    if args.child == "baseline":
        with torch.no_grad():
            model(image[None, :, : roi[0], : roi[1], : roi[2]])
    else:
        k = int(args.child)
        run_engine(model, image, roi, args.overlap, args.samples, args.sigma, args.seed,
                   targets=list(range(k)), return_maps=False)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure_memory(args: argparse.Namespace, model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...],
                   weights: str, ks: tuple[int, ...] = (1, 8, 17)) -> dict[str, Any]:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="attr_mem_"))
    np.save(tmp / "image.npy", image.numpy())
    levels = ",".join(f"{v:.8g}" for v in model.levels.flatten().tolist()) if isinstance(model, IntensityPrior) else ""

    def run(what: str) -> int:
        cmd = [sys.executable, __file__, "--_child", what, "--_image", str(tmp / "image.npy"), "--roi", *map(str, roi),
               "--samples", str(args.samples), "--overlap", str(args.overlap), "--weights", weights,
               "--threads", str(args.threads), "--_levels", levels]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return int(json.loads(out.strip().splitlines()[-1])["maxrss_kb"])

    base = run("baseline")
    res: dict[str, Any] = {"baseline_maxrss_mb": base / 1024}
    for k in ks:
        peak = run(str(k))
        res[f"classes_{k}_maxrss_mb"] = peak / 1024
        res[f"classes_{k}_mb"] = (peak - base) / 1024
    # above-baseline ratio (None when 1 class adds nothing measurable) and the whole-process ratio
    d1 = res[f"classes_{ks[0]}_mb"]
    res["ratio_17_vs_1"] = res[f"classes_{ks[-1]}_mb"] / d1 if d1 > 1.0 else None
    res["ratio_17_vs_1_process"] = res[f"classes_{ks[-1]}_maxrss_mb"] / res[f"classes_{ks[0]}_maxrss_mb"]
    return res


# ----------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2, help="SmoothGrad samples")
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 80, 80])
    ap.add_argument("--roi", type=int, nargs=3, default=None,
                    help=f"window size (default {DEMO_ROI_SIZE}, or {SMALL_ROI} for volumes smaller than that)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="auto", help="'auto' (trained demo weights if present), 'none', or a path")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_image", dest="image", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_levels", dest="levels", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    image = make_image(shape)
    roi = choose_roi(shape, args.roi)
    model, source, weights_used = build_model(image, roi, args.overlap, args.weights)
    n_windows = window_geometry(shape, roi, overlap=args.overlap).n_windows
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, {info['threads']} threads")
    print(f"model: {source}")
    print(f"volume {shape}, roi {roi}, overlap {args.overlap}: {n_windows} windows; SmoothGrad {args.samples} samples, sigma {args.sigma}")

    if args.memory_only:
        mem = measure_memory(args, model, image, roi, weights_used)
        print(json.dumps(mem, indent=1))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "model": source, "shape": list(shape), "roi": list(roi),
                                             "windows": n_windows, "samples": args.samples, "memory": mem}, indent=1))
        return 0
    # warm-up (allocator, oneDNN kernels) at the full sizes, untimed
    with torch.no_grad():
        model(torch.zeros((1, 1, *roi)))

    eng_t, ref_t, irr_t, fwd_s, vjp_s = [], [], [], [], []
    last: dict[str, Any] = {}
    for r in range(args.repeats):
        te, e = run_engine(model, image, roi, args.overlap, args.samples, args.sigma, args.seed)
        classes = [THORAX_CLASSES.index(n) for n in e.targets]
        ti, prim = run_irreducible(model, image, roi, args.overlap, args.samples, args.sigma, args.seed, e.prediction, classes)
        tr, ref_maps, ref_mass, _, rois = run_reference(model, image, roi, args.overlap, args.samples, args.sigma, args.seed, classes)
        eng_t.append(te)
        irr_t.append(ti)
        ref_t.append(tr)
        fwd_s.append(prim["forward_s"])
        vjp_s.append(prim["vjp_s"])
        print(f"repeat {r + 1}/{args.repeats}: engine {te:.2f}s  irreducible {ti:.2f}s  reference {tr:.2f}s  "
              f"(engine/irreducible {te / ti:.3f}, reference/engine {tr / te:.2f})", flush=True)
        last = {"e": e, "classes": classes, "ref_maps": ref_maps, "ref_mass": ref_mass, "rois": rois, "prim": prim}

    # The algorithm's check: the engine on PyTorch's kernels (the reference's) must give the reference's
    # maps. The timed engine runs on its own CPU kernels; their maps differ from any other fp32 kernels'
    # at voxels where an activation's input is within rounding of zero (reported beside it).
    _, e_check = run_engine(model, image, roi, args.overlap, args.samples, args.sigma, args.seed, kernels="torch")
    e = last["e"]
    ref_maps = last["ref_maps"]

    def max_rel_err(ex: Any) -> float:
        m = np.stack([ex.maps[THORAX_CLASSES[c]].numpy() for c in last["classes"]])
        rel = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(m, ref_maps)]
        return max(rel) if rel else 0.0

    max_rel = max_rel_err(e_check)
    max_rel_kernels = max_rel_err(e)
    imp = e_check.importances.filter(stat="mass")
    roi_names = [THORAX_CLASSES[r] for r in last["rois"]]
    mass_err = 0.0
    lookup = {(t, ro, sg): v for t, ro, sg, v in imp.select("target", "roi", "sign", "value").iter_rows()}
    for k, c in enumerate(last["classes"]):
        for si, sg in enumerate(("abs", "pos", "neg")):
            for j, rn in enumerate(roi_names):
                mass_err = max(mass_err, abs(lookup.get((THORAX_CLASSES[c], rn, sg), 0.0) - last["ref_mass"][k, si, j]))

    med = statistics.median
    engine_s, irr_s, ref_s = med(eng_t), med(irr_t), med(ref_t)
    ratios_ei = [a / b for a, b in zip(eng_t, irr_t)]
    ratios_re = [a / b for a, b in zip(ref_t, eng_t)]
    vjp_per_fwd = med(vjp_s) / med(fwd_s)
    work = dict(e.work)
    fwd_equiv_counted = work["forwards"] + vjp_per_fwd * work["vjps"]
    fwd_equiv_timed = engine_s / med(fwd_s)
    result: dict[str, Any] = {
        "machine": info,
        "model": source,
        "config": {"shape": list(shape), "roi": list(roi), "overlap": args.overlap, "windows": n_windows,
                   "samples": args.samples, "sigma": args.sigma, "repeats": args.repeats, "classes": len(last["classes"])},
        "engine_s": engine_s, "irreducible_s": irr_s, "reference_s": ref_s,
        "engine_s_all": eng_t, "irreducible_s_all": irr_t, "reference_s_all": ref_t,
        "engine_over_irreducible": med(ratios_ei), "reference_over_engine": med(ratios_re),
        "engine_over_irreducible_best": min(eng_t) / min(irr_t), "reference_over_engine_best": min(ref_t) / min(eng_t),
        "goal_engine_over_irreducible": 1.15, "goal_reference_over_engine": 1.0,
        "forward_s": med(fwd_s), "vjp_s": med(vjp_s), "vjp_per_forward": vjp_per_fwd,
        "engine_work": work, "engine_forward_equivalents": fwd_equiv_counted,
        "engine_forward_equivalents_timed": fwd_equiv_timed,
        "engine_timings": e.timings,
        "maps_max_rel_err": max_rel, "maps_match": bool(max_rel <= 1e-4),
        "maps_max_rel_err_engine_kernels": max_rel_kernels,
        "mass_max_abs_err": mass_err,
    }
    print(f"\nseconds per patient (median of {args.repeats}): engine {engine_s:.2f}  irreducible {irr_s:.2f}  reference {ref_s:.2f}")
    print(f"engine/irreducible {result['engine_over_irreducible']:.3f} (goal <= 1.15)   "
          f"reference/engine {result['reference_over_engine']:.2f} (goal >= 1)   [best of each: "
          f"{result['engine_over_irreducible_best']:.3f} and {result['reference_over_engine_best']:.2f}]")
    print(f"one forward {med(fwd_s) * 1e3:.0f} ms, one VJP {med(vjp_s) * 1e3:.0f} ms: VJP/forward {vjp_per_fwd:.2f}")
    print(f"engine work {work}: {fwd_equiv_counted:.1f} forward equivalents counted "
          f"({fwd_equiv_timed:.1f} by time); engine timings {', '.join(f'{k} {v:.2f}s' for k, v in e.timings.items())}")
    print(f"maps engine vs reference, both on PyTorch's kernels: max relative error {max_rel:.2e} "
          f"({'match' if result['maps_match'] else 'MISMATCH'}); RoI mass max abs difference {mass_err:.2e}; "
          f"the timed engine on its own kernels: {max_rel_kernels:.2e}")
    if not args.no_memory:
        mem = measure_memory(args, model, image, roi, weights_used)
        result["memory"] = mem
        r = mem["ratio_17_vs_1"]
        print(f"peak memory above baseline (maps not kept): 1 class {mem['classes_1_mb']:.1f} MB, 8 classes "
              f"{mem['classes_8_mb']:.1f} MB, 17 classes {mem['classes_17_mb']:.1f} MB; 17/1 = "
              f"{'n/a (1 class adds < 1 MB)' if r is None else f'{r:.2f}'} (goal <= 1.5); whole process "
              f"{mem['classes_1_maxrss_mb']:.0f} / {mem['classes_8_maxrss_mb']:.0f} / {mem['classes_17_maxrss_mb']:.0f} MB "
              f"(17/1 = {mem['ratio_17_vs_1_process']:.2f}), baseline process {mem['baseline_maxrss_mb']:.0f} MB")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
