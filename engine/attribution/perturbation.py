"""Perturbation attributions over features (RoIs or cubes): KernelSHAP and occlusion, via captum.

What is explained for class c is the same scalar as for the gradient methods,

    S_c(x) = Σ_{v∈M_c} Ẑ_c(v; x)        (``target="sum"``; ``"mean"`` divides by |M_c|,
                                          ``"probability"`` sums softmax(Ẑ)_c over M_c)

with Ẑ MONAI's stitched sliding-window prediction and M_c the mask of class c in the *clean*
prediction, held fixed while features are perturbed. A perturbed input sets every voxel of the
switched-off features (all input channels) to the baseline, by default the image minimum.

Features (``features=``):

- ``"segments"``: the predicted segments of the clean prediction (one feature per class present);
- ``"cubes"``: a regular grid of ``cube_size``³-voxel cubes (the last ones cut at the border).

Methods (``captum.attr.FeatureAblation`` and ``captum.attr.KernelShap`` with that feature mask):

- ``occlusion``: φ_f = S_c(x) − S_c(x with feature f at the baseline). captum's FeatureAblation takes
  a forward with K outputs, so one forward per feature serves every target class.
- ``kernel_shap``: captum's KernelShap with ``n_samples`` coalitions drawn from the global torch
  generator seeded with ``seed`` (inside ``torch.random.fork_rng``, so the caller's RNG is left
  alone). KernelShap needs a scalar output, so it is called once per class with the same seed,
  hence the same coalitions; the forward outputs of every class are cached per perturbed input,
  so each coalition costs one stitched forward for all classes together.

From feature attributions to RoI importances (the rule used here): each feature's attribution is
spread uniformly over its voxels, a(v) = φ_f / |f| for v ∈ f, and the voxel map is aggregated with
:func:`engine.aggregate.aggregate` like a gradient map. With ``features="segments"`` and the default
RoIs (the predicted segments), mass_r = |φ_r| / Σ_f |φ_f| and mean_r = φ_r / |r|.

Cost (``Explanation.work``): ``forwards`` counts window forwards (as for the gradient methods),
``passes`` the distinct stitched forwards (clean input included), ``vjps`` is 0.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from engine.aggregate import RoISet, aggregate
from engine.attribution.explain import Explanation, _device_of, eval_mode, predict_clean
from engine.attribution.sliding import BlendMode, WindowGeometry, stitched_forward
from engine.attribution.targets import resolve_target_kind
from engine.labels import resolve_class_names

PERTURBATION_METHODS: tuple[str, ...] = ("kernel_shap", "occlusion")
FEATURE_KINDS: tuple[str, ...] = ("segments", "cubes")


def feature_mask(
    prediction: torch.Tensor,
    features: str = "segments",
    *,
    cube_size: int | Sequence[int] = 8,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Feature ids (*S) numbered 0..F−1 without gaps, and a name per feature.

    ``segments``: the classes present in ``prediction`` in increasing class order (named like the
    classes); ``cubes``: a grid of ``cube_size`` cubes in C order (named ``cube_i_j_k``).
    """
    if features == "segments":
        present, inverse = torch.unique(prediction.long(), return_inverse=True)
        names = resolve_class_names(int(present.max()) + 1, class_names) if class_names is None else tuple(class_names)
        return inverse.reshape(prediction.shape), tuple(names[int(c)] for c in present.tolist())
    if features == "cubes":
        nd = prediction.dim()
        size = (int(cube_size),) * nd if isinstance(cube_size, (int, float)) else tuple(int(s) for s in cube_size)
        if len(size) != nd or any(s < 1 for s in size):
            raise ValueError(f"cube_size must be a positive int or {nd} positive ints, got {cube_size!r}")
        counts = [math.ceil(n / s) for n, s in zip(prediction.shape, size)]
        ids = torch.zeros(prediction.shape, dtype=torch.long, device=prediction.device)
        for d in range(nd):
            cell = torch.arange(prediction.shape[d], device=prediction.device) // size[d]
            shape = [1] * nd
            shape[d] = -1
            ids = ids * counts[d] + cell.reshape(shape)
        grid = torch.cartesian_prod(*[torch.arange(c) for c in counts]).reshape(-1, nd) if nd > 1 else \
            torch.arange(counts[0])[:, None]
        return ids, tuple("cube_" + "_".join(str(int(i)) for i in row) for row in grid.tolist())
    raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")


