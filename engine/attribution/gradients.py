"""Gradient attributions through sliding-window inference: one class per method.

Each method is a plan of (input, weight) passes plus a final transform, as in captum:

- :class:`Saliency`: ∂S_c/∂x (signed; captum's ``Saliency(abs=False)``).
- :class:`SmoothGrad`: the mean gradient over ``n_samples`` inputs x + ε, ε ~ N(0, σ²), with σ given
  as a fraction of the input's intensity range (captum's ``NoiseTunnel(Saliency)``; the noise is
  drawn exactly as captum draws it, from a generator seeded by ``seed``).
- :class:`IntegratedGradients`: (x − x₀) · Σ_i s_i ∂S_c/∂x(x₀ + α_i (x − x₀)), with captum's
  quadrature rules (``gausslegendre`` by default) and a zero, constant or blurred baseline.
- :class:`InputXGradient`: x · ∂S_c/∂x.

All classes are explained together: every pass runs one forward per window batch and one
vector-Jacobian product per class present in it (:func:`engine.attribution.sliding.window_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from monai.transforms import GaussianSmooth


@dataclass(frozen=True, kw_only=True)
class GradientMethod:
    """A gradient attribution: which inputs to differentiate at, with which weights."""

    name: ClassVar[str] = "gradient"

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        """Inputs (1, C_in, *S) at which to take gradients, with their weights."""
        yield x, 1.0

    def n_passes(self) -> int:
        return 1

    def finalize(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """Turn the weighted gradient sum (K, C_in, *S) into the attribution, in place."""
        return summed

    def options(self) -> dict[str, object]:
        return {}


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
    """Mean gradient over Gaussian-perturbed inputs (Smilkov et al., 2017)."""

    name: ClassVar[str] = "smoothgrad"
    n_samples: int = 20
    sigma: float = 0.1

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.n_samples}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0 (a fraction of the intensity range), got {self.sigma}")

    def stdev(self, x: torch.Tensor) -> float:
        """σ in intensity units: ``sigma`` times the input's intensity range."""
        return float(self.sigma * (x.max() - x.min()))

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        std = torch.full_like(x, self.stdev(x))
        for _ in range(self.n_samples):
            yield x + torch.normal(0.0, std, generator=generator), 1.0 / self.n_samples

    def n_passes(self) -> int:
        return self.n_samples

    def options(self) -> dict[str, object]:
        return {"n_samples": self.n_samples, "sigma": self.sigma}


@dataclass(frozen=True, kw_only=True)
class IntegratedGradients(GradientMethod):
    """Path integral of gradients from a baseline (Sundararajan et al., 2017)."""

    name: ClassVar[str] = "integrated_gradients"
    steps: int = 20
    baseline: str | float = "zeros"
    method: str = "gausslegendre"
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if isinstance(self.baseline, str) and self.baseline not in ("zeros", "blur"):
            raise ValueError(f"baseline must be 'zeros', 'blur' or an intensity value, got {self.baseline!r}")

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        if self.baseline == "blur":
            return GaussianSmooth(sigma=self.blur_sigma)(x[0]).as_tensor()[None].to(x)  # type: ignore[union-attr]
        return torch.full_like(x, float(self.baseline))

    def passes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float]]:
        step_sizes_fn, alphas_fn = approximation_parameters(self.method)
        x0 = self.baseline_of(x)
        for step, alpha in zip(step_sizes_fn(self.steps), alphas_fn(self.steps)):
            yield x0 + alpha * (x - x0), float(step)

    def n_passes(self) -> int:
        return self.steps

    def finalize(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        return summed.mul_((x - self.baseline_of(x))[0])

    def options(self) -> dict[str, object]:
        return {"steps": self.steps, "baseline": self.baseline, "method": self.method}


GRADIENT_METHODS: dict[str, type[GradientMethod]] = {
    "saliency": Saliency,
    "vanilla": Saliency,
    "gradient": Saliency,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "ig": IntegratedGradients,
    "input_x_gradient": InputXGradient,
}


def gradient_method(name: str, **options: object) -> GradientMethod:
    """Build a gradient method by name, with a clear error for unknown names or options."""
    try:
        cls = GRADIENT_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown attribution method {name!r}; gradient methods are {sorted(set(GRADIENT_METHODS))}"
        ) from None
    try:
        return cls(**options)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"bad options for method {name!r}: {exc}") from None
