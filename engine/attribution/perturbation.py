"""Perturbation attributions over features (RoIs or cubes): KernelSHAP and occlusion, via captum.

What is explained for class c is the same objective as for the gradient methods (see
:mod:`engine.attribution.objectives`), e.g. ``sum``:

    S_c(x) = Σ_{v∈M_c} Ẑ_c(v; x)

with Ẑ MONAI's stitched sliding-window prediction and M_c the mask of class c in the *clean*
prediction, held fixed while features are perturbed. A perturbed input sets every voxel of the
switched-off features (all input channels) to the baseline, by default the image minimum.

Features (``features=``):

- ``"segments"``: the predicted segments of the clean prediction (one feature per class present),
  or of the label map given as the problem's ``partition``;
- ``"cubes"``: a regular grid of ``cubes`` cubes per axis (default 8, as the paper: 8³ = 512
  features on any volume), or of ``cube_size`` voxels per side when that is given (the last cubes
  cut at the border).

Methods (``captum.attr.FeatureAblation`` and ``captum.attr.KernelShap`` with that feature mask):

- :class:`Occlusion`: φ_f = S_c(x) − S_c(x with feature f at the baseline). captum's
  FeatureAblation takes a forward with K outputs, so one forward per feature serves every class.
- :class:`KernelShap`: captum's KernelShap with ``n_samples`` coalitions (the paper's defaults:
  200 for segments, 1,000 for cubes) drawn from the global torch generator seeded with ``seed``
  (inside ``torch.random.fork_rng``, so the caller's RNG is left alone). The weighted regression
  has F + 1 unknowns, so ``n_samples`` ≤ F is refused (:class:`~engine.attribution.base.SettingsError`).
  KernelShap needs a scalar output, so it is called once per class with the same seed, hence the
  same coalitions; the scores of every class are cached per perturbed input, so each coalition
  costs one stitched forward for all classes together.

From feature attributions to voxel maps (the rule used here; the reference code instead gives every
voxel of a feature the feature's full score): each feature's attribution is spread uniformly over
its voxels, a(v) = φ_f / |f| for v ∈ f, and the voxel map is aggregated with
:func:`engine.aggregate.aggregate` like a gradient map. With ``features="segments"`` and the default
RoIs (the predicted segments), mass_r = |φ_r| / Σ_f |φ_f| and mean_r = φ_r / |r|.

Cost (``work``): ``forwards`` counts window forwards, ``passes`` the distinct stitched forwards
beyond the clean one, ``vjps`` is 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from engine.attribution.base import Attributions, AttributionMethod, Problem, SettingsError
from engine.attribution.objectives import objective_scores, resolve_objective
from engine.attribution.sliding import SlidingWindow, stitched_forward
from engine.labels import resolve_class_names

FEATURE_KINDS: tuple[str, ...] = ("segments", "cubes")
#: The paper's KernelSHAP sample counts.
KERNEL_SHAP_SAMPLES: dict[str, int] = {"segments": 200, "cubes": 1000}


def _per_axis(value: int | Sequence[int], nd: int, what: str) -> tuple[int, ...]:
    out = (int(value),) * nd if isinstance(value, (int, float)) else tuple(int(s) for s in value)
    if len(out) != nd or any(s < 1 for s in out):
        raise ValueError(f"{what} must be a positive int or {nd} positive ints, got {value!r}")
    return out


def feature_mask(
    prediction: torch.Tensor,
    features: str = "segments",
    *,
    cubes: int | Sequence[int] = 8,
    cube_size: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Feature ids (*S) numbered 0..F−1 without gaps, and a name per feature.

    ``segments``: the classes present in ``prediction`` in increasing class order (named like the
    classes); ``cubes``: a grid of ``cubes`` per axis (cube sides ⌈n/cubes⌉), or of ``cube_size``
    voxels when given, in C order (named ``cube_i_j_k``).
    """
    if features == "segments":
        present, inverse = torch.unique(prediction.long(), return_inverse=True)
        names = resolve_class_names(int(present.max()) + 1, class_names) if class_names is None else tuple(class_names)
        return inverse.reshape(prediction.shape), tuple(names[int(c)] for c in present.tolist())
    if features == "cubes":
        nd = prediction.dim()
        if cube_size is not None:
            size = _per_axis(cube_size, nd, "cube_size")
        else:
            size = tuple(math.ceil(n / k) for n, k in zip(prediction.shape, _per_axis(cubes, nd, "cubes")))
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


