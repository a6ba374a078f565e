"""The registry: every attribution method by name, with its typed options (the dataclass fields).

``make_method("smoothgrad", n_samples=20)`` builds one; aliases (``ig``, ``vanilla``, ``gradient``)
resolve to the canonical name, which is what results are stored under.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from engine.attribution.base import AttributionMethod
from engine.attribution.gradients import InputXGradient, IntegratedGradients, Saliency, SmoothGrad
from engine.attribution.perturbation import KernelShap, Occlusion

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (Saliency, SmoothGrad, IntegratedGradients, InputXGradient, KernelShap, Occlusion)
}
ALIASES: dict[str, str] = {"vanilla": "saliency", "gradient": "saliency", "ig": "integrated_gradients"}


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (an alias or a name), or a ValueError listing the choices."""
    canonical = ALIASES.get(name, name)
    if canonical not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; choose one of {sorted(METHODS)} "
                         f"(aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())})")
    return canonical


def method_options(name: str) -> tuple[str, ...]:
    """The option names a method takes."""
    return tuple(f.name for f in fields(METHODS[canonical_name(name)]))


def make_method(name: str, **options: Any) -> AttributionMethod:
    """Build a method by name; unknown names and options are ValueErrors that say what exists."""
    cls = METHODS[canonical_name(name)]
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {cls.name!r} takes no option(s) {unknown}; its options are {list(allowed)}")
    return cls(**options)


__all__ = ["ALIASES", "METHODS", "canonical_name", "make_method", "method_options"]
