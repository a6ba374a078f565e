"""Class tables: the paper's 17-class thorax set, anatomical groups and colours.

Everything downstream names classes and RoIs by these strings; integer channel
indices only appear inside the model and the label maps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

#: The paper's 17 thorax classes (TotalSegmentator subset), in channel order.
THORAX_CLASSES: tuple[str, ...] = (
    "background",
    "aorta",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "trachea",
    "heart",
    "pulmonary_vein",
    "thyroid_gland",
    "ribs",
    "vertebrae",
    "autochthon_left",
    "autochthon_right",
    "sternum",
    "costal_cartilages",
)

#: Anatomical group of each thorax class (used for colours and report grouping).
GROUPS: dict[str, str] = {
    "background": "background",
    "aorta": "vessels",
    "pulmonary_vein": "vessels",
    "heart": "heart",
    "lung_upper_lobe_left": "lungs",
    "lung_lower_lobe_left": "lungs",
    "lung_upper_lobe_right": "lungs",
    "lung_middle_lobe_right": "lungs",
    "lung_lower_lobe_right": "lungs",
    "trachea": "airways",
    "thyroid_gland": "glands",
    "ribs": "bones",
    "vertebrae": "bones",
    "sternum": "bones",
    "costal_cartilages": "bones",
    "autochthon_left": "muscles",
    "autochthon_right": "muscles",
    # joined RoIs
    "lung": "lungs",
    "lung_left": "lungs",
    "lung_right": "lungs",
    "autochthon": "muscles",
    "bones": "bones",
}

#: One colour per anatomical group (matplotlib-compatible hex).
GROUP_COLOURS: dict[str, str] = {
    "background": "#9e9e9e",
    "vessels": "#d62728",
    "heart": "#8c1c13",
    "lungs": "#1f77b4",
    "airways": "#17becf",
    "glands": "#bcbd22",
    "bones": "#e0c068",
    "muscles": "#9467bd",
    "other": "#7f7f7f",
}

#: Joined RoIs the reference code supports, usable by name in job specs.
JOINED_ROIS: dict[str, tuple[str, ...]] = {
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "lung": (
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    ),
    "autochthon": ("autochthon_left", "autochthon_right"),
    "bones": ("ribs", "vertebrae", "sternum", "costal_cartilages"),
}

#: Spelling differences between the reference CSV and our names.
REFERENCE_ALIASES: dict[str, str] = {"vertebraes": "vertebrae"}

#: TotalSegmentator ``total`` task names that map onto the thorax classes.
TOTALSEG_TO_THORAX_PREFIX: dict[str, str] = {
    "rib_": "ribs",
    "vertebrae_": "vertebrae",
}


def group_of(name: str) -> str:
    """Anatomical group of a class name; ``"other"`` for names outside the table."""
    return GROUPS.get(name, "other")


def colour_of(name: str) -> str:
    """Colour of a class name, by its anatomical group."""
    return GROUP_COLOURS[group_of(name)]


def resolve_class_names(
    n_channels: int, class_names: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Names for ``n_channels`` model outputs: the given names, else ``"0"``, ``"1"``, ...

    Raises ``ValueError`` when the given list does not match the channel count, since a
    silent mismatch would attach every importance to the wrong structure.
    """
    if class_names is None:
        return tuple(str(i) for i in range(n_channels))
    names = tuple(str(n) for n in class_names)
    if len(names) != n_channels:
        raise ValueError(
            f"the model outputs {n_channels} channels but {len(names)} class names were given; "
            "give exactly one name per output channel (background included)"
        )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be unique; repeated: {dupes}")
    return names


def totalsegmentator_to_thorax(ts_names: Mapping[int, str]) -> dict[int, str]:
    """Map TotalSegmentator ``total`` label ids to thorax class names where they correspond.

    Individual ribs and vertebrae are joined into ``ribs`` and ``vertebrae``; labels with no
    thorax counterpart are left out.
    """
    out: dict[int, str] = {}
    thorax = set(THORAX_CLASSES)
    for label, name in ts_names.items():
        if name in thorax:
            out[int(label)] = name
            continue
        for prefix, target in TOTALSEG_TO_THORAX_PREFIX.items():
            if name.startswith(prefix):
                out[int(label)] = target
                break
    return out


def read_names_file(path: str | os.PathLike[str]) -> dict[int, str]:
    """Names by integer id from a JSON file: a list (index = id) or an object ``{id: name}``.

    Raises ``ValueError`` with what is wrong (missing file, not JSON, wrong shape, non-integer ids);
    callers turn it into their own user-facing error.
    """
    p = Path(path).expanduser()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p} is not valid JSON ({exc}); give a list or an object {{id: name}}") from None
    if isinstance(raw, list):
        return {i: str(n) for i, n in enumerate(raw)}
    if isinstance(raw, dict):
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except ValueError:
            raise ValueError(f"{p}: keys must be integer ids, got {list(raw)[:5]}") from None
    raise ValueError(f"{p} must hold a JSON list or object, not {type(raw).__name__}")
