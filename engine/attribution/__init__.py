"""Attribution through sliding-window inference: exact seeds, all classes together.

Layout: ``sliding`` (:class:`SlidingWindow` settings, window geometry, stitched forward, per-window
VJPs), ``objectives`` (the scalar explained for class c), ``base`` (the contract every method
follows), ``gradients`` (vanilla, SmoothGrad, IG, Input×Gradient), ``perturbation`` (KernelSHAP and
occlusion over segments or cubes, via captum), ``methods`` (the registry), ``explain``
(:class:`Explainer`, ``explain_volume``).
"""

from engine.attribution.base import Attributions, AttributionMethod, Problem, SettingsError
from engine.attribution.explain import Explainer, Explanation, compute_maps, explain_volume
from engine.attribution.gradients import (
    GradientMethod,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from engine.attribution.methods import ALIASES, METHODS, canonical_name, make_method
from engine.attribution.objectives import OBJECTIVES, resolve_objective
from engine.attribution.perturbation import KernelShap, Occlusion
from engine.attribution.sliding import SlidingWindow
from engine.attribution import nnunet_windows  # noqa: F401, E402 - registers nnU-Net's window layout

__all__ = [
    "ALIASES",
    "METHODS",
    "OBJECTIVES",
    "AttributionMethod",
    "Attributions",
    "Explainer",
    "Explanation",
    "GradientMethod",
    "InputXGradient",
    "IntegratedGradients",
    "KernelShap",
    "Occlusion",
    "Problem",
    "Saliency",
    "SettingsError",
    "SlidingWindow",
    "SmoothGrad",
    "canonical_name",
    "compute_maps",
    "explain_volume",
    "make_method",
    "resolve_objective",
]
