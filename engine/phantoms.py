"""Synthetic thorax CT phantoms: the engine's embedded default data.

Each phantom is an analytic model of a thorax evaluated at voxel centres, with a 17-class
label map in the order of :data:`engine.labels.THORAX_CLASSES`, Hounsfield-unit intensities,
per-patient anatomical variation, per-site acquisition (reconstruction kernel and noise),
and optionally one planted anomaly with its ground truth in the metadata.

Orientation convention (NIfTI RAS+, checked with ``nibabel.aff2axcodes``):

* voxel arrays are indexed ``(x, y, z)``; the affine is diagonal with positive spacing, so
  ``nibabel.aff2axcodes(affine) == ('R', 'A', 'S')``: world ``+x`` points to the patient's
  **Right**, ``+y`` to Anterior, ``+z`` to Superior (nibabel names the end each axis points
  *to*; RAS+ is the NIfTI/MNI world convention);
* hence the patient's **left** is at **negative** world x: the left lung lobes, the
  autochthon_left muscle, the cardiac apex and the descending aorta all have x < 0 (in a
  normal phantom); the volume is centred on the world origin.

Tissues (HU, before the kernel and noise): air -1000, lung about -870 with smooth texture
and a posterior (dependent) gradient, fat -100, muscle/soft tissue 40-60, blood 40
(non-contrast) or 180-330 (venous/arterial contrast in aorta, heart and pulmonary veins),
cartilage 170, cancellous bone ~400 (falls with age) up to ~850 cortical, metal 3000.
Images are integer-valued float32 clipped to [-1024, 3071].

Acquisition: the site (:data:`SITE_PROTOCOLS`) fixes the reconstruction kernel (soft =
gaussian blur, standard = slight blur, sharp = unsharp masking) and the noise range; noise
is gaussian, shaped by the same kernel and scaled to exactly ``noise_hu`` (sd). Contrast
phase is drawn independently of site; ``random_group`` is an independent coin flip.

Anomalies (:data:`ANOMALY_TYPES`): ``metal_streak`` (a 3000 HU device in the anterior chest
wall with alternating bright/dark streaks through its slices), ``missing_lobe`` (one lobe
replaced by 30 HU collapsed tissue, labelled background), ``mirrored`` (heart, aorta and
pulmonary veins mirrored left-right), ``pleural_effusion`` (15 HU fluid in the posterior
lower part of one lung, labelled background), ``extreme_noise`` (noise x6). Which
patients of a cohort are anomalous is :func:`anomaly_schedule`; the lobe/side chosen is in
the extra metadata field ``anomaly_detail``. Beyond these five, ``corruption=`` applies any kind of
the anomaly library :mod:`engine.corruptions` (acquisition faults, pathology, devices, anatomical
variants, wrong inputs) to the finished phantom, drawing from its own random stream. Note: with the default fraction 0.125, 32
patients hold 4 anomalies (4 of the 5 types); 40 patients hold all five.

Everything is vectorised numpy on open (broadcast) coordinate grids, so any shape and
spacing works; at the default size a phantom takes a few tens of milliseconds.

Randomness: every patient draws from independent streams seeded by ``(seed, index,
stream)``, so patient ``i`` of a cohort is the same whatever the cohort size, and
changing the site or planting an anomaly leaves the patient's anatomy unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import ndimage

from engine.labels import THORAX_CLASSES

__all__ = [
    "ANOMALY_TYPES",
    "CONTRAST_PHASES",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "KERNELS",
    "SITE_PROTOCOLS",
    "Phantom",
    "anomaly_schedule",
    "generate_cohort",
    "iter_training_pairs",
    "make_phantom",
]

#: Default volume shape in voxels, ``(x, y, z)``: a 336 x 280 x 280 mm field of view.
DEFAULT_SHAPE: tuple[int, int, int] = (48, 40, 40)
#: Default voxel spacing in mm, ``(x, y, z)``.
DEFAULT_SPACING: tuple[float, float, float] = (7.0, 7.0, 7.0)
#: Planted anomaly types, in the order the cohort cycles through them.
ANOMALY_TYPES: tuple[str, ...] = (
    "metal_streak",
    "missing_lobe",
    "mirrored",
    "pleural_effusion",
    "extreme_noise",
)
#: Reconstruction kernels, softest first.
KERNELS: tuple[str, ...] = ("soft", "standard", "sharp")
#: Contrast phases.
CONTRAST_PHASES: tuple[str, ...] = ("none", "arterial", "venous")
#: Acquisition protocol per site: reconstruction kernel and range of image noise (HU, sd).
#: The site fully determines the kernel and the typical noise level.
SITE_PROTOCOLS: dict[str, tuple[str, tuple[float, float]]] = {
    "A": ("soft", (8.0, 14.0)),
    "B": ("standard", (16.0, 24.0)),
    "C": ("sharp", (28.0, 38.0)),
}
#: Noise multiplier of the ``extreme_noise`` anomaly.
EXTREME_NOISE_FACTOR = 6.0

_LABEL = {name: i for i, name in enumerate(THORAX_CLASSES)}
_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
# Stream ids of the per-patient random generators.
_S_META, _S_ANATOMY, _S_TEXTURE, _S_NOISE, _S_ANOMALY, _S_GROUP, _S_CORRUPTION = range(7)
# Kernel filters: gaussian sigma in mm (soft/standard); unsharp-mask sigma and amount (sharp).
_KERNEL_SIGMA_MM = {"soft": 4.5, "standard": 1.8}
_SHARP_SIGMA_MM, _SHARP_AMOUNT = 4.5, 0.9


@dataclass(frozen=True)
class Phantom:
    """One synthetic patient.

    ``image`` is float32 HU (integer-valued), ``labels`` uint8 class indices of
    :data:`engine.labels.THORAX_CLASSES`, both shaped ``(X, Y, Z)``; ``affine`` is the 4x4
    RAS+ voxel-to-world matrix; ``metadata`` holds patient_id, age, sex, site,
    scanner_kernel, contrast, noise_hu, random_group, anomaly and anomaly_type.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    metadata: dict[str, object]