def class_scores(
    logits: torch.Tensor, masks_from: torch.Tensor, classes: Sequence[int], kind: str = "sum"
) -> torch.Tensor:
    """(K,) scores S_c of stitched ``logits`` (C, *S) over the masks M_c = {``masks_from`` == c}."""
    kind = resolve_target_kind(kind)
    pred = masks_from.reshape(-1).long()
    values = torch.softmax(logits, 0) if kind == "probability" else logits
    flat = values.reshape(values.shape[0], -1)
    picked = flat.gather(0, pred[None])[0].double()
    sums = torch.bincount(pred, weights=picked, minlength=values.shape[0])
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=sums.device)
    out = sums[idx]
    if kind == "mean":
        out = out / torch.bincount(pred, minlength=values.shape[0])[idx].clamp_min(1).double()
    return out.float()


class CachedScores:
    """Forward for captum: (B, C_in, *S) → (B, K) target scores, one stitched forward per distinct input.

    Results are cached by the input's bytes, so KernelShap's per-class calls (same seed, same
    coalitions) and repeated coalitions cost nothing after the first evaluation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        geometry: WindowGeometry,
        prediction: torch.Tensor,
        classes: Sequence[int],
        *,
        kind: str = "sum",
        blend: BlendMode = "constant",
        overlap: float = 0.25,
        window_batch: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if resolve_target_kind(kind) == "legacy":
            raise ValueError("the legacy target is a gradient convention; perturbation methods take "
                             "'sum', 'mean' or 'probability'")
        self.model, self.geometry, self.prediction = model, geometry, prediction
        self.classes, self.kind = list(classes), kind
        self.blend, self.overlap, self.window_batch, self.autocast = blend, overlap, window_batch, autocast_dtype
        self._cache: dict[bytes, torch.Tensor] = {}
        self.evaluations = 0

    def _key(self, x: torch.Tensor) -> bytes:
        return hashlib.blake2b(x.detach().contiguous().cpu().numpy().tobytes(), digest_size=20).digest()

    def one(self, x: torch.Tensor) -> torch.Tensor:
        """(K,) scores of one input (1, C_in, *S)."""
        key = self._key(x)
        hit = self._cache.get(key)
        if hit is None:
            logits = stitched_forward(
                self.model, x, self.geometry, blend=self.blend, overlap=self.overlap,
                window_batch=self.window_batch, autocast_dtype=self.autocast,
            )[0]
            hit = class_scores(logits, self.prediction, self.classes, self.kind)
            self._cache[key] = hit
            self.evaluations += 1
        return hit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.one(x[i:i + 1]) for i in range(x.shape[0])])

    def scalar(self, k: int) -> Any:
        """Forward of the k-th target alone, (B,) — what KernelShap explains."""
        return lambda x: self(x)[:, k]


def _baseline_value(image: torch.Tensor, baseline: str | float | None) -> float:
    if baseline is None or baseline == "min":
        return float(image.min())
    if baseline == "zeros":
        return 0.0
    if baseline == "mean":
        return float(image.mean())
    if isinstance(baseline, str):
        raise ValueError(f"baseline must be 'min', 'zeros', 'mean' or a number, got {baseline!r}")
    return float(baseline)


def feature_attributions(
    scorer: CachedScores,
    x: torch.Tensor,
    mask: torch.Tensor,
    n_features: int,
    *,
    method: str,
    baseline: float,
    n_samples: int = 50,
    seed: int = 0,
    perturbations_per_eval: int = 1,
) -> torch.Tensor:
    """(K, F) attributions of the F features for the K target classes of ``scorer``."""
    from captum.attr import FeatureAblation, KernelShap

    k = len(scorer.classes)
    full_mask = mask.reshape(1, 1, *mask.shape).expand(1, x.shape[1], *mask.shape).contiguous()
    if method == "occlusion":
        attr = FeatureAblation(scorer).attribute(
            x, baselines=baseline, feature_mask=full_mask, perturbations_per_eval=perturbations_per_eval,
        )  # (K, C_in, *S): φ_f on every voxel of f
        flat = attr.reshape(k, x.shape[1], -1)[:, 0].double()
        ids = mask.reshape(-1)
        sums = torch.zeros((k, n_features), dtype=torch.float64, device=flat.device).index_add_(1, ids, flat)
        sizes = torch.bincount(ids, minlength=n_features).clamp_min(1).double()
        return (sums / sizes).float()
    if method == "kernel_shap":
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        rows = []
        for i in range(k):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                coefs = KernelShap(scorer.scalar(i)).attribute(
                    x, baselines=baseline, feature_mask=full_mask, n_samples=int(n_samples),
                    return_input_shape=False,
                )
            rows.append(coefs.reshape(-1)[:n_features].float())
        return torch.stack(rows) if rows else torch.zeros((0, n_features))
    raise ValueError(f"unknown perturbation method {method!r}; choose one of {PERTURBATION_METHODS}")


def spread(attributions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Voxel maps (K, *S): each feature's attribution divided evenly among its voxels."""
    n_features = attributions.shape[1]
    sizes = torch.bincount(mask.reshape(-1), minlength=n_features).clamp_min(1).to(attributions.dtype)
    per_voxel = attributions / sizes
    return per_voxel[:, mask.reshape(-1)].reshape(attributions.shape[0], *mask.shape)


