"""Gradient attributions through sliding-window inference: one class per method.

Each method is a plan of (input, weight) passes plus a final transform, as in captum:

- :class:`Saliency`: ∂S_c/∂x (signed; captum's ``Saliency(abs=False)``).
- :class:`SmoothGrad`: the mean gradient over ``n_samples`` inputs x + ε, ε ~ N(0, σ²), with
  σ = ``sigma`` × the width of the model input's declared intensity range ``input_range`` (the
  preprocessing window after scaling, e.g. [0, 1] for −1024…1024 HU, so σ is the same for every
  scan); without a declared range, the clean input's own range (captum's ``NoiseTunnel(Saliency)``;
  the noise is drawn exactly as captum draws it, from a generator seeded by ``seed``).
- :class:`IntegratedGradients`: (x − x₀) · Σ_i s_i ∂S_c/∂x(x₀ + α_i (x − x₀)), with quadrature
  ``rule`` ``gausslegendre`` (default, NumPy's nodes), ``paper`` (the reference code's N evenly
  spaced α from 0 to 1 inclusive, weights 1/N), ``riemann_left``/``right``/``middle`` or
  ``riemann_trapezoid`` (weights 1/(N−1), halved at both ends, so they sum to 1), and a zero,
  constant or blurred baseline.
- :class:`InputXGradient`: x · ∂S_c/∂x.

All classes are explained together: every pass runs one forward per window batch and one
vector-Jacobian product per class present in it (:func:`engine.attribution.sliding.window_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from monai.transforms import GaussianSmooth

from engine.attribution.base import Attributions, AttributionMethod, Problem
from engine.attribution.objectives import ObjectiveSeeds
from engine.attribution.sliding import window_gradients

#: IG quadrature rules (see :func:`quadrature`).
IG_RULES: tuple[str, ...] = ("gausslegendre", "paper", "riemann_left", "riemann_right", "riemann_middle",
                             "riemann_trapezoid")


def quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(α_i, s_i): points in [0, 1] and weights of an ``n``-point rule for ∫₀¹ f(α) dα (weights sum to 1)."""
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)  # on [−1, 1]
        return (nodes + 1) / 2, weights / 2
    if rule == "paper":
        return np.linspace(0.0, 1.0, n), np.full(n, 1.0 / n)
    if rule == "riemann_left":
        return np.arange(n) / n, np.full(n, 1.0 / n)
    if rule == "riemann_right":
        return np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
    if rule == "riemann_middle":
        return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        w = np.full(n, 1.0 / (n - 1))
        w[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), w
    raise ValueError(f"unknown IG rule {rule!r}; choose one of {', '.join(IG_RULES)}")