# ----------------------------------------------------------------------------- validation


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        vals = tuple(shape)
    except TypeError:
        vals = ()
    if len(vals) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in vals
    ):
        raise ValueError(
            f"shape must be three positive integers (x, y, z), e.g. {DEFAULT_SHAPE}; got {shape!r}"
        )
    return (int(vals[0]), int(vals[1]), int(vals[2]))


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(
            "spacing must be three positive finite voxel sizes in mm (x, y, z), "
            f"e.g. {DEFAULT_SPACING}; got {spacing!r}"
        )
    return (vals[0], vals[1], vals[2])


def _check_nonneg_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def _check_fraction(anomaly_fraction: float) -> float:
    try:
        f = float(anomaly_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not (0.0 <= f <= 1.0):
        raise ValueError(
            f"anomaly_fraction must be between 0 and 1 (e.g. 0.125); got {anomaly_fraction!r}"
        )
    return f


def _check_anomaly(anomaly_type: str | None) -> str:
    if anomaly_type is None or anomaly_type == "none":
        return "none"
    if anomaly_type not in ANOMALY_TYPES:
        raise ValueError(
            f"unknown anomaly_type {anomaly_type!r}; use None/'none' or one of {ANOMALY_TYPES}"
        )
    return anomaly_type


def _check_site(site: str | None) -> str | None:
    if site is not None and site not in SITE_PROTOCOLS:
        raise ValueError(f"unknown site {site!r}; use None or one of {tuple(SITE_PROTOCOLS)}")
    return site


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    aff = np.eye(4)
    for a in range(3):
        aff[a, a] = spacing[a]
        aff[a, 3] = -0.5 * (shape[a] - 1) * spacing[a]
    return aff


def _grid(shape, spacing):
    """Open grids of world coordinates (mm) at voxel centres, shaped for broadcasting."""
    axes = [
        ((np.arange(n, dtype=np.float32) - 0.5 * (n - 1)) * np.float32(s))
        for n, s in zip(shape, spacing)
    ]
    return (
        axes[0][:, None, None],
        axes[1][None, :, None],
        axes[2][None, None, :],
    )


def _tube(x, y, z, points, radii) -> np.ndarray:
    """Normalised distance (distance / local radius) to a polyline; < 1 inside the tube."""
    pts = np.asarray(points, dtype=np.float32)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float32), (len(pts),))
    best = None
    for i in range(len(pts) - 1):
        a, b = pts[i], pts[i + 1]
        ab = b - a
        denom = float(ab @ ab) or 1.0
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom
        t = np.clip(t, 0.0, 1.0)
        d = np.sqrt(
            (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        )
        r = rad[i] + t * (rad[i + 1] - rad[i])
        nd = d / r
        best = nd if best is None else np.minimum(best, nd)
    return best


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    """Normalised ellipsoid radius; < 1 inside."""
    return np.sqrt(
        ((x - centre[0]) / semi[0]) ** 2
        + ((y - centre[1]) / semi[1]) ** 2
        + ((z - centre[2]) / semi[2]) ** 2
    )


def _smooth_noise(rng, shape, spacing, sigma_mm) -> np.ndarray:
    """Unit-variance gaussian random field with correlation length ``sigma_mm``."""
    field = rng.standard_normal(shape, dtype=np.float32)
    sig = [max(sigma_mm / s, 0.0) for s in spacing]
    field = ndimage.gaussian_filter(field, sig, mode="wrap")
    sd = float(field.std()) or 1.0
    return field / np.float32(sd)


def _kernel_filter(img: np.ndarray, kernel: str, spacing) -> np.ndarray:
    if kernel == "sharp":
        sig = [_SHARP_SIGMA_MM / s for s in spacing]
        blurred = ndimage.gaussian_filter(img, sig, mode="nearest")
        return img + np.float32(_SHARP_AMOUNT) * (img - blurred)
    sig = [_KERNEL_SIGMA_MM[kernel] / s for s in spacing]
    return ndimage.gaussian_filter(img, sig, mode="nearest")


# ----------------------------------------------------------------------------- patient draws


def _draw_metadata(seed: int, index: int) -> dict[str, object]:
    rng = _rng(seed, index, _S_META)
    age = int(np.clip(round(rng.normal(60.0, 13.0)), 20, 90))
    sex = "M" if rng.random() < 0.5 else "F"
    site = str(rng.choice(list(SITE_PROTOCOLS)))
    contrast = str(rng.choice(list(CONTRAST_PHASES), p=[0.3, 0.3, 0.4]))
    noise_u = float(rng.random())
    group = "g1" if _rng(seed, index, _S_GROUP).random() < 0.5 else "g2"
    return {
        "patient_id": f"phantom-{index:03d}",
        "age": age,
        "sex": sex,
        "site": site,
        "contrast": contrast,
        "_noise_u": noise_u,
        "random_group": group,
    }


def _draw_anatomy(seed: int, index: int, sex: str, age: int) -> dict[str, float]:
    rng = _rng(seed, index, _S_ANATOMY)
    n = rng.normal
    sex_scale = 1.04 if sex == "M" else 0.95
    size = float(np.clip(n(1.0, 0.04), 0.9, 1.1)) * sex_scale
    aspect = float(np.clip(n(1.0, 0.04), 0.9, 1.1))
    return {
        "ax": 142.0 * size * math.sqrt(aspect),
        "by": 104.0 * size / math.sqrt(aspect),
        "fat": float(np.clip(n(15.0 if sex == "M" else 18.0, 4.0), 6.0, 26.0)),
        "lung": float(np.clip(n(1.0, 0.06), 0.85, 1.15)),
        "dia": float(n(0.0, 8.0)),
        "heart": float(np.clip(n(1.0, 0.08), 0.8, 1.25)),
        "heart_dx": float(n(0.0, 5.0)),
        "heart_dz": float(n(0.0, 6.0)),
        "aorta": float(np.clip(n(1.0, 0.08) + 0.004 * (age - 60), 0.8, 1.3)),
        "aorta_dx": float(n(0.0, 3.0)),
        "rib_pitch": float(np.clip(n(25.0, 1.5), 21.0, 29.0)),
        "rib_phase": float(rng.uniform(-4.0, 4.0)),
        "carina": float(n(52.0, 5.0)),
        "fiss_l": float(n(0.0, 6.0)),
        "fiss_r": float(n(0.0, 6.0)),
        "horiz": float(n(12.0, 5.0)),
        "lung_hu": float(-870.0 - 1.2 * (age - 60) + n(0.0, 12.0)),
        "bone_hu": float(430.0 - 2.0 * (age - 60) + n(0.0, 25.0)),
    }


def anomaly_schedule(n_patients: int, *, seed: int = 0, anomaly_fraction: float = 0.125) -> list[str]:
    """Anomaly type of each of the first ``n_patients`` cohort patients (``'none'`` if normal).

    Patient ``i`` is anomalous when ``floor((i+1)*f + u) > floor(i*f + u)`` for the fraction
    ``f`` and a seed-dependent phase ``u`` in [0, 1): anomalies are spread evenly, the first
    ``n`` patients hold ``floor(n*f)`` or ``ceil(n*f)`` of them, and patient ``i``'s status
    does not depend on ``n``. The k-th anomalous patient gets ``ANOMALY_TYPES[k % 5]``.
    """
    n = int(n_patients)
    f = _check_fraction(anomaly_fraction)
    seed = _check_nonneg_int(seed, "seed")
    u = float(np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1])).random())
    out = []
    for i in range(n):
        before = math.floor(i * f + u)
        if math.floor((i + 1) * f + u) > before:
            k = before - math.floor(u)
            out.append(ANOMALY_TYPES[k % len(ANOMALY_TYPES)])
        else:
            out.append("none")
    return out