def explain_volume_perturbation(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    method: str,
    targets: Sequence[int | str] | None = None,
    class_names: Sequence[str] | None = None,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    blend: BlendMode = "constant",
    seed: int = 0,
    device: torch.device | str | None = None,
    target: str = "sum",
    rois: RoISet | None = None,
    joined_rois: Mapping[str, Sequence[str]] | None = None,
    window_batch: int = 1,
    n_samples: int = 50,
    features: str = "segments",
    cube_size: int | Sequence[int] = 8,
    baseline: str | float | None = None,
    perturbations_per_eval: int = 1,
    return_maps: bool = False,
    return_logits: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Explanation:
    """KernelSHAP or occlusion of one volume (C_in, D, H, W), aggregated into RoIs.

    Same contract as :func:`engine.attribution.explain_volume`; the extra options are ``n_samples``
    (KernelSHAP coalitions), ``features`` (``segments`` or ``cubes``), ``cube_size`` (voxels),
    ``baseline`` (``None``/``'min'``: the image minimum; ``'zeros'``, ``'mean'`` or a number) and
    ``perturbations_per_eval`` (occlusion batch). ``maps`` hold the spread voxel maps.
    """
    if method not in PERTURBATION_METHODS:
        raise ValueError(f"unknown perturbation method {method!r}; choose one of {PERTURBATION_METHODS}")
    resolve_target_kind(target)
    if features not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
    dev = _device_of(model, device)
    with eval_mode(model):
        clean = predict_clean(
            model, image, roi_size=roi_size, overlap=overlap, blend=blend, window_batch=window_batch,
            autocast_dtype=autocast_dtype, class_names=class_names, targets=targets, device=dev,
        )
        x, geometry, logits, names = clean.x, clean.geometry, clean.logits, clean.names
        prediction, classes = clean.prediction, clean.classes
        timings: dict[str, float] = {"predict": clean.seconds}
        t0 = time.perf_counter()
        mask, feature_names = feature_mask(prediction, features, cube_size=cube_size, class_names=names)
        base = _baseline_value(x, baseline)
        scorer = CachedScores(model, geometry, prediction, classes, kind=target, blend=blend, overlap=overlap,
                              window_batch=window_batch, autocast_dtype=autocast_dtype)
        scorer._cache[scorer._key(x)] = class_scores(logits, prediction, classes, target)  # the clean forward
        scorer.evaluations = 1
        phis = feature_attributions(
            scorer, x, mask, len(feature_names), method=method, baseline=base, n_samples=n_samples, seed=seed,
            perturbations_per_eval=perturbations_per_eval,
        ) if classes else torch.zeros((0, len(feature_names)), device=dev)
        maps = spread(phis.to(dev), mask)
        timings["attribute"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        target_names = [names[c] for c in classes]
        importances = aggregate(maps, clean.rois(rois, joined_rois), target_names)
        timings["aggregate"] = time.perf_counter() - t0
        options: dict[str, Any] = {
            "features": features, "n_features": len(feature_names), "baseline": base,
            "target": target, "blend": blend, "overlap": overlap, "roi_size": list(roi_size), "seed": seed,
        }
        if method == "kernel_shap":
            options["n_samples"] = int(n_samples)
        if features == "cubes":
            options["cube_size"] = cube_size if isinstance(cube_size, int) else list(cube_size)
        return Explanation(
            prediction=prediction.cpu(),
            importances=importances,
            class_names=names,
            targets=tuple(target_names),
            method=method,
            options=options,
            maps={n: maps[i].cpu() for i, n in enumerate(target_names)} if return_maps else None,
            logits=logits.cpu() if return_logits else None,
            timings=timings,
            work={"forwards": scorer.evaluations * geometry.n_windows, "vjps": 0, "passes": scorer.evaluations},
        )


__all__ = [
    "FEATURE_KINDS",
    "PERTURBATION_METHODS",
    "CachedScores",
    "class_scores",
    "explain_volume_perturbation",
    "feature_attributions",
    "feature_mask",
    "spread",
]
