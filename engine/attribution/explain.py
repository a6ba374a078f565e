"""The front door: :class:`Explainer` and ``explain_volume``, one volume in, prediction and RoI importances out.

Every method, gradient or perturbation, goes through the same three steps on the compute device:
the clean stitched prediction (MONAI sliding windows; masks M_c and the classes to explain) →
the method's maps (:meth:`~engine.attribution.base.AttributionMethod.attribute`) → one scatter pass
per class into RoI statistics (:func:`engine.aggregate.aggregate`). Maps are freed unless
``return_maps`` asks to keep them. Inputs follow the model's parameter dtype (a float64 model
gets float64 inputs and maps); ``autocast`` in the window settings applies on top.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
import torch

from engine.aggregate import RoISet, aggregate
from engine.attribution.base import AttributionMethod, Problem
from engine.attribution.gradients import GradientMethod, SmoothGrad
from engine.attribution.methods import make_method
from engine.attribution.objectives import Objective, resolve_objective
from engine.attribution.sliding import SlidingWindow, WindowGeometry, stitched_forward
from engine.labels import resolve_class_names

log = logging.getLogger(__name__)

ClassRef = int | str


@dataclass
class Explanation:
    """What ``explain_volume`` returns.

    ``prediction`` is the (D, H, W) label map of the clean stitched prediction; ``importances`` is
    the long format (target, roi, stat, sign, value); ``maps`` (class name → (D, H, W) attribution,
    summed over input channels) only when ``return_maps=True``; ``logits`` the stitched logits
    when ``return_logits=True``. ``method`` is the method's canonical name; ``options`` its
    options, the objective, the window settings, the seed and what was resolved on this input
    (e.g. SmoothGrad's ``sigma_abs``).
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


def resolve_targets(targets: Sequence[ClassRef] | None, names: tuple[str, ...], present: list[int]) -> list[int]:
    """Class ids to explain: the requested ones (names or ids) that are predicted; all present when None."""
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


def model_device_dtype(model: torch.nn.Module, device: torch.device | str | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating dtype the model computes (its first floating parameter or buffer)."""
    dtype = torch.float32
    found = None
    for t in [*model.parameters(), *model.buffers()]:
        found = found or t.device
        if t.is_floating_point():
            dtype = t.dtype
            found = t.device
            break
    return (torch.device(device) if device is not None else found or torch.device("cpu")), dtype


@dataclass
class CleanPrediction:
    """The clean stitched prediction every method starts from, and what it fixes."""

    x: torch.Tensor  # (1, C_in, *S) on the compute device, in the model's dtype
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
    window: SlidingWindow,
    *,
    class_names: Sequence[str] | None = None,
    targets: Sequence[ClassRef] | None = None,
    device: torch.device | str | None = None,
) -> CleanPrediction:
    """Check the image, run MONAI's stitched forward once and resolve names and targets.

    The model must already be in eval mode (see :func:`eval_mode`).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (C_in, D, H, W), got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; fix or exclude the volume")
    t0 = time.perf_counter()
    dev, dtype = model_device_dtype(model, device)
    x = image.to(dev, dtype)[None]
    geometry = window.geometry(x.shape[2:], device=dev, dtype=dtype)
    logits = stitched_forward(model, x, window)[0]
    names = resolve_class_names(logits.shape[0], class_names)
    prediction = logits.max(0).indices  # argmax(0), first maximum on ties; 2.5x faster on CPUs (BENCHMARKS.md)
    classes = resolve_targets(targets, names, torch.unique(prediction).tolist())
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
    method: AttributionMethod,
    *,
    window: SlidingWindow,
    objective: str = "sum",
    seed: int = 0,
    class_chunk: int | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Attribution maps (K, C, *S) of ``classes`` for input ``x`` (1, C_in, *S) over the masks of ``prediction``."""
    problem = Problem(model=model, x=x, geometry=window.geometry(x.shape[2:], device=x.device, dtype=x.dtype),
                      prediction=prediction, classes=tuple(classes), objective=resolve_objective(objective),
                      seed=seed, class_chunk=class_chunk)
    method.check(problem)
    result = method.attribute(problem)
    return result.maps, result.work


@dataclass(frozen=True, kw_only=True)
class Explainer:
    """A method with every setting it runs under, called per volume (as ``SlidingWindowInferer`` is).

    Build it once (``Explainer.from_spec`` from a job's ``[attribution]`` settings, or directly)
    and call :meth:`explain` for each image; the model is passed per call, as to an inferer.
    """

    method: AttributionMethod
    window: SlidingWindow
    objective: Objective = "sum"
    seed: int = 0
    class_chunk: int | None = None
    device: torch.device | str | None = None
    #: HU per model-input unit, when the preprocessing window is known (for recording σ in HU).
    hu_per_unit: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", resolve_objective(self.objective))
        if self.class_chunk is not None and int(self.class_chunk) < 1:
            raise ValueError(f"class_chunk must be at least 1, got {self.class_chunk}")

    @classmethod
    def from_spec(
        cls,
        attribution: Any,
        *,
        roi_size: Sequence[int],
        device: torch.device | str | None = None,
        autocast: torch.dtype | None = None,
        input_range: tuple[float, float] | None = None,
        hu_range: tuple[float, float] | None = None,
    ) -> Explainer:
        """The explainer of a job's ``[attribution]`` settings (an ``engine.jobs.AttributionSpec``).

        ``input_range`` is the model input's declared intensity range ([b_min, b_max] of the
        preprocessing), against which SmoothGrad's σ is defined; ``hu_range`` the HU window
        ([a_min, a_max]) mapped onto it, used only to record σ in HU.
        """
        options = dict(attribution.method_options())
        method = make_method(attribution.method, **options)
        if isinstance(method, SmoothGrad) and input_range is not None and method.input_range is None:
            method = replace(method, input_range=(float(input_range[0]), float(input_range[1])))
        hu_per_unit = None
        if input_range is not None and hu_range is not None:
            hu_per_unit = (float(hu_range[1]) - float(hu_range[0])) / (float(input_range[1]) - float(input_range[0]))
        window = SlidingWindow(roi_size=tuple(roi_size), overlap=attribution.overlap, blend=attribution.blend,
                               window_batch=attribution.window_batch, autocast=autocast, vjp=attribution.vjp,
                               kernels=attribution.kernels)
        return cls(method=method, window=window, objective=attribution.objective, seed=attribution.seed,
                   class_chunk=attribution.class_chunk, device=device, hu_per_unit=hu_per_unit)

    def with_method(self, method: AttributionMethod) -> Explainer:
        return replace(self, method=method)

    def describe(self) -> dict[str, Any]:
        """The settings, JSON-friendly (method options, objective, window, seed; σ when it is fixed)."""
        out: dict[str, Any] = {"method": self.method.name, **self.method.options(), "objective": self.objective,
                               **self.window.describe(), "seed": self.seed}
        if isinstance(self.method, SmoothGrad) and self.method.input_range is not None:
            out.update(self._sigma(self.method.stdev(torch.zeros(1))))
        return out

    def _sigma(self, sigma_abs: float) -> dict[str, float]:
        out = {"sigma_abs": sigma_abs}
        if self.hu_per_unit is not None:
            out["sigma_hu"] = sigma_abs * self.hu_per_unit
        return out

    def smaller(self) -> Explainer | None:
        """The next settings down when a volume does not fit in the device's memory, or None at the
        bottom: vmap-batched VJPs → looped; then half the windows per batch, down to 1; then half the
        classes per chunk (all → 8 → 4 → 2 → 1). Each step changes how much is held at once, never
        what is computed (the maps are equal up to float rounding)."""
        w = self.window
        if w.vjp == "batched":
            return replace(self, window=replace(w, vjp="loop"))
        if w.window_batch > 1:
            return replace(self, window=replace(w, window_batch=max(1, w.window_batch // 2)))
        if self.class_chunk is None:
            return replace(self, class_chunk=8)
        if self.class_chunk > 1:
            return replace(self, class_chunk=self.class_chunk // 2)
        return None

    def explain(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        *,
        targets: Sequence[ClassRef] | None = None,
        class_names: Sequence[str] | None = None,
        rois: RoISet | None = None,
        joined_rois: Mapping[str, Sequence[str]] | None = None,
        partition: torch.Tensor | None = None,
        return_maps: bool = False,
        return_logits: bool = False,
    ) -> Explanation:
        """Explain every (or each requested) predicted class of ``image`` (C_in, D, H, W) and aggregate into RoIs.

        RoIs default to the predicted segments (named like the classes), plus ``joined_rois``
        (e.g. ``{"lung": (five lobes)}``); pass ``rois`` for custom RoIs. ``partition`` (a label
        map) replaces the predicted segments as the features of segment-based perturbation methods.

        When the device runs out of memory (``torch.OutOfMemoryError``: a large volume on a GPU),
        the volume is explained again under :meth:`smaller` settings, step by step, with a warning;
        the settings that ran are in ``Explanation.options`` (``memory_steps`` counts the steps).
        At the bottom the error says what to change.
        """
        explainer, steps = self, 0
        while True:
            if steps:  # outside the except block: its traceback no longer holds the failed attempt's tensors
                _release_memory()
            try:
                out = explainer._explain(model, image, targets=targets, class_names=class_names, rois=rois,
                                         joined_rois=joined_rois, partition=partition, return_maps=return_maps,
                                         return_logits=return_logits)
            except torch.OutOfMemoryError as exc:
                smaller = explainer.smaller()
                if smaller is None:
                    raise torch.OutOfMemoryError(
                        f"the volume {tuple(image.shape)} does not fit in the device's memory even one window and "
                        f"one class at a time (roi_size {tuple(explainer.window.roi_size)}): use autocast = 'bf16', "
                        f"a smaller roi_size, or a device with more memory ({str(exc).splitlines()[0][:200]})"
                    ) from exc
                steps += 1
                log.warning("out of device memory on a volume of shape %s with window_batch=%d, class_chunk=%s, "
                            "vjp=%s; retrying with window_batch=%d, class_chunk=%s, vjp=%s", tuple(image.shape),
                            explainer.window.window_batch, explainer.class_chunk, explainer.window.vjp,
                            smaller.window.window_batch, smaller.class_chunk, smaller.window.vjp)
                explainer = smaller
                continue
            if steps:
                out.options.update(memory_steps=steps, class_chunk=explainer.class_chunk)
            return out

    def _explain(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        *,
        targets: Sequence[ClassRef] | None,
        class_names: Sequence[str] | None,
        rois: RoISet | None,
        joined_rois: Mapping[str, Sequence[str]] | None,
        partition: torch.Tensor | None,
        return_maps: bool,
        return_logits: bool,
    ) -> Explanation:
        with eval_mode(model):
            clean = predict_clean(model, image, self.window, class_names=class_names, targets=targets,
                                  device=self.device)
            timings = {"predict": clean.seconds, "attribute": 0.0, "aggregate": 0.0}
            target_names = [clean.names[c] for c in clean.classes]
            roi_set = clean.rois(rois, joined_rois)
            # Gradient methods attribute and aggregate one chunk of classes after the other, so only
            # one chunk's maps are ever alive (a class's RoI rows depend on its own map alone, so this
            # is exact). Perturbation methods share every forward across classes: one chunk.
            chunked = isinstance(self.method, GradientMethod) and self.class_chunk
            chunk = int(self.class_chunk) if chunked else max(1, len(clean.classes))  # type: ignore[arg-type]
            work: dict[str, int] = {"forwards": clean.geometry.n_windows,
                                    "passes": 0 if isinstance(self.method, GradientMethod) else 1}
            frames, kept, details = [], {}, {}
            for lo in range(0, len(clean.classes), chunk):
                t0 = time.perf_counter()
                problem = Problem(model=model, x=clean.x, geometry=clean.geometry, prediction=clean.prediction,
                                  classes=tuple(clean.classes[lo:lo + chunk]), objective=self.objective,
                                  seed=self.seed, class_chunk=self.class_chunk, clean_logits=clean.logits,
                                  partition=None if partition is None else partition.to(clean.x.device))
                self.method.check(problem)
                result = self.method.attribute(problem)
                # over input channels: (K, *S); a view for one channel, not a second K-map copy
                maps = result.maps[:, 0] if result.maps.shape[1] == 1 else result.maps.sum(dim=1)
                for k, v in result.work.items():
                    work[k] = work.get(k, 0) + v
                details.update(result.details)
                timings["attribute"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                names = target_names[lo:lo + chunk]
                frames.append(aggregate(maps, roi_set, names))
                if return_maps:
                    kept.update({n: maps[i].cpu() for i, n in enumerate(names)})
                del maps, result
                timings["aggregate"] += time.perf_counter() - t0
            importances = pl.concat(frames) if frames else aggregate(
                torch.zeros((0, *clean.prediction.shape), device=clean.x.device), roi_set, [])
            if "sigma_abs" in details:
                details.update(self._sigma(details["sigma_abs"]))
            return Explanation(
                prediction=clean.prediction.cpu(),
                importances=importances,
                class_names=clean.names,
                targets=tuple(target_names),
                method=self.method.name,
                options={**self.describe(), **details},
                maps=kept if return_maps else None,
                logits=clean.logits.cpu() if return_logits else None,
                timings=timings,
                work=work,
            )


def _release_memory() -> None:
    """Free what a failed attempt left (cycles included) and return the caching allocator's free
    blocks to the device, before a retry with smaller settings."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def explain_volume(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    method: str | AttributionMethod = "smoothgrad",
    window: SlidingWindow | Sequence[int],
    objective: str = "sum",
    seed: int = 0,
    class_chunk: int | None = None,
    device: torch.device | str | None = None,
    targets: Sequence[ClassRef] | None = None,
    class_names: Sequence[str] | None = None,
    rois: RoISet | None = None,
    joined_rois: Mapping[str, Sequence[str]] | None = None,
    partition: torch.Tensor | None = None,
    return_maps: bool = False,
    return_logits: bool = False,
    **method_options: Any,
) -> Explanation:
    """One call: ``Explainer(method, window, ...).explain(model, image, ...)``.

    ``model`` maps (B, C_in, *roi_size) to (B, C_out, *roi_size) logits; ``image`` is (C_in, D, H, W).
    ``window`` is a :class:`SlidingWindow` (or just its ``roi_size``); ``method`` a registered name
    (options as keywords, e.g. ``n_samples``, ``sigma``, ``input_range`` for SmoothGrad) or a built
    method. ``targets`` are the classes to explain (None: every predicted class); ``objective``
    the scalar explained for each (:mod:`engine.attribution.objectives`).
    """
    if "target" in method_options:
        raise TypeError("explain_volume's `target` is now `objective` (the scalar explained per class); "
                        "`targets` are the classes")
    if isinstance(method, AttributionMethod):
        if method_options:
            raise TypeError(f"options {sorted(method_options)} go into the method object, not explain_volume")
        built = method
    else:
        built = make_method(method, **method_options)
    sw = window if isinstance(window, SlidingWindow) else SlidingWindow(roi_size=tuple(window))
    explainer = Explainer(method=built, window=sw, objective=objective, seed=seed, class_chunk=class_chunk,  # type: ignore[arg-type]
                          device=device)
    return explainer.explain(model, image, targets=targets, class_names=class_names, rois=rois,
                             joined_rois=joined_rois, partition=partition, return_maps=return_maps,
                             return_logits=return_logits)