# ----------------------------------------------------------------------------- the phantom


def make_phantom(
    index: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    anomaly_type: str | None = None,
    site: str | None = None,
    corruption: str | None = None,
) -> Phantom:
    """Patient ``index`` of the phantom population for ``seed``.

    ``anomaly_type`` plants one anomaly (None/'none': a normal patient); ``site`` overrides
    the patient's drawn site, and with it the kernel and noise level, leaving anatomy,
    contrast and noise texture unchanged. ``corruption`` names a kind of
    :data:`engine.corruptions.KINDS`, applied to the finished image and labels (not together
    with ``anomaly_type``); the metadata then records it as the anomaly (``anomaly_type`` = the
    kind, ``anomaly_family``, ``anomaly_detail``).
    """
    if corruption is not None:
        from engine import corruptions

        if _check_anomaly(anomaly_type) != "none":
            raise ValueError("give either anomaly_type or corruption, not both")
        base = make_phantom(index, seed=seed, shape=shape, spacing=spacing, site=site)
        kind = corruptions.KINDS.get(corruption)
        if kind is None:
            raise ValueError(f"unknown corruption {corruption!r}; use one of {tuple(corruptions.KINDS)}")
        out = corruptions.corrupt(corruption, base.image, base.labels, spacing=_check_spacing(spacing),
                                  rng=_rng(seed, index, _S_CORRUPTION))
        image = np.clip(np.rint(out.image), -1024.0, 4095.0).astype(np.float32)
        meta = dict(base.metadata, anomaly=True, anomaly_type=corruption, anomaly_family=kind.family,
                    anomaly_detail=out.detail)
        return Phantom(image=image, labels=out.labels, affine=base.affine, metadata=meta)
    index = _check_nonneg_int(index, "index")
    seed = _check_nonneg_int(seed, "seed")
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    anomaly = _check_anomaly(anomaly_type)
    site = _check_site(site)

    meta = _draw_metadata(seed, index)
    if site is not None:
        meta["site"] = site
    kernel, (n_lo, n_hi) = SITE_PROTOCOLS[str(meta["site"])]
    noise_hu = n_lo + float(meta.pop("_noise_u")) * (n_hi - n_lo)
    if anomaly == "extreme_noise":
        noise_hu *= EXTREME_NOISE_FACTOR
    noise_hu = round(noise_hu, 1)
    contrast = str(meta["contrast"])
    an = _draw_anatomy(seed, index, str(meta["sex"]), int(meta["age"]))
    arng = _rng(seed, index, _S_ANOMALY)

    x, y, z = _grid(shape, spacing)
    full = shape
    hu = np.full(full, -1000.0, dtype=np.float32)
    lab = np.zeros(full, dtype=np.uint8)

    def paint(mask, label=None, value=None):
        mask = np.broadcast_to(mask, full)
        if value is not None:
            if np.ndim(value) == 0:
                hu[mask] = value
            else:
                hu[mask] = np.broadcast_to(value, full)[mask]
        if label is not None:
            lab[mask] = label

    # left = sign of x on the patient's left (RAS+: -x); 'mirrored' flips heart and aorta.
    left = -1.0
    heart_side = -left if anomaly == "mirrored" else left

    # --- body: ellipse in the axial plane narrowing to the neck above z_neck
    ax, by = an["ax"], an["by"]
    fat = min(an["fat"], 0.16 * by)
    t_neck = np.clip((z - 88.0) / 40.0, 0.0, 1.0)
    t_neck = t_neck * t_neck * (3 - 2 * t_neck)
    bax = ax * (1 - t_neck) + 72.0 * t_neck
    bby = by * (1 - t_neck) + 68.0 * t_neck
    byc = -14.0 * t_neck
    r_xy = np.sqrt(x**2 + (y - byc) ** 2) + 1e-3
    rho_b = np.sqrt((x / bax) ** 2 + ((y - byc) / bby) ** 2)
    body = rho_b <= 1.0
    depth = r_xy * (1.0 / np.maximum(rho_b, 1e-3) - 1.0)  # approx. distance below the skin
    fat_here = fat * (1 - 0.5 * t_neck)
    paint(body, 0, 45.0)  # muscle / soft tissue
    paint(body & (depth < fat_here), 0, -100.0)  # subcutaneous fat
    paint(body & (depth < 2.5), 0, 25.0)  # skin

    # --- thoracic cavity (also the rib-cage ellipse), shrinking to the lung apices
    g = math.sqrt(ax * by / (142.0 * 104.0))  # body size factor (bones, muscles)
    ls = an["lung"]
    cax0 = ax - fat - 18.0
    cby0 = by - fat - 18.0
    gc = math.sqrt(cax0 * cby0 / (108.0 * 70.0))  # cavity size factor (heart, mediastinum)
    cyc = 6.0
    z_apex = 95.0 + 30.0 * ls
    apex = np.sqrt(np.clip(1.0 - ((z - 30.0) / (z_apex + 25.0 - 30.0)) ** 2, 0.0, 1.0))
    apex = np.where(z < 30.0, 1.0, apex).astype(np.float32)
    cax = cax0 * apex
    cby = cby0 * (0.35 + 0.65 * apex)
    rho_c = np.sqrt((x / np.maximum(cax, 1e-3)) ** 2 + ((y - cyc) / np.maximum(cby, 1e-3)) ** 2)
    cavity = (rho_c <= 1.0) & (apex > 0.05)
    paint(cavity & body, 0, -70.0)  # mediastinal fat by default

    # --- spine geometry (used by several structures)
    y_v = -0.34 * by
    r_vb = 17.0 * g
    y_canal = y_v - r_vb - 9.0

    # --- diaphragm and upper abdomen
    z_d = -128.0 + an["dia"] + 20.0 * (1.0 - ls)
    dome_c = 0.45 * cax0
    dome = np.clip(
        1.0 - ((np.abs(x) - dome_c) / (0.8 * cax0)) ** 2 - ((y - cyc - 0.2 * cby0) / (1.1 * cby0)) ** 2,
        0.0,
        1.0,
    )
    right_side = (x * left) < 0  # the patient's right
    z_dia = z_d + 64.0 * dome + np.where(right_side, 12.0, 0.0)
    below = cavity & (z < z_dia)
    contrast_boost = {"none": 0.0, "arterial": 25.0, "venous": 55.0}[contrast]
    paint(below & body, 0, 38.0 + 0.5 * contrast_boost)
    liver = below & right_side | (below & (x * left < 25.0) & (y > cyc - 0.2 * cby0))
    paint(liver & body, 0, 58.0 + contrast_boost)
    stomach = _ellipsoid(x, y, z, (left * 0.45 * cax0, cyc + 0.25 * cby0, z_d + 22.0), (30, 26, 18))
    paint((stomach < 1.0) & below, 0, 30.0)
    paint((stomach < 0.75) & below & (z > z_d + 22.0), 0, -1000.0)  # gastric air bubble

    # --- heart (ellipsoid, anterior, displaced to heart_side)
    hs = an["heart"] * gc
    h_c = (heart_side * (22.0 * gc) + an["heart_dx"], cyc + 0.28 * cby0, -42.0 + an["heart_dz"] + 0.5 * an["dia"])
    h_semi = (54.0 * hs, 44.0 * hs, 46.0 * hs)
    rho_h = _ellipsoid(x, y, z, h_c, h_semi)

    # --- aorta: root -> ascending -> arch -> descending, left of the spine
    ar = an["aorta"] * g
    adx = an["aorta_dx"]
    top = h_c[2] + h_semi[2]
    desc_x = heart_side * 22.0 * g + adx
    desc_y = y_v + r_vb + 10.0
    arch_z = max(top + 45.0, 60.0)
    a_pts = [
        (-heart_side * 6.0 + adx, h_c[1] - 0.1 * h_semi[1], h_c[2] + 0.4 * h_semi[2]),
        (-heart_side * 10.0 + adx, h_c[1] - 0.25 * h_semi[1], arch_z - 10.0),
    ]
    p0 = np.array(a_pts[-1])
    p2 = np.array((desc_x, desc_y, arch_z - 12.0))
    ctrl = np.array(((p0[0] + p2[0]) / 2, (p0[1] + p2[1]) / 2, arch_z + 28.0))
    for t in np.linspace(0.2, 1.0, 5):
        a_pts.append(tuple((1 - t) ** 2 * p0 + 2 * t * (1 - t) * ctrl + t**2 * p2))
    a_pts.append((desc_x, desc_y, -150.0))
    a_rad = [15.0 * ar, 15.0 * ar] + [14.0 * ar] * 4 + [12.5 * ar, 12.5 * ar]
    nd_a = _tube(x, y, z, a_pts, a_rad)

    # --- trachea, main bronchi, oesophagus
    y_t = y_v + r_vb + 30.0
    carina = an["carina"]
    nd_tr = _tube(x, y, z, [(0.0, y_t - 8.0, 150.0), (0.0, y_t, carina)], 11.0)
    bronchi = np.minimum(
        _tube(x, y, z, [(0.0, y_t, carina + 4), (-left * 32.0, y_t - 4, carina - 22)], 7.5),
        _tube(x, y, z, [(0.0, y_t, carina + 4), (left * 36.0, y_t - 6, carina - 28)], 7.0),
    )
    nd_oes = _tube(x, y, z, [(left * 4.0, y_t - 20.0, 150.0), (left * 10.0, y_v + r_vb + 6, -120.0)], 8.0)

    # --- pulmonary veins: from the left atrium (posterior heart) laterally into both lungs
    la = (h_c[0] * 0.3, h_c[1] - 0.75 * h_semi[1], h_c[2] + 0.35 * h_semi[2])
    pv = None
    for side in (-1.0, 1.0):
        for dz, dy in ((22.0, 4.0), (-12.0, -4.0)):
            end = (side * 0.45 * cax0, la[1] + dy, la[2] + dz)
            mid = (side * 0.25 * cax0, la[1] + dy * 0.5, la[2] + dz * 0.6)
            t = _tube(x, y, z, [la, mid, end], [9.0, 8.0, 6.0])
            pv = t if pv is None else np.minimum(pv, t)

    # --- lungs: cavity above the diaphragm minus mediastinum, heart, vessels, spine
    w_med = 16.0 * gc + 14.0 * np.clip((z - 20.0) / 60.0, 0.0, 1.0)
    spine_block = (np.abs(x) < r_vb + 12.0) & (y < y_v + r_vb + 4.0)
    lung = (
        cavity
        & body
        & (z > z_dia)
        & (np.abs(x) > w_med)
        & (rho_h > 1.0 + 7.0 / h_semi[0])
        & (nd_a > 1.0 + 6.0 / (13.0 * ar))
        & (nd_tr > 1.6)
        & ~spine_block
    )
    tex = _smooth_noise(_rng(seed, index, _S_TEXTURE), full, spacing, 4.0)
    gravity = 35.0 * np.clip((cyc - y) / cby0, -1.0, 1.0)  # dependent (posterior) lung denser
    lung_hu = an["lung_hu"] + gravity + 28.0 * tex
    on_left = (x * left) > 0
    fiss_l = (z - (an["fiss_l"] + 8.0)) + 1.1 * (y - cyc)  # > 0: upper lobe (left)
    fiss_r = (z - (an["fiss_r"] - 2.0)) + 1.1 * (y - cyc)  # > 0: upper/middle (right)
    horiz = z - (an["horiz"] + 0.2 * (y - cyc))  # > 0: upper (right)
    lobes = {
        "lung_upper_lobe_left": lung & on_left & (fiss_l > 0),
        "lung_lower_lobe_left": lung & on_left & (fiss_l <= 0),
        "lung_upper_lobe_right": lung & ~on_left & (fiss_r > 0) & (horiz > 0),
        "lung_middle_lobe_right": lung & ~on_left & (fiss_r > 0) & (horiz <= 0),
        "lung_lower_lobe_right": lung & ~on_left & (fiss_r <= 0),
    }
    for name, m in lobes.items():
        paint(m, _LABEL[name], lung_hu)
    # fissures: thin slightly denser sheets
    fis = lung & (
        (on_left & (np.abs(fiss_l) < 2.0))
        | (~on_left & ((np.abs(fiss_r) < 2.0) | ((np.abs(horiz) < 1.5) & (fiss_r > 0))))
    )
    paint(fis, None, -700.0)

    # --- blood / contrast
    blood = {"none": 40.0, "arterial": 330.0, "venous": 190.0}[contrast]
    blood_pv = {"none": 40.0, "arterial": 300.0, "venous": 180.0}[contrast]
    myo = {"none": 50.0, "arterial": 120.0, "venous": 105.0}[contrast]
    heart = rho_h < 1.0
    paint(heart, _LABEL["heart"], myo)
    paint(rho_h < 0.74, None, blood * 0.92)
    paint((pv < 1.0) & ~heart & body, _LABEL["pulmonary_vein"], blood_pv)
    aorta = nd_a < 1.0
    paint(aorta & body, _LABEL["aorta"], blood)
    paint((nd_a >= 1.0) & (nd_a < 1.12) & ~heart & ~lung, None, 60.0 if contrast == "none" else 90.0)
    paint((nd_oes < 1.0) & ~aorta, 0, 35.0)

    # --- trachea (air lumen + wall) and main bronchi
    paint((bronchi < 1.0) & ~aorta & ~heart, 0, 40.0)
    paint((bronchi < 0.7) & ~aorta & ~heart, 0, -1000.0)
    trachea = (nd_tr < 1.0) & body & (z > carina - 3.0)
    paint(trachea, _LABEL["trachea"], 40.0)
    paint(trachea & (nd_tr < 0.75), None, -1000.0)

    # --- thyroid gland around the upper trachea
    thy_hu = {"none": 95.0, "arterial": 170.0, "venous": 150.0}[contrast]
    thy = np.minimum.reduce(
        [
            _ellipsoid(x, y, z, (s * 19.0, y_t + 2.0, 122.0), (10.0, 13.0, 22.0))
            for s in (-1.0, 1.0)
        ]
        + [_ellipsoid(x, y, z, (0.0, y_t + 13.0, 112.0), (16.0, 6.0, 8.0))]
    )
    paint((thy < 1.0) & body & ~trachea, _LABEL["thyroid_gland"], thy_hu)

    # --- autochthon (paraspinal) muscles
    for side, name in ((left, "autochthon_left"), (-left, "autochthon_right")):
        m = _ellipsoid(x, y, z, (side * 30.0 * g, y_v - 40.0 * g, 0.0), (19.0 * g, 17.0 * g, 1e6))
        paint((m < 1.0) & body & (z < 135.0), _LABEL[name], 52.0)

    # --- vertebrae: bodies with discs, canal, arch, spinous and transverse processes
    bone = an["bone_hu"]
    pitch = an["rib_pitch"]
    phase = an["rib_phase"]
    zz = np.mod(z - phase, pitch)
    disc = zz < 5.0
    r_b = np.sqrt(x**2 + (y - y_v) ** 2)
    vb = (r_b < r_vb) & ~disc
    paint((r_b < r_vb) & disc & body, 0, 85.0)
    r_can = np.sqrt(x**2 + (y - y_canal) ** 2)
    arch = (r_can >= 8.0) & (r_can < 15.0) & (y < y_v - r_vb + 6.0)
    spinous = (np.abs(x) < 5.5) & (y <= y_canal - 8.0) & (y > y_canal - 40.0 * g)
    transverse = (np.abs(x) < 36.0 * g) & (np.abs(y - (y_canal + 2.0)) < 6.0)
    post = (arch | spinous | transverse) & (zz > 3.0) & (zz < pitch - 3.0)
    vert = (vb | post) & body & (z < 145.0)
    paint(vert, _LABEL["vertebrae"], bone)
    paint(vert & (r_b > r_vb - 3.0) & (r_b < r_vb), None, bone + 450.0)  # cortex
    paint(post & body, None, bone + 300.0)
    paint((r_can < 8.0) & body, 0, 20.0)  # spinal canal (CSF / cord)

    # --- ribs and costal cartilages: bands around the cage, dropping anteriorly
    rr = np.sqrt(x**2 + (y - cyc) ** 2) + 1e-3
    out = rr - rr / np.maximum(rho_c, 1e-3)  # approx. distance outside the cavity wall
    cax_full = np.maximum(cax, 1e-3)
    theta = np.arctan2(np.abs(x) / cax_full, -(y - cyc) / np.maximum(cby, 1e-3))  # 0 post., pi ant.
    in_ring = (out > 1.0) & (out < 14.0) & body
    z_top = 100.0 + phase
    th_c = 2.35
    drop = 38.0
    rib = np.zeros(full, dtype=bool)
    cart = np.zeros(full, dtype=bool)
    stern_lo, stern_hi = -95.0, 88.0
    for k in range(12):
        zk = z_top - k * pitch
        zr = zk - drop * np.minimum(theta, th_c) / np.pi
        reach = th_c if k < 10 else 1.9 + 0.1 * (11 - k)
        band = in_ring & (np.abs(z - zr) < 6.0)
        rib |= band & (theta > 0.25) & (theta <= reach) & (np.abs(x) > r_vb + 8.0)
        z_end = zk - drop * th_c / np.pi
        if k < 10 and stern_lo < z_end + 12.0 < stern_hi:
            zc = z_end + 14.0 * (theta - th_c) / (np.pi - th_c)
            cart |= in_ring & (np.abs(z - zc) < 6.0) & (theta > th_c)
    paint(rib, _LABEL["ribs"], bone + 420.0)
    paint(cart & ~rib, _LABEL["costal_cartilages"], 170.0)

    # --- sternum: anterior midline plate, wider manubrium at the top
    y_front = cyc + cby0
    st_w = np.where(z > stern_hi - 28.0, 24.0, 15.0)
    sternum = (
        (np.abs(x) < st_w)
        & (y > y_front - 2.0)
        & (y < y_front + 13.0)
        & (z > stern_lo)
        & (z < stern_hi)
        & body
    )
    paint(sternum, _LABEL["sternum"], bone + 150.0)

    # ------------------------------------------------------------------ anomalies (geometry)
    streak = None
    if anomaly == "missing_lobe":
        lobe = _LOBES[int(arng.integers(len(_LOBES)))]
        m = lab == _LABEL[lobe]
        hu[m] = 30.0
        lab[m] = 0
        anomaly_detail = lobe
    elif anomaly == "pleural_effusion":
        side = left if arng.random() < 0.5 else -left
        y_level = cyc - cby0 * float(arng.uniform(0.05, 0.25))
        ids = [_LABEL[n] for n in _LOBES]
        is_lung = np.isin(lab, ids)
        m = is_lung & ((x * side) > 0) & (y < y_level) & (z < 40.0)
        hu[m] = 15.0
        lab[m] = 0
        anomaly_detail = "left" if side == left else "right"
    elif anomaly == "metal_streak":
        side = left if arng.random() < 0.7 else -left
        mz = float(arng.uniform(20.0, 70.0))
        mc = (side * 0.45 * ax, by - 0.6 * fat - 2.0, mz)
        metal = _ellipsoid(x, y, z, mc, (22.0, 7.0, 20.0)) < 1.0
        # make sure at least one voxel is metal, whatever the resolution
        if not metal.any():
            i0 = np.argmin(np.abs(x[:, 0, 0] - mc[0]))
            i1 = np.argmin(np.abs(y[0, :, 0] - mc[1]))
            i2 = np.argmin(np.abs(z[0, 0, :] - mc[2]))
            metal[i0, i1, i2] = True
        hu[metal] = 3000.0
        lab[metal] = 0
        zr_lo = float(z[0, 0][np.any(metal, axis=(0, 1))].min()) - 0.6 * spacing[2]
        zr_hi = float(z[0, 0][np.any(metal, axis=(0, 1))].max()) + 0.6 * spacing[2]
        in_slab = (z >= zr_lo) & (z <= zr_hi)
        w = max(3.0, 0.55 * min(spacing[0], spacing[1]))
        dx_, dy_ = x - mc[0], y - mc[1]
        r_m = np.sqrt(dx_**2 + dy_**2)
        field = np.zeros((x.shape[0], y.shape[1], 1), dtype=np.float32)
        n_s = 9
        for j in range(n_s):
            ang = np.pi * j / n_s + float(arng.uniform(-0.1, 0.1))
            d = np.abs(dx_ * np.sin(ang) - dy_ * np.cos(ang))
            amp = (650.0 if j % 2 == 0 else -550.0) * float(arng.uniform(0.7, 1.2))
            field = field + amp * np.exp(-(d**2) / (2 * w * w))
        field = field * np.exp(-r_m / 220.0)
        streak = np.where(in_slab, field, 0.0).astype(np.float32)
        anomaly_detail = "left" if side == left else "right"
    else:
        anomaly_detail = ""

    # ------------------------------------------------------------------ acquisition
    img = _kernel_filter(hu, kernel, spacing)
    if streak is not None:
        img = img + _kernel_filter(streak * body.astype(np.float32), kernel, spacing)
        img = np.where(np.broadcast_to(hu >= 2500.0, full), np.maximum(img, 2500.0), img)
    noise = _kernel_filter(
        _rng(seed, index, _S_NOISE).standard_normal(full, dtype=np.float32), kernel, spacing
    )
    noise *= np.float32(noise_hu / (float(noise.std()) or 1.0))
    img = np.clip(np.rint(img + noise), -1024.0, 3071.0).astype(np.float32)

    metadata: dict[str, object] = {
        "patient_id": meta["patient_id"],
        "age": meta["age"],
        "sex": meta["sex"],
        "site": meta["site"],
        "scanner_kernel": kernel,
        "contrast": contrast,
        "noise_hu": noise_hu,
        "random_group": meta["random_group"],
        "anomaly": anomaly != "none",
        "anomaly_type": anomaly,
        "anomaly_detail": anomaly_detail,
    }
    return Phantom(image=img, labels=lab, affine=_affine(shape, spacing), metadata=metadata)