@dataclass(frozen=True, kw_only=True)
class GradientMethod(AttributionMethod):
    """A gradient attribution: which inputs to differentiate at, with which weights."""

    name: ClassVar[str] = "gradient"
    family: ClassVar[str] = "gradient"

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        """Inputs (1, C_in, *S) at which to take gradients, with their weights."""
        yield x, 1.0

    def n_passes(self) -> int:
        return 1

    def finalize(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """Turn the weighted gradient sum (K, C_in, *S) into the attribution, in place."""
        return summed

    def details(self, x: torch.Tensor) -> dict[str, Any]:
        """Settings resolved on input ``x`` (recorded with the explanation)."""
        return {}

    def attribute(self, problem: Problem) -> Attributions:
        """Maps (K, C_in, *S) of ``problem.classes``.

        ``class_chunk`` bounds how many class maps are accumulated at once (each chunk repeats the
        forwards); the noise of every chunk is the same, since the generator restarts from ``seed``.
        """
        x, classes = problem.x, list(problem.classes)
        seeds = ObjectiveSeeds(problem.objective, problem.prediction, problem.geometry, model=problem.model)
        chunk = len(classes) if not problem.class_chunk else max(1, int(problem.class_chunk))
        out = torch.zeros((len(classes), x.shape[1], *x.shape[2:]), device=x.device, dtype=x.dtype)
        work = {"forwards": 0, "vjps": 0, "passes": 0}
        for lo in range(0, len(classes), chunk):
            part = classes[lo:lo + chunk]
            generator = torch.Generator(device=x.device).manual_seed(int(problem.seed))
            acc = out[lo:lo + chunk]
            for xi, weight in self.passes(x, generator=generator):
                _, counters = window_gradients(
                    problem.model, xi, problem.geometry, part, seeds.seed_fn(xi), out=acc, scale=weight,
                )
                work["forwards"] += counters["forwards"]
                work["vjps"] += counters["vjps"]
                work["passes"] += 1
        self.finalize(x, out)
        return Attributions(out, work, self.details(x))


@dataclass(frozen=True, kw_only=True)
class Saliency(GradientMethod):
    """The plain (vanilla) gradient."""

    name: ClassVar[str] = "saliency"


@dataclass(frozen=True, kw_only=True)
class InputXGradient(GradientMethod):
    """Input times gradient."""

    name: ClassVar[str] = "input_x_gradient"

    def finalize(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        return summed.mul_(x[0])


@dataclass(frozen=True, kw_only=True)
class SmoothGrad(GradientMethod):
    """Mean gradient over Gaussian-perturbed inputs (Smilkov et al., 2017).

    ``sigma`` is a fraction of ``input_range`` (lo, hi), the model input's declared intensity range;
    with ``input_range=None`` the clean input's own range is used (pin it with :meth:`pinned_to`
    when the same σ must serve perturbed copies of the input).
    """

    name: ClassVar[str] = "smoothgrad"
    n_samples: int = 20
    sigma: float = 0.1
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.n_samples}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0 (a fraction of the intensity range), got {self.sigma}")
        if self.input_range is not None:
            lo, hi = (float(v) for v in self.input_range)
            if not hi > lo:
                raise ValueError(f"input_range must be (low, high) with high > low, got {self.input_range}")
            object.__setattr__(self, "input_range", (lo, hi))

    def stdev(self, x: torch.Tensor) -> float:
        """σ in input units: ``sigma`` × the width of ``input_range`` (or of ``x``'s own range)."""
        if self.input_range is not None:
            return float(self.sigma * (self.input_range[1] - self.input_range[0]))
        return float(self.sigma * (x.max() - x.min()))

    def pinned_to(self, x: torch.Tensor) -> SmoothGrad:
        """The same method with σ fixed from ``x`` (a no-op when a range is declared)."""
        if self.input_range is not None:
            return self
        return SmoothGrad(n_samples=self.n_samples, sigma=self.sigma,
                          input_range=(float(x.min()), float(x.max())))

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        std = torch.full_like(x, self.stdev(x))
        for _ in range(self.n_samples):
            yield x + torch.normal(0.0, std, generator=generator), 1.0 / self.n_samples

    def n_passes(self) -> int:
        return self.n_samples

    def details(self, x: torch.Tensor) -> dict[str, Any]:
        return {"sigma_abs": self.stdev(x)}

    def options(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "sigma": self.sigma,
                "input_range": None if self.input_range is None else list(self.input_range)}


@dataclass(frozen=True, kw_only=True)
class IntegratedGradients(GradientMethod):
    """Path integral of gradients from a baseline (Sundararajan et al., 2017)."""

    name: ClassVar[str] = "integrated_gradients"
    steps: int = 20
    baseline: str | float = "zeros"
    rule: str = "gausslegendre"
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if isinstance(self.baseline, str) and self.baseline not in ("zeros", "blur"):
            raise ValueError(f"baseline must be 'zeros', 'blur' or an intensity value, got {self.baseline!r}")
        quadrature(self.rule, self.steps)  # unknown rules and a 1-step trapezoid fail here

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        if self.baseline == "blur":
            return GaussianSmooth(sigma=self.blur_sigma)(x[0]).as_tensor()[None].to(x)  # type: ignore[union-attr]
        return torch.full_like(x, float(self.baseline))

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        alphas, weights = quadrature(self.rule, self.steps)
        x0 = self.baseline_of(x)
        for alpha, weight in zip(alphas.tolist(), weights.tolist()):
            yield x0 + alpha * (x - x0), float(weight)

    def n_passes(self) -> int:
        return self.steps

    def finalize(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        return summed.mul_((x - self.baseline_of(x))[0])

    def options(self) -> dict[str, Any]:
        return {"steps": self.steps, "baseline": self.baseline, "rule": self.rule}
