"""Attribution through sliding-window inference: exact seeds, all classes together.

Layout: ``sliding`` (window geometry, stitched forward, per-window VJPs), ``targets`` (what is
explained for class c), ``gradients`` (vanilla, SmoothGrad, IG, Input×Gradient), ``perturbation``
(KernelSHAP and occlusion over RoIs, via captum), ``explain`` (``explain_volume``).
"""

from engine.attribution.explain import Explanation, compute_maps, explain_volume
from engine.attribution.gradients import (
    GradientMethod,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    gradient_method,
)
from engine.attribution.targets import TARGET_KINDS

__all__ = [
    "TARGET_KINDS",
    "Explanation",
    "GradientMethod",
    "InputXGradient",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "compute_maps",
    "explain_volume",
    "gradient_method",
]
