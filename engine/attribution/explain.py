"""``explain_volume``: one volume in, predicted label map and RoI importances out.

Steps, all on the compute device: stitched clean prediction (MONAI sliding windows) → masks M_c →
per-class gradient maps for the chosen method (classes batched per window, memory bounded to the
K maps being accumulated) → one scatter pass per class into RoI statistics. Maps are freed unless
``return_maps`` asks to keep them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

from engine.aggregate import RoISet, aggregate
from engine.attribution.gradients import GRADIENT_METHODS, GradientMethod, gradient_method
from engine.attribution.sliding import (
    BlendMode,
    VJPMode,
    WindowGeometry,
    stitched_forward,
    window_geometry,
    window_gradients,
)
from engine.attribution.targets import TargetSeeds, resolve_target_kind
from engine.labels import resolve_class_names

ClassRef = int | str


@dataclass
class Explanation:
    """What ``explain_volume`` returns.

    ``prediction`` is the (D, H, W) label map of the clean stitched prediction; ``importances`` is
    the long format (target, roi, stat, sign, value); ``maps`` (class name → (D, H, W) attribution,
    summed over input channels) only when ``return_maps=True``; ``logits`` the stitched logits
    when ``return_logits=True``.
    """

    prediction: torch.Tensor
    importances: pl.DataFrame
    class_names: tuple[str, ...]
    targets: tuple[str, ...]
    method: str
    options: dict[str, Any]
    maps: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    work: dict[str, int] = field(default_factory=dict)

    def voxels(self) -> dict[str, int]:
        """Predicted voxel count per class."""
        counts = torch.bincount(self.prediction.flatten().long(), minlength=len(self.class_names))
        return {n: int(c) for n, c in zip(self.class_names, counts.tolist())}


def _resolve_targets(targets: Sequence[ClassRef] | None, names: tuple[str, ...], present: list[int]) -> list[int]:
    if targets is None:
        return present
    out = []
    for t in targets:
        if isinstance(t, str):
            if t not in names:
                raise ValueError(f"unknown target class {t!r}; classes are {list(names)}")
            out.append(names.index(t))
        else:
            if not 0 <= int(t) < len(names):
                raise ValueError(f"target index {t} is out of range for {len(names)} classes")
            out.append(int(t))
    return [c for c in dict.fromkeys(out) if c in present]


def _device_of(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class CleanPrediction:
    """The clean stitched prediction every method starts from, and what it fixes."""

    x: torch.Tensor  # (1, C_in, *S) on the compute device
    geometry: WindowGeometry
    logits: torch.Tensor  # (C, *S)
    names: tuple[str, ...]
    prediction: torch.Tensor  # (*S) label map, argmax of the logits
    classes: list[int]  # the targets to explain: requested ones that are predicted
    seconds: float

    def rois(self, rois: RoISet | None, joined: Mapping[str, Sequence[str]] | None) -> RoISet:
        """The given RoI set, or the predicted segments plus joined RoIs."""
        if rois is not None:
            return rois
        return RoISet(self.prediction, self.names, {k: tuple(v) for k, v in (joined or {}).items()})


def predict_clean(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float,
    blend: BlendMode,
    window_batch: int,
    autocast_dtype: torch.dtype | None,
    class_names: Sequence[str] | None,
    targets: Sequence[ClassRef] | None,
    device: torch.device,
) -> CleanPrediction:
    """Check the image, run MONAI's stitched forward once and resolve names and targets.

    The model must already be in eval mode (see :func:`eval_mode`).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (C_in, D, H, W), got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; fix or exclude the volume")
    t0 = time.perf_counter()
    x = image.to(device, torch.float32)[None]
    geometry = window_geometry(x.shape[2:], roi_size, overlap=overlap, blend=blend, device=device)
    logits = stitched_forward(
        model, x, geometry, blend=blend, overlap=overlap, window_batch=window_batch, autocast_dtype=autocast_dtype,
    )[0]
    names = resolve_class_names(logits.shape[0], class_names)
    prediction = logits.argmax(0)
    classes = _resolve_targets(targets, names, torch.unique(prediction).tolist())
    return CleanPrediction(x, geometry, logits, names, prediction, classes, time.perf_counter() - t0)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with the model in eval mode, restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def compute_maps(
    model: torch.nn.Module,
    x: torch.Tensor,
    prediction: torch.Tensor,
    classes: Sequence[int],
    method: GradientMethod,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    blend: BlendMode = "constant",
    target: str = "sum",
    seed: int = 0,
    window_batch: int = 1,
    class_chunk: int | None = None,
    vjp: VJPMode = "auto",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Attribution maps (K, C_in, *S) of ``classes`` for input ``x`` (1, C_in, *S).

    ``class_chunk`` bounds how many class maps are accumulated at once (each chunk repeats the
    forwards); the noise of every chunk is the same, since the generator restarts from ``seed``.
    """
    geometry = window_geometry(x.shape[2:], roi_size, overlap=overlap, blend=blend, device=x.device)
    seeds = TargetSeeds(
        target, prediction, geometry, model=model, blend=blend, overlap=overlap,
        window_batch=window_batch, autocast_dtype=autocast_dtype,
    )
    chunk = len(classes) if not class_chunk else max(1, int(class_chunk))
    out = torch.zeros((len(classes), x.shape[1], *x.shape[2:]), device=x.device)
    work = {"forwards": 0, "vjps": 0, "passes": 0}
    for lo in range(0, len(classes), chunk):
        part = list(classes[lo:lo + chunk])
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
        acc = out[lo:lo + chunk]
        for xi, weight in method.passes(x, generator=generator):
            _, counters = window_gradients(
                model, xi, geometry, part, seeds.seed_fn(xi), window_batch=window_batch, vjp=vjp,
                autocast_dtype=autocast_dtype, out=acc, scale=weight,
            )
            work["forwards"] += counters["forwards"]
            work["vjps"] += counters["vjps"]
            work["passes"] += 1
    method.finalize(x, out)
    return out, work


def explain_volume(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    method: str = "smoothgrad",
    targets: Sequence[ClassRef] | None = None,
    class_names: Sequence[str] | None = None,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    blend: BlendMode = "constant",
    seed: int = 0,
    return_maps: bool = False,
    return_logits: bool = False,
    device: torch.device | str | None = None,
    target: str = "sum",
    rois: RoISet | None = None,
    joined_rois: Mapping[str, Sequence[str]] | None = None,
    window_batch: int = 1,
    class_chunk: int | None = None,
    vjp: VJPMode = "auto",
    autocast_dtype: torch.dtype | None = None,
    **method_options: Any,
) -> Explanation:
    """Explain every (or each requested) predicted class of one volume and aggregate into RoIs.

    ``model`` maps (B, C_in, *roi_size) to (B, C_out, *roi_size) logits; ``image`` is (C_in, D, H, W).
    ``targets=None`` explains every class present in the prediction. RoIs default to the predicted
    segments (named like the classes), plus ``joined_rois`` (e.g. ``{"lung": (five lobes)}``); pass
    ``rois`` for custom RoIs (a :class:`~engine.aggregate.RoISet`). Method options:
    ``n_samples``, ``sigma`` (SmoothGrad); ``steps``, ``baseline`` (IG).
    """
    resolve_target_kind(target)
    if method not in GRADIENT_METHODS:
        from engine.attribution import perturbation

        if method in perturbation.PERTURBATION_METHODS:
            return perturbation.explain_volume_perturbation(
                model, image, method=method, targets=targets, class_names=class_names, roi_size=roi_size,
                overlap=overlap, blend=blend, seed=seed, device=device, target=target, rois=rois,
                joined_rois=joined_rois, window_batch=window_batch, return_maps=return_maps,
                return_logits=return_logits, autocast_dtype=autocast_dtype, **method_options,
            )
    grad_method = gradient_method(method, **method_options)
    dev = _device_of(model, device)
    with eval_mode(model):
        clean = predict_clean(
            model, image, roi_size=roi_size, overlap=overlap, blend=blend, window_batch=window_batch,
            autocast_dtype=autocast_dtype, class_names=class_names, targets=targets, device=dev,
        )
        timings = {"predict": clean.seconds, "attribute": 0.0, "aggregate": 0.0}
        target_names = [clean.names[c] for c in clean.classes]
        roi_set = clean.rois(rois, joined_rois)
        # Chunks of classes are attributed and aggregated one after the other, so only one chunk's
        # maps are ever alive (a class's RoI rows depend on its own map alone, so this is exact).
        chunk = max(1, int(class_chunk)) if class_chunk else max(1, len(clean.classes))
        work = {"forwards": clean.geometry.n_windows, "vjps": 0, "passes": 0}
        frames, kept = [], {}
        for lo in range(0, len(clean.classes), chunk):
            t0 = time.perf_counter()
            maps, w = compute_maps(
                model, clean.x, clean.prediction, clean.classes[lo:lo + chunk], grad_method, roi_size=roi_size,
                overlap=overlap, blend=blend, target=target, seed=seed, window_batch=window_batch, vjp=vjp,
                autocast_dtype=autocast_dtype,
            )
            for k, v in w.items():
                work[k] += v
            # over input channels: (K, *S); a view for one channel, not a second K-map copy
            maps = maps[:, 0] if maps.shape[1] == 1 else maps.sum(dim=1)
            timings["attribute"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            frames.append(aggregate(maps, roi_set, target_names[lo:lo + chunk]))
            if return_maps:
                kept.update({n: maps[i].cpu() for i, n in enumerate(target_names[lo:lo + chunk])})
            del maps
            timings["aggregate"] += time.perf_counter() - t0
        importances = pl.concat(frames) if frames else aggregate(
            torch.zeros((0, *clean.prediction.shape), device=clean.x.device), roi_set, [])
        return Explanation(
            prediction=clean.prediction.cpu(),
            importances=importances,
            class_names=clean.names,
            targets=tuple(target_names),
            method=grad_method.name,
            options={**grad_method.options(), "target": target, "blend": blend, "overlap": overlap,
                     "roi_size": list(roi_size), "seed": seed},
            maps=kept if return_maps else None,
            logits=clean.logits.cpu() if return_logits else None,
            timings=timings,
            work=work,
        )