class CachedScores:
    """Forward for captum: (B, C_in, *S) → (B, K) objective values, one stitched forward per distinct input.

    Results are cached by the input's bytes, so KernelShap's per-class calls (same seed, same
    coalitions) and repeated coalitions cost nothing after the first evaluation. ``known`` seeds
    the cache with inputs already evaluated (the clean input), which are not counted.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        window: SlidingWindow,
        prediction: torch.Tensor,
        classes: Sequence[int],
        *,
        objective: str = "sum",
        known: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> None:
        if resolve_objective(objective) == "legacy":
            raise ValueError("the legacy objective is a gradient convention; perturbation methods take "
                             "'sum', 'mean', 'softmax' or 'probability_weighted'")
        self.model, self.window, self.prediction = model, window, prediction
        self.classes, self.objective = list(classes), objective
        self._cache: dict[bytes, torch.Tensor] = {self._key(x): s for x, s in known}
        self.evaluations = 0

    @staticmethod
    def _key(x: torch.Tensor) -> bytes:
        return hashlib.blake2b(x.detach().contiguous().cpu().numpy().tobytes(), digest_size=20).digest()

    def one(self, x: torch.Tensor) -> torch.Tensor:
        """(K,) scores of one input (1, C_in, *S)."""
        key = self._key(x)
        hit = self._cache.get(key)
        if hit is None:
            logits = stitched_forward(self.model, x, self.window)[0]
            hit = objective_scores(logits, self.prediction, self.classes, self.objective).to(x.dtype)
            self._cache[key] = hit
            self.evaluations += 1
        return hit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.one(x[i:i + 1]) for i in range(x.shape[0])])

    def scalar(self, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Forward of the k-th class alone, (B,): what KernelShap explains."""
        return lambda x: self(x)[:, k]


def baseline_value(image: torch.Tensor, baseline: str | float | None) -> float:
    """The value switched-off features are set to: ``min`` (default), ``zeros``, ``mean`` or a number."""
    if baseline is None or baseline == "min":
        return float(image.min())
    if baseline == "zeros":
        return 0.0
    if baseline == "mean":
        return float(image.mean())
    if isinstance(baseline, str):
        raise ValueError(f"baseline must be 'min', 'zeros', 'mean' or a number, got {baseline!r}")
    return float(baseline)


