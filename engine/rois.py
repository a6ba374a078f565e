"""Regions of interest: which voxels each attribution is aggregated over.

A RoI set is one :class:`engine.aggregate.RoISet`: a label map whose value ``i`` means
``names[i]`` (RoIs are disjoint; ``background`` is index 0 for sets built here) plus ``joined``
RoIs, unions of parts that may overlap them (e.g. ``lung`` beside its five lobes), which the
aggregation computes from the same single scatter pass.

:func:`build_rois` turns a :class:`RoISpec` (the ``[rois]`` table: predicted segments, the
case's label map, or a custom mask, optionally renamed with a label id -> name mapping such as
TotalSegmentator -> thorax, plus joined RoIs) into that set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Strict

from engine.aggregate import RoISet
from engine.errors import JobSpecError, VolumeError
from engine.labels import JOINED_ROIS, THORAX_CLASSES, read_names_file, totalsegmentator_to_thorax
from engine.settings import parse, section
from engine.volumes import Case


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Read label names from JSON: a list (index = id) or an object ``{id: name}``."""
    try:
        return read_names_file(path)
    except ValueError as exc:
        raise JobSpecError(f"label names file {exc}") from None


@section("rois")
class RoISpec:
    """Which RoIs attributions are aggregated over.

    ``source``: ``"prediction"`` (the model's predicted segments, default), ``"label"`` (the
    case's label map) or the name of a custom RoI mask (manifest column ``roi_<name>``).
    ``label_names``: label id -> RoI name for label/mask sources (a table, a list indexed by id,
    or a JSON file); default: the model's class names for ``"label"``, ``{1: <mask name>}`` for a mask.
    ``preset``: ``"totalsegmentator_thorax"`` maps TotalSegmentator ``total`` ids (named by
    ``label_names``) onto the thorax classes with ``engine.labels.totalsegmentator_to_thorax``.
    ``joined``: extra, overlapping RoIs: names from ``engine.labels.JOINED_ROIS`` or
    ``{name: [parts...]}``.
    """

    source: str = "prediction"
    label_names: dict[Annotated[int, Strict(False)], str] | tuple[str, ...] | str | None = None
    preset: str | None = None
    joined: tuple[str, ...] | dict[str, tuple[str, ...]] | str = ()

    PRESETS: ClassVar[tuple[str, ...]] = ("totalsegmentator_thorax",)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in self.PRESETS:
            raise JobSpecError(f"[rois] preset {self.preset!r} unknown; known: {', '.join(self.PRESETS)}")
        if isinstance(self.label_names, tuple):
            object.__setattr__(self, "label_names", dict(enumerate(self.label_names)))
        if not isinstance(self.joined, Mapping):
            joined = (self.joined,) if isinstance(self.joined, str) else tuple(self.joined)
            unknown = [j for j in joined if j not in JOINED_ROIS]
            if unknown:
                raise JobSpecError(f"[rois] joined RoI(s) {unknown} unknown; known: {', '.join(JOINED_ROIS)} "
                                   "(or give a table name = [parts])")
            object.__setattr__(self, "joined", joined)
        if not self.source:
            raise JobSpecError("[rois] source must be 'prediction', 'label' or a custom RoI name")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | RoISpec | None, *, base_dir: str | os.PathLike | None = None) -> RoISpec:
        """From a job-spec table (or a spec); a relative ``label_names`` file resolves against ``base_dir``."""
        spec = d if isinstance(d, RoISpec) else parse(cls, d)
        names = spec.label_names
        if isinstance(names, str) and base_dir is not None and not Path(names).is_absolute():
            spec = replace(spec, label_names=str(Path(base_dir) / names))
        return spec

    def joined_parts(self) -> dict[str, tuple[str, ...]]:
        """Joined RoIs as ``{name: parts}``."""
        if isinstance(self.joined, Mapping):
            return {str(k): tuple(v) for k, v in self.joined.items()}
        return {j: JOINED_ROIS[j] for j in self.joined}