# ----------------------------------------------------------------------------- cohorts

MANIFEST_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "image_path",
    "label_path",
    "age",
    "sex",
    "site",
    "scanner_kernel",
    "contrast",
    "noise_hu",
    "random_group",
    "anomaly",
    "anomaly_type",
    "anomaly_detail",
)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def generate_cohort(
    out_dir: str | Path,
    *,
    n_patients: int = 32,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    anomaly_fraction: float = 0.125,
    progress: bool = False,
) -> pl.DataFrame:
    """Write a phantom cohort as NIfTI plus ``manifest.csv`` and return the manifest.

    Files: ``out_dir/images/<patient_id>.nii.gz`` (int16 HU), ``out_dir/labels/<patient_id>.nii.gz``
    (uint8) and ``out_dir/manifest.csv``; paths in the manifest are absolute. Which patients
    carry an anomaly is given by :func:`anomaly_schedule`.
    """
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ValueError(f"n_patients must be an integer >= 1; got {n_patients!r}")
    seed = _check_nonneg_int(seed, "seed")
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    fraction = _check_fraction(anomaly_fraction)

    out = Path(out_dir).expanduser().resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    schedule = anomaly_schedule(int(n_patients), seed=seed, anomaly_fraction=fraction)
    rows = []
    for i, atype in enumerate(schedule):
        ph = make_phantom(i, seed=seed, shape=shape, spacing=spacing, anomaly_type=atype)
        pid = str(ph.metadata["patient_id"])
        ipath = out / "images" / f"{pid}.nii.gz"
        lpath = out / "labels" / f"{pid}.nii.gz"
        _save_nifti(ipath, ph.image.astype(np.int16), ph.affine)
        _save_nifti(lpath, ph.labels, ph.affine)
        row = {"patient_id": pid, "image_path": str(ipath), "label_path": str(lpath)}
        row.update({k: v for k, v in ph.metadata.items() if k != "patient_id"})
        rows.append(row)
        if progress:
            print(f"[phantoms] {i + 1}/{n_patients} {pid} ({atype})", flush=True)
    schema = {
        "patient_id": pl.String,
        "image_path": pl.String,
        "label_path": pl.String,
        "age": pl.Int64,
        "sex": pl.String,
        "site": pl.String,
        "scanner_kernel": pl.String,
        "contrast": pl.String,
        "noise_hu": pl.Float64,
        "random_group": pl.String,
        "anomaly": pl.Boolean,
        "anomaly_type": pl.String,
        "anomaly_detail": pl.String,
    }
    df = pl.DataFrame(rows, schema=schema).select(MANIFEST_COLUMNS)
    df.write_csv(out / "manifest.csv")
    return df


def iter_training_pairs(
    *,
    seed: int = 0,
    n: int = 32,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    anomaly_fraction: float = 0.0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(image, labels)`` for patients ``0..n-1`` (normal unless ``anomaly_fraction`` > 0)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    schedule = anomaly_schedule(int(n), seed=seed, anomaly_fraction=anomaly_fraction)
    for i, atype in enumerate(schedule):
        ph = make_phantom(i, seed=seed, shape=shape, spacing=spacing, anomaly_type=atype)
        yield ph.image, ph.labels