def spread(attributions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Voxel maps (K, *S): each feature's attribution divided evenly among its voxels."""
    n_features = attributions.shape[1]
    sizes = torch.bincount(mask.reshape(-1), minlength=n_features).clamp_min(1).to(attributions.dtype)
    per_voxel = attributions / sizes
    return per_voxel[:, mask.reshape(-1)].reshape(attributions.shape[0], *mask.shape)


@dataclass(frozen=True, kw_only=True)
class FeatureMethod(AttributionMethod):
    """A perturbation method over features: segments or cubes, switched off to a baseline."""

    family: ClassVar[str] = "perturbation"
    features: str = "segments"
    cubes: int | tuple[int, ...] = 8
    cube_size: int | tuple[int, ...] | None = None
    baseline: str | float | None = "min"

    def __post_init__(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {self.features!r}")
        for name in ("cubes", "cube_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        baseline_value(torch.zeros(1), self.baseline)  # a bad baseline fails here, not per patient

    def check(self, problem: Problem) -> None:
        if problem.class_chunk:
            raise SettingsError(f"class_chunk applies to gradient methods; {self.name} evaluates every class "
                                "from the same forwards, so remove class_chunk")
        if problem.geometry.window.vjp != "auto":
            raise SettingsError(f"vjp = {problem.geometry.window.vjp!r} applies to gradient methods; {self.name} "
                                "takes no VJPs, so leave vjp at 'auto'")

    def mask_of(self, problem: Problem) -> tuple[torch.Tensor, tuple[str, ...]]:
        source = problem.partition if problem.partition is not None else problem.prediction
        return feature_mask(source.to(problem.x.device), self.features, cubes=self.cubes,
                            cube_size=self.cube_size)

    def phis(self, scorer: CachedScores, x: torch.Tensor, mask: torch.Tensor, n_features: int, base: float,
             seed: int) -> torch.Tensor:
        """(K, F) feature attributions."""
        raise NotImplementedError

    def attribute(self, problem: Problem) -> Attributions:
        self.check(problem)
        x, classes = problem.x, list(problem.classes)
        mask, names = self.mask_of(problem)
        base = baseline_value(x, self.baseline)
        known = []
        if problem.clean_logits is not None:
            known.append((x, objective_scores(problem.clean_logits, problem.prediction, classes,
                                              problem.objective).to(x.dtype)))
        scorer = CachedScores(problem.model, problem.geometry.window, problem.prediction, classes,
                              objective=problem.objective, known=known)
        phis = self.phis(scorer, x, mask, len(names), base, problem.seed) if classes else \
            torch.zeros((0, len(names)), device=x.device, dtype=x.dtype)
        maps = spread(phis.to(x.device, x.dtype), mask)[:, None]
        work = {"forwards": scorer.evaluations * problem.geometry.n_windows, "vjps": 0, "passes": scorer.evaluations}
        return Attributions(maps, work, {"n_features": len(names), "baseline_value": base})

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"features": self.features, "baseline": self.baseline}
        if self.features == "cubes":
            if self.cube_size is not None:
                out["cube_size"] = self.cube_size if isinstance(self.cube_size, int) else list(self.cube_size)
            else:
                out["cubes"] = self.cubes if isinstance(self.cubes, int) else list(self.cubes)
        return out


@dataclass(frozen=True, kw_only=True)
class Occlusion(FeatureMethod):
    """Each feature's effect when it alone is switched off (captum's FeatureAblation)."""

    name: ClassVar[str] = "occlusion"
    perturbations_per_eval: int = 1

    def phis(self, scorer: CachedScores, x: torch.Tensor, mask: torch.Tensor, n_features: int, base: float,
             seed: int) -> torch.Tensor:
        from captum.attr import FeatureAblation

        k = len(scorer.classes)
        full_mask = mask.reshape(1, 1, *mask.shape).expand(1, x.shape[1], *mask.shape).contiguous()
        attr = FeatureAblation(scorer).attribute(
            x, baselines=base, feature_mask=full_mask, perturbations_per_eval=self.perturbations_per_eval,
        )  # (K, C_in, *S): φ_f on every voxel of f
        flat = attr.reshape(k, x.shape[1], -1)[:, 0].double()
        ids = mask.reshape(-1)
        sums = torch.zeros((k, n_features), dtype=torch.float64, device=flat.device).index_add_(1, ids, flat)
        sizes = torch.bincount(ids, minlength=n_features).clamp_min(1).double()
        return sums / sizes


@dataclass(frozen=True, kw_only=True)
class KernelShap(FeatureMethod):
    """Shapley values of the features by weighted regression on random coalitions (captum's KernelShap)."""

    name: ClassVar[str] = "kernel_shap"
    n_samples: int | None = None  # None: the paper's 200 (segments) or 1,000 (cubes)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_samples is not None and self.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.n_samples}")
        if self.features == "cubes" and self.cube_size is None:
            n_cubes = math.prod(_per_axis(self.cubes, 3, "cubes")) if not isinstance(self.cubes, int) else self.cubes ** 3
            if self.samples <= n_cubes:
                raise SettingsError(self._underdetermined(n_cubes))

    @property
    def samples(self) -> int:
        return int(self.n_samples) if self.n_samples is not None else KERNEL_SHAP_SAMPLES[self.features]

    def _underdetermined(self, n_features: int) -> str:
        return (f"kernel_shap with {self.samples} samples cannot fit {n_features} {self.features} features "
                f"(it needs more samples than features); raise n_samples above {n_features} "
                "or use fewer features (fewer cubes per axis)")

    def phis(self, scorer: CachedScores, x: torch.Tensor, mask: torch.Tensor, n_features: int, base: float,
             seed: int) -> torch.Tensor:
        from captum.attr import KernelShap as CaptumKernelShap

        if self.samples <= n_features:
            raise SettingsError(self._underdetermined(n_features))
        full_mask = mask.reshape(1, 1, *mask.shape).expand(1, x.shape[1], *mask.shape).contiguous()
        rows = []
        for i in range(len(scorer.classes)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                coefs = CaptumKernelShap(scorer.scalar(i)).attribute(
                    x, baselines=base, feature_mask=full_mask, n_samples=self.samples, return_input_shape=False,
                )
            rows.append(coefs.reshape(-1)[:n_features].double())
        return torch.stack(rows)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "n_samples": self.samples}


__all__ = [
    "FEATURE_KINDS",
    "KERNEL_SHAP_SAMPLES",
    "CachedScores",
    "FeatureMethod",
    "KernelShap",
    "Occlusion",
    "baseline_value",
    "feature_mask",
    "spread",
]
