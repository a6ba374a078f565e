"""The contract every attribution method follows, gradient or perturbation (as Captum's ``Attribution``).

A method is a frozen dataclass of its options with one call, :meth:`AttributionMethod.attribute`,
that takes a :class:`Problem` (the model, the input, the window geometry, the clean prediction
whose masks M_c are explained, the classes, the objective, the seed) and returns
:class:`Attributions`: one map per class and the work done. Everything before (the clean
prediction) and after (aggregation into RoIs) is the same for every method and lives in
:mod:`engine.attribution.explain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from engine.attribution.objectives import Objective
from engine.attribution.sliding import WindowGeometry
from engine.errors import UserError


class SettingsError(UserError, ValueError):
    """An attribution setting that cannot work as written (the message says what to change)."""


@dataclass(frozen=True)
class Problem:
    """What a method explains: classes ``classes`` of ``model`` at input ``x``, over fixed masks.

    ``x`` is (1, C_in, *S) on the compute device in the model's dtype; ``prediction`` (*S) is the
    clean label map whose masks M_c the objective uses (and whose segments are the features of
    segment-based perturbation methods unless ``partition`` gives another label map);
    ``clean_logits`` (C, *S) the stitched logits of ``x`` when already computed.
    """

    model: torch.nn.Module
    x: torch.Tensor
    geometry: WindowGeometry
    prediction: torch.Tensor
    classes: tuple[int, ...]
    objective: Objective = "sum"
    seed: int = 0
    class_chunk: int | None = None
    clean_logits: torch.Tensor | None = None
    partition: torch.Tensor | None = None


@dataclass
class Attributions:
    """A method's output: ``maps`` (K, C, *S) for the K classes, C = input channels for gradient
    methods or 1 for feature methods (a feature covers every channel); ``work`` counts window
    forwards, VJPs and stitched passes beyond the clean prediction; ``details`` holds settings
    resolved on this input (σ in input units, the number of features, ...)."""

    maps: torch.Tensor
    work: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AttributionMethod:
    """Base of every method: options as fields, ``attribute`` as the one call."""

    name: ClassVar[str] = "method"
    #: "gradient" (VJPs through the windows) or "perturbation" (stitched forwards only)
    family: ClassVar[str] = "gradient"

    def attribute(self, problem: Problem) -> Attributions:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, JSON-friendly, as stored with its results."""
        return {}

    def check(self, problem: Problem) -> None:
        """Refuse settings this method cannot honour (instead of silently ignoring them)."""