def rois_from_prediction(prediction: torch.Tensor, class_names: Sequence[str]) -> RoISet:
    """Predicted segments: argmax of logits ``(C, X, Y, Z)`` (or an int map ``(X, Y, Z)``)."""
    names = tuple(class_names)
    if prediction.is_floating_point():
        if prediction.ndim != 4 or prediction.shape[0] != len(names):
            raise ValueError(f"prediction {tuple(prediction.shape)} does not have one channel per class ({len(names)})")
        labels = prediction.argmax(0)
    else:
        labels = prediction
    return RoISet(labels.to(torch.int64), names)


def rois_from_label_map(
    label_map: torch.Tensor,
    id_to_name: Mapping[int, str],
    *,
    names: Sequence[str] | None = None,
    background: str = "background",
) -> RoISet:
    """Rename a user label map into a RoI set; several ids may share a name.

    Ids not in ``id_to_name`` (and id 0 unless mapped) become ``background`` (index 0).
    ``names`` fixes the output order (it must contain ``background`` and every mapped
    name); by default: background, then names in order of their smallest id.
    """
    mapped = {int(k): str(v) for k, v in id_to_name.items() if str(v) != background}
    if names is None:
        order: list[str] = [background]
        for _, n in sorted(mapped.items()):
            if n not in order:
                order.append(n)
        names = order
    names = tuple(names)
    if not names or names[0] != background:
        names = (background, *[n for n in names if n != background])
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({n for n in mapped.values() if n not in index})
    if missing:
        raise JobSpecError(f"RoI names {missing} are mapped from label ids but not in the RoI list {list(names)}")
    lm = label_map.to(torch.int64)
    max_id = int(max(int(lm.max()) if lm.numel() else 0, max(mapped, default=0)))
    lut = torch.zeros(max_id + 1, dtype=torch.int64)
    for i, n in mapped.items():
        if i >= 0:
            lut[i] = index[n]
    return RoISet(lut[lm.clamp(min=0)], names)


def build_rois(
    spec: RoISpec,
    *,
    case: Case,
    class_names: Sequence[str],
    prediction: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> RoISet:
    """The RoI set of one case (on ``device`` when given), with the joined RoIs ``spec`` asks for."""
    if spec.source == "prediction":
        if prediction is None:
            raise ValueError("build_rois: source 'prediction' needs the model's prediction")
        rois = rois_from_prediction(prediction, class_names)
    else:
        if spec.source == "label":
            lm, what = case.label, "label map (label_path)"
            default = dict(enumerate(class_names))
        else:
            lm, what = case.rois.get(spec.source), f"RoI mask column roi_{spec.source}"
            default = {1: spec.source}
        if lm is None:
            raise VolumeError(f"patient {case.patient_id}: RoIs come from {spec.source!r} but the case has no "
                              f"{what}; add it to the manifest or use source = 'prediction'")
        names_map = (read_label_names(spec.label_names) if isinstance(spec.label_names, str)
                     else dict(spec.label_names) if spec.label_names is not None else default)
        order = None
        if spec.preset == "totalsegmentator_thorax":
            names_map = totalsegmentator_to_thorax(names_map)
            order = THORAX_CLASSES
        elif spec.source == "label" and spec.label_names is None:
            order = tuple(class_names)
        rois = rois_from_label_map(lm, names_map, names=order)
    joined = spec.joined_parts()
    for name, parts in joined.items():
        missing = [p for p in parts if p not in rois.names]
        if missing:
            raise JobSpecError(f"[rois] joined RoI {name!r}: part(s) {missing} are not among the RoIs {list(rois.names)}")
    labels = rois.labels if device is None else rois.labels.to(device)
    return RoISet(labels, rois.names, joined)


__all__ = ["RoISpec", "build_rois", "read_label_names", "rois_from_label_map", "rois_from_prediction"]
