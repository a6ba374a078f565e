"""A MONAI bundle's own preprocessing, read as the engine's ``[preprocess]`` settings.

A bundle's network was trained (and is meant to be run) on images prepared by the
``preprocessing`` transforms of its inference config. Attributions of that network on images
prepared any other way explain a model fed out-of-distribution input, so the bundle's
preprocessing is the default: :func:`bundle_preprocess` instantiates the transforms with MONAI's
``ConfigParser`` and translates each into the fields of :class:`engine.io.PreprocessSpec`, and
:func:`merge_preprocess` refuses a job whose ``[preprocess]`` contradicts them, naming the key,
both values and the bundle file.

Transforms the engine reproduces: ``Orientationd`` (orientation), ``Spacingd`` (spacing,
interpolation), ``ScaleIntensityRanged`` (a_min, a_max, b_min, b_max, clip),
``CropForegroundd`` with its default foreground (``x > 0``, which after the window is the
engine's ``x > b_min`` when b_min = 0), ``SpatialPadd`` (pad_to). Loading and type transforms
change no voxel values and are passed over. Any other transform that touches the image cannot be
reproduced here and is refused by name (``ignore_bundle_preprocessing = true`` in ``[model]``
takes the job's ``[preprocess]`` instead, on the user's word).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import JobSpecError, ModelError

#: Transforms that load or re-type data without changing voxel values or geometry.
PASS_THROUGH = frozenset({
    "LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AddChanneld", "AsChannelFirstd",
    "EnsureTyped", "EnsureType", "ToTensord", "ToTensor", "ToNumpyd", "CastToTyped", "ToDeviced",
    "Identityd", "Identity", "SaveImaged", "CopyItemsd", "DeleteItemsd", "SelectItemsd",
})

#: The fields of ``[preprocess]`` a bundle's transforms fix, with the engine's defaults when the
#: bundle has no transform for them (no reorientation, no resampling, no intensity change).
_IDENTITY: dict[str, Any] = {
    "orientation": None, "spacing": None, "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
    "clip": False, "crop_foreground": False,
}


@dataclass(frozen=True)
class ModelPreprocess:
    """Preprocessing a model prescribes: ``[preprocess]`` fields, and for each the transform it came from."""

    fields: dict[str, Any]
    origin: dict[str, str]  # field -> "configs/inference.json preprocessing[3] Spacingd"
    where: str  # the file, for messages


def _name(t: Any) -> str:
    return type(t).__name__


def _keys_of(t: Any) -> tuple[str, ...]:
    keys = getattr(t, "keys", ())
    return tuple(keys) if isinstance(keys, (tuple, list)) else (str(keys),)


def bundle_preprocess(parser: Any, *, config_name: str, image_key: str = "image") -> ModelPreprocess | None:
    """Translate ``parser``'s ``preprocessing`` (a MONAI ``Compose``) into ``[preprocess]`` fields.

    Returns None when the config defines no ``preprocessing``. Raises ``ModelError`` for a
    transform on the image that the engine cannot reproduce, naming it and its position.
    """
    if "preprocessing" not in parser.get():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compose = parser.get_parsed_content("preprocessing", instantiate=True)
    except Exception as exc:
        raise ModelError(f"{config_name}: preprocessing cannot be instantiated ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}); fix the bundle or set ignore_bundle_preprocessing = "
                         "true in [model] and give [preprocess]") from exc
    transforms = list(getattr(compose, "transforms", [compose]))
    fields = dict(_IDENTITY)
    origin: dict[str, str] = {}

    def set_(key: str, value: Any, where: str) -> None:
        fields[key] = value
        origin[key] = where

    for i, t in enumerate(transforms):
        name = _name(t)
        where = f"{config_name} preprocessing[{i}] {name}"
        if name in PASS_THROUGH:
            continue
        if image_key not in _keys_of(t) and getattr(t, "source_key", None) != image_key:
            continue  # labels only
        if name == "Orientationd":
            set_("orientation", str(t.ornt_transform.axcodes), where)
        elif name == "Spacingd":
            set_("spacing", tuple(float(v) for v in t.spacing_transform.pixdim), where)
            mode = t.mode[_keys_of(t).index(image_key)] if isinstance(t.mode, (tuple, list)) else t.mode
            set_("interpolation", str(getattr(mode, "value", mode)), where)
        elif name == "ScaleIntensityRanged":
            s = t.scaler
            for key in ("a_min", "a_max", "b_min", "b_max"):
                set_(key, float(getattr(s, key)), where)
            set_("clip", bool(s.clip), where)
        elif name == "CropForegroundd":
            c = t.cropper
            if getattr(c.select_fn, "__name__", "") != "is_positive" or c.margin not in (0, (0, 0, 0)):
                raise ModelError(f"{where}: a foreground crop with a custom select_fn or margin cannot be "
                                 "reproduced by the engine; set ignore_bundle_preprocessing = true in [model] and "
                                 "give [preprocess] yourself")
            set_("crop_foreground", True, where)
        elif name == "SpatialPadd":
            set_("pad_to", tuple(int(v) for v in t.padder.spatial_size), where)
        else:
            raise ModelError(f"{where} changes the image in a way the engine's [preprocess] cannot reproduce "
                             f"(it knows Orientationd, Spacingd, ScaleIntensityRanged, CropForegroundd, SpatialPadd); "
                             "set ignore_bundle_preprocessing = true in [model] and give an equivalent [preprocess]")
    if fields.get("crop_foreground") and float(fields["b_min"]) != 0.0:
        raise ModelError(f"{origin['crop_foreground']}: the bundle crops voxels > 0 but its intensity window maps "
                         f"to b_min = {fields['b_min']}; the engine crops voxels > b_min, so it cannot reproduce this; "
                         "set ignore_bundle_preprocessing = true in [model] and give [preprocess]")
    return ModelPreprocess(fields=fields, origin=origin, where=config_name)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        norm = {"trilinear": "bilinear"}
        return norm.get(a.lower(), a.lower()) == norm.get(b.lower(), b.lower())
    return a == b


def merge_preprocess(model: ModelPreprocess | None, job: Mapping[str, Any] | None, *, source: str) -> dict[str, Any]:
    """The ``[preprocess]`` table to use: the model's, with the job's keys that agree or that it leaves open.

    A job key that the model's preprocessing fixes to another value is a ``JobSpecError`` naming
    both values and where the model's comes from.
    """
    job = dict(job or {})
    if model is None:
        return job
    out = dict(model.fields)
    for key, value in job.items():
        if key in model.fields and key in model.origin and not _same(value, model.fields[key]):
            raise JobSpecError(
                f"[preprocess] {key} = {value!r} contradicts {source}'s own preprocessing ({model.origin[key]} "
                f"gives {key} = {model.fields[key]!r}); drop {key} from [preprocess] (the model's preprocessing is "
                "used by default) or set ignore_bundle_preprocessing = true in [model]")
        if key in model.fields and key not in model.origin and not _same(value, model.fields[key]):
            raise JobSpecError(
                f"[preprocess] {key} = {value!r} contradicts {source}'s own preprocessing ({model.where} has no "
                f"transform for it, so {key} = {model.fields[key]!r}); drop {key} from [preprocess] or set "
                "ignore_bundle_preprocessing = true in [model]")
        out[key] = value
    return out


__all__ = ["ModelPreprocess", "PASS_THROUGH", "bundle_preprocess", "merge_preprocess"]
