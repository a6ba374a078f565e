"""Anomaly kinds a real chest-CT cohort holds, applied to a volume in HU and its label map.

Every kind is a small deterministic function of ``(image, labels, spacing, rng, classes)``:

* ``image``: float array in Hounsfield units, indexed ``(x, y, z)`` in RAS+ voxel order (world
  ``+x`` = the patient's right, ``+y`` anterior, ``+z`` superior), as the phantoms are and as
  ``nibabel.as_closest_canonical`` gives any NIfTI;
* ``labels``: integer label map on the same grid; ``classes`` maps the class names the kind needs
  (lung lobes, heart, aorta, vertebrae, ...) to their ids (default: :data:`engine.labels.THORAX_CLASSES`
  order, the phantoms' and the demo model's ids);
* ``spacing``: voxel size in mm; sizes below are in mm so that a kind means the same at any resolution;
* ``rng``: a ``numpy.random.Generator``; the same generator state gives the same corruption.

It returns a :class:`Corrupted` (new image, new labels where anatomy changes, a short detail string).
Kinds are registered by name with their family in :data:`KINDS`; :func:`corrupt` applies one by name.
The families: ``acquisition`` (calibration, motion, field of view, reconstruction artefacts, contrast
timing, slice gaps, dose), ``pathology``, ``device`` (devices and foreign bodies), ``anatomy``
(anatomical variants) and ``wrong_input`` (wrong body region, another modality, missing rescale,
wrong orientation). Images are clipped to the CT range [-1024, 3071] HU unless the kind is about
values outside it (``missing_rescale``, ``mr_like``).

The kinds are plausible caricatures, not physical simulations: each changes what its docstring says
and nothing else, which is what the tests check and what the anomaly benchmark needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.labels import THORAX_CLASSES

__all__ = [
    "FAMILIES",
    "HU_MAX",
    "HU_MIN",
    "KINDS",
    "Corrupted",
    "CorruptionKind",
    "body_mask",
    "corrupt",
    "kinds_of",
]

HU_MIN, HU_MAX = -1024.0, 3071.0
FAMILIES: tuple[str, ...] = ("acquisition", "pathology", "device", "anatomy", "wrong_input")
DEFAULT_CLASSES: dict[str, int] = {name: i for i, name in enumerate(THORAX_CLASSES)}
LOBES: tuple[str, ...] = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
# Classes with a left and a right member, swapped by a whole-body mirror.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("lung_upper_lobe_left", "lung_upper_lobe_right"),
    ("lung_lower_lobe_left", "lung_lower_lobe_right"),
    ("autochthon_left", "autochthon_right"),
)


@dataclass(frozen=True)
class Corrupted:
    """A corrupted volume: ``image`` (float32), ``labels`` (same dtype as given) and what was done."""

    image: np.ndarray
    labels: np.ndarray
    detail: str


KindFn = Callable[[np.ndarray, np.ndarray, tuple[float, float, float], np.random.Generator, Mapping[str, int]],
                  Corrupted]


@dataclass(frozen=True)
class CorruptionKind:
    """A registered kind: its name, family, whether it changes the label map, and the function."""

    name: str
    family: str
    changes_labels: bool
    description: str
    fn: KindFn


KINDS: dict[str, CorruptionKind] = {}


def _register(family: str, *, changes_labels: bool) -> Callable[[KindFn], KindFn]:
    def deco(fn: KindFn) -> KindFn:
        name = fn.__name__.lstrip("_")
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        KINDS[name] = CorruptionKind(name, family, changes_labels, doc, fn)
        return fn

    return deco


def kinds_of(family: str | None = None) -> tuple[str, ...]:
    """Names of the registered kinds (of one family), in registration order."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    return tuple(k for k, v in KINDS.items() if family is None or v.family == family)


def corrupt(
    kind: str,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    spacing: Sequence[float],
    rng: np.random.Generator | int,
    classes: Mapping[str, int] | None = None,
) -> Corrupted:
    """Apply the kind named ``kind``; ``rng`` may be a seed. Inputs are never modified."""
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; use one of {tuple(KINDS)}")
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(
            f"image and labels must be 3D arrays of the same shape; got {image.shape} and {labels.shape}"
        )
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive voxel sizes in mm; got {spacing!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    cls = dict(DEFAULT_CLASSES if classes is None else classes)
    out = KINDS[kind].fn(image.astype(np.float32, copy=True), labels.copy(), sp, gen, cls)  # type: ignore[arg-type]
    return Corrupted(out.image.astype(np.float32, copy=False), out.labels.astype(labels.dtype, copy=False),
                     out.detail)


# ----------------------------------------------------------------------------- helpers


def body_mask(image: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The patient's body: voxels above ``threshold`` HU with each axial slice's holes (lungs) filled,
    largest connected component only."""
    m = np.asarray(image) > threshold
    filled = np.stack([ndimage.binary_fill_holes(m[:, :, k]) for k in range(m.shape[2])], axis=2)
    lab, n = ndimage.label(filled)
    if n <= 1:
        return filled
    sizes = ndimage.sum_labels(filled, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _clip(img: np.ndarray, hi: float = HU_MAX) -> np.ndarray:
    return np.clip(img, HU_MIN, hi).astype(np.float32)


def _ids(classes: Mapping[str, int], names: Sequence[str]) -> list[int]:
    return [int(classes[n]) for n in names if n in classes]


def _mask(labels: np.ndarray, classes: Mapping[str, int], names: Sequence[str]) -> np.ndarray:
    return np.isin(labels, _ids(classes, names))


def _grid_mm(shape: Sequence[int], spacing: Sequence[float], centre_vox: Sequence[float]):
    """Open grids of mm offsets from ``centre_vox`` (voxel coordinates), shaped for broadcasting."""
    ax = [(np.arange(n, dtype=np.float32) - np.float32(c)) * np.float32(s)
          for n, c, s in zip(shape, centre_vox, spacing)]
    return ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]


def _centre(mask: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    idx = np.argwhere(mask)
    if len(idx):
        return idx.mean(axis=0)
    return np.asarray(fallback if fallback is not None else (np.array(mask.shape) - 1) / 2.0, dtype=float)


def _pick_lobe(labels: np.ndarray, classes: Mapping[str, int], rng: np.random.Generator,
               min_voxels: int = 8) -> str | None:
    """A random lobe present in the label map (with at least ``min_voxels``), or None."""
    present = [n for n in LOBES if n in classes and int((labels == classes[n]).sum()) >= min_voxels]
    if not present:
        return None
    return present[int(rng.integers(len(present)))]


def _lung_side(labels: np.ndarray, classes: Mapping[str, int], rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A random side ('left'/'right') and the mask of that lung's lobes (empty when absent)."""
    side = "left" if rng.random() < 0.5 else "right"
    m = _mask(labels, classes, [n for n in LOBES if n.endswith(side)])
    if not m.any():
        side = "right" if side == "left" else "left"
        m = _mask(labels, classes, [n for n in LOBES if n.endswith(side)])
    return side, m


def _smooth_field(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                [sigma_mm / s for s in spacing], mode="wrap")
    return f / np.float32(f.std() or 1.0)


# ----------------------------------------------------------------------------- acquisition faults


@_register("acquisition", changes_labels=False)
def _hu_offset(img, lab, spacing, rng, classes):
    """Calibration fault: every voxel shifted by one offset of 100-200 HU (random sign)."""
    off = float(rng.choice([-1.0, 1.0]) * rng.uniform(100.0, 200.0))
    return Corrupted(_clip(img + np.float32(off)), lab, f"offset={off:+.1f}")


@_register("acquisition", changes_labels=False)
def _motion_ghosting(img, lab, spacing, rng, classes):
    """Breathing motion: blur along z (10-20 mm) plus anterior-posterior ghosts at 25-35% amplitude."""
    blur_mm = float(rng.uniform(10.0, 20.0))
    out = ndimage.uniform_filter1d(img, size=max(2, int(round(blur_mm / spacing[2]))), axis=2, mode="nearest")
    shift = int(round(rng.uniform(0.2, 0.3) * img.shape[1]))
    amp = float(rng.uniform(0.25, 0.35))
    base = out - HU_MIN  # ghosts carry signal above air
    ghost = 0.5 * (np.roll(base, shift, axis=1) + np.roll(base, -shift, axis=1))
    out = out + np.float32(amp) * ghost
    return Corrupted(_clip(out), lab, f"blur={blur_mm:.0f}mm ghost_shift={shift}vox amp={amp:.2f}")


@_register("acquisition", changes_labels=True)
def _truncated_fov(img, lab, spacing, rng, classes):
    """Reconstruction field of view smaller than the body: outside a centred circle -1024 HU, labels 0."""
    body = body_mask(img)
    c = _centre(body)
    x, y, _ = _grid_mm(img.shape, spacing, c)
    half_width = 0.5 * float(np.ptp(np.argwhere(body)[:, 0]) + 1) * spacing[0] if body.any() else \
        0.5 * img.shape[0] * spacing[0]
    radius = float(rng.uniform(0.6, 0.8)) * half_width
    outside = np.broadcast_to((x**2 + y**2) > radius**2, img.shape)
    img = img.copy()
    img[outside] = HU_MIN
    lab = lab.copy()
    lab[outside] = 0
    return Corrupted(_clip(img), lab, f"fov_radius={radius:.0f}mm")


@_register("acquisition", changes_labels=False)
def _ring_artifact(img, lab, spacing, rng, classes):
    """Detector ring artefact: concentric rings about the isocentre (the same in every slice), +-150-300 HU."""
    c = (np.array(img.shape) - 1) / 2.0
    x, y, _ = _grid_mm(img.shape, spacing, c)
    r = np.sqrt(x**2 + y**2)
    amp = float(rng.uniform(150.0, 300.0))
    period = float(rng.uniform(20.0, 35.0))
    width = max(spacing[0], spacing[1])
    rings = np.zeros_like(r)
    for k, rad in enumerate(np.arange(period, float(r.max()), period)):
        rings = rings + (1.0 if k % 2 == 0 else -1.0) * np.exp(-((r - rad) ** 2) / (2 * (0.5 * width) ** 2))
    out = img + np.float32(amp) * np.broadcast_to(rings, img.shape)
    return Corrupted(_clip(out), lab, f"amp={amp:.0f} period={period:.0f}mm")


@_register("acquisition", changes_labels=False)
def _streak_artifact(img, lab, spacing, rng, classes):
    """Photon-starvation streaks: bright and dark lines through a slab of 3-6 axial slices."""
    nz = img.shape[2]
    thick = int(min(nz, rng.integers(3, 7)))
    z0 = int(rng.integers(0, max(1, nz - thick + 1)))
    c = _centre(body_mask(img))
    x, y, _ = _grid_mm(img.shape[:2] + (1,), spacing, (c[0], c[1], 0.0))
    w = max(3.0, 0.6 * min(spacing[0], spacing[1]))
    field = np.zeros((img.shape[0], img.shape[1], 1), np.float32)
    for j in range(7):
        ang = np.pi * j / 7 + float(rng.uniform(-0.15, 0.15))
        d = np.abs(x * np.sin(ang) - y * np.cos(ang))
        field = field + (700.0 if j % 2 == 0 else -600.0) * np.exp(-(d**2) / (2 * w * w))
    out = img.copy()
    out[:, :, z0:z0 + thick] += field
    return Corrupted(_clip(out), lab, f"slices={z0}-{z0 + thick - 1}")


@_register("acquisition", changes_labels=False)
def _contrast_timing(img, lab, spacing, rng, classes):
    """Mistimed bolus: contrast still in the heart (+250-400 HU) while the aorta is unenhanced (median 40 HU)."""
    heart = _mask(lab, classes, ["heart", "pulmonary_vein"])
    aorta = _mask(lab, classes, ["aorta"])
    boost = float(rng.uniform(250.0, 400.0))
    out = img.copy()
    out[heart] += np.float32(boost)
    if aorta.any():
        out[aorta] += np.float32(40.0 - float(np.median(img[aorta])))
    return Corrupted(_clip(out), lab, f"heart+{boost:.0f}HU aorta->40HU")


@_register("acquisition", changes_labels=True)
def _slice_gaps(img, lab, spacing, rng, classes):
    """Missing slices: two to three blocks of 1-2 axial slices read as air (-1024 HU), labels 0 there."""
    nz = img.shape[2]
    n_blocks = int(rng.integers(2, 4))
    lo, hi = int(0.15 * nz), max(int(0.15 * nz) + 1, int(0.85 * nz))
    gone: list[int] = []
    for start in rng.choice(np.arange(lo, hi), size=min(n_blocks, hi - lo), replace=False):
        gone += list(range(int(start), min(nz, int(start) + int(rng.integers(1, 3)))))
    gone = sorted(set(gone))
    out, lab = img.copy(), lab.copy()
    out[:, :, gone] = HU_MIN
    lab[:, :, gone] = 0
    return Corrupted(_clip(out), lab, "slices=" + ",".join(map(str, gone)))


@_register("acquisition", changes_labels=False)
def _low_dose_noise(img, lab, spacing, rng, classes):
    """Low-dose acquisition: added correlated noise of 90-160 HU sd inside the body."""
    sd = float(rng.uniform(90.0, 160.0))
    noise = _smooth_field(rng, img.shape, spacing, 0.7 * min(spacing))
    out = img + np.where(body_mask(img), np.float32(sd) * noise, np.float32(0.0))
    return Corrupted(_clip(out), lab, f"noise_sd={sd:.0f}HU")


# ----------------------------------------------------------------------------- pathology


@_register("pathology", changes_labels=False)
def _consolidation(img, lab, spacing, rng, classes):
    """Pneumonia: an ellipsoidal region of one lobe (radius 25-45 mm) airless at 20-50 HU; labels kept."""
    lobe = _pick_lobe(lab, classes, rng)
    if lobe is None:
        return Corrupted(img, lab, "no lobe in the labels: unchanged")
    m = lab == classes[lobe]
    pts = np.argwhere(m)
    c = pts[int(rng.integers(len(pts)))]
    x, y, z = _grid_mm(img.shape, spacing, c)
    r = float(rng.uniform(25.0, 45.0))
    region = m & ((x**2 + y**2 + (z / 1.3) ** 2) < r**2)
    hu = float(rng.uniform(20.0, 50.0))
    out = img.copy()
    out[region] = hu + 15.0 * rng.standard_normal(int(region.sum())).astype(np.float32)
    return Corrupted(_clip(out), lab, f"{lobe} r={r:.0f}mm voxels={int(region.sum())}")


@_register("pathology", changes_labels=True)
def _pleural_effusion(img, lab, spacing, rng, classes):
    """Fluid (10-20 HU) in the posterior, lower 40-60% of one lung; those voxels labelled background."""
    side, lung = _lung_side(lab, classes, rng)
    if not lung.any():
        return Corrupted(img, lab, "no lung in the labels: unchanged")
    pts = np.argwhere(lung)
    y_cut = np.quantile(pts[:, 1], float(rng.uniform(0.35, 0.55)))
    z_cut = np.quantile(pts[:, 2], float(rng.uniform(0.4, 0.6)))
    yy = np.arange(img.shape[1])[None, :, None]
    zz = np.arange(img.shape[2])[None, None, :]
    fluid = lung & (yy <= y_cut) & (zz <= z_cut)
    out, lab = img.copy(), lab.copy()
    out[fluid] = float(rng.uniform(10.0, 20.0))
    lab[fluid] = 0
    return Corrupted(_clip(out), lab, f"{side} voxels={int(fluid.sum())}")


@_register("pathology", changes_labels=True)
def _lung_mass(img, lab, spacing, rng, classes):
    """A tumour: a lobulated 40 HU mass of radius 18-35 mm in a lung; its voxels labelled background."""
    lobe = _pick_lobe(lab, classes, rng)
    if lobe is None:
        return Corrupted(img, lab, "no lobe in the labels: unchanged")
    pts = np.argwhere(lab == classes[lobe])
    c = pts[int(rng.integers(len(pts)))]
    x, y, z = _grid_mm(img.shape, spacing, c)
    r = float(rng.uniform(18.0, 35.0))
    lobulation = 1.0 + 0.25 * _smooth_field(rng, img.shape, spacing, r / 2)
    mass = (np.sqrt(x**2 + y**2 + z**2) < r * lobulation) & body_mask(img)
    out, lab = img.copy(), lab.copy()
    out[mass] = 40.0 + 10.0 * rng.standard_normal(int(mass.sum())).astype(np.float32)
    lab[mass] = 0
    return Corrupted(_clip(out), lab, f"{lobe} r={r:.0f}mm voxels={int(mass.sum())}")


@_register("pathology", changes_labels=True)
def _atelectasis(img, lab, spacing, rng, classes):
    """Lobar collapse: a lobe shrinks to its 25-35% most medial voxels, airless (40-60 HU); the rest of its
    space is taken by the other lobe(s) of that lung (hyperinflated, -900 HU)."""
    lobe = _pick_lobe(lab, classes, rng)
    if lobe is None:
        return Corrupted(img, lab, "no lobe in the labels: unchanged")
    m = lab == classes[lobe]
    side = "left" if lobe.endswith("left") else "right"
    body_c = _centre(body_mask(img))
    dist = np.abs(np.arange(img.shape[0], dtype=np.float32) - np.float32(body_c[0]))[:, None, None]
    keep = float(rng.uniform(0.25, 0.35))
    cut = np.quantile(np.broadcast_to(dist, img.shape)[m], keep)
    collapsed = m & (dist <= cut)
    freed = m & ~collapsed
    others = [n for n in LOBES if n.endswith(side) and n != lobe and n in classes and (lab == classes[n]).any()]
    out, lab = img.copy(), lab.copy()
    out[collapsed] = float(rng.uniform(40.0, 60.0))
    if others:
        # nearest remaining lobe of the same lung fills the freed space
        other_ids = np.array([classes[n] for n in others])
        is_other = np.isin(lab, other_ids)
        _, (ix, iy, iz) = ndimage.distance_transform_edt(~is_other, sampling=spacing, return_indices=True)
        lab[freed] = lab[ix[freed], iy[freed], iz[freed]]
        out[freed] = -900.0
    else:
        lab[freed] = 0
        out[freed] = 30.0
    return Corrupted(_clip(out), lab, f"{lobe} kept={keep:.2f}")


# ----------------------------------------------------------------------------- devices and foreign bodies


def _tube_mask(shape, spacing, points_vox: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of a polyline through voxel points (at least the points themselves)."""
    m = np.zeros(shape, bool)
    for a, b in zip(points_vox[:-1], points_vox[1:]):
        n = int(np.ceil(np.abs(b - a).max())) * 2 + 2
        for t in np.linspace(0.0, 1.0, n):
            p = np.clip(np.rint(a + t * (b - a)).astype(int), 0, np.array(shape) - 1)
            m[tuple(p)] = True
    r_vox = [max(0, int(round(radius_mm / s - 0.5))) for s in spacing]
    if any(r_vox):
        m = ndimage.binary_dilation(m, structure=np.ones([2 * r + 1 for r in r_vox], bool))
    return m


def _anterior_chest_point(body: np.ndarray, side_sign: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """A voxel just under the anterior skin of the upper chest on one side (+1 right, -1 left)."""
    c = _centre(body)
    nz = body.shape[2]
    z = int(np.clip(round(c[2] + rng.uniform(0.15, 0.3) * nz), 0, nz - 1))
    x = int(np.clip(round(c[0] + side_sign * rng.uniform(0.2, 0.3) * body.shape[0]), 0, body.shape[0] - 1))
    col = np.nonzero(body[x, :, z])[0]
    y = int(col.max()) - max(1, int(round(8.0 / spacing[1]))) if len(col) else int(c[1])
    return np.array([x, max(y, 0), z], float)


def _device(img, lab, spacing, rng, classes, *, side: float, hu_box: float, hu_lead: float,
            size_mm: tuple[float, float, float], name: str) -> Corrupted:
    body = body_mask(img)
    p = _anterior_chest_point(body, side, rng, spacing)
    x, y, z = _grid_mm(img.shape, spacing, p)
    box = (np.abs(x) < size_mm[0] / 2) & (np.abs(y) < size_mm[1] / 2) & (np.abs(z) < size_mm[2] / 2)
    heart = _mask(lab, classes, ["heart"])
    target = _centre(heart, fallback=_centre(body))
    mid = (p + target) / 2 + np.array([0.0, 0.0, 0.15 * img.shape[2]])
    lead = _tube_mask(img.shape, spacing, np.stack([p, mid, target]), 1.5)
    out, lab = img.copy(), lab.copy()
    out[lead] = hu_lead
    out[box] = hu_box
    lab[box] = 0
    return Corrupted(_clip(out), lab, f"{name} at voxel {tuple(int(v) for v in p)}")


@_register("device", changes_labels=True)
def _pacemaker(img, lab, spacing, rng, classes):
    """Pacemaker: a 3000 HU can (45x12x50 mm) under the left anterior chest skin, lead into the heart."""
    return _device(img, lab, spacing, rng, classes, side=-1.0, hu_box=3000.0, hu_lead=2500.0,
                   size_mm=(45.0, 12.0, 50.0), name="pacemaker")


@_register("device", changes_labels=True)
def _port_catheter(img, lab, spacing, rng, classes):
    """Chest port: a 1500 HU reservoir (30x14x30 mm) in the right anterior chest, 400 HU catheter to the heart."""
    return _device(img, lab, spacing, rng, classes, side=1.0, hu_box=1500.0, hu_lead=400.0,
                   size_mm=(30.0, 14.0, 30.0), name="port")


@_register("device", changes_labels=False)
def _ecg_wires(img, lab, spacing, rng, classes):
    """ECG electrodes and wires on the skin: 2000 HU discs on the anterior surface joined by wires in the air."""
    body = body_mask(img)
    out = img.copy()
    pts = []
    for _ in range(int(rng.integers(3, 6))):
        side = float(rng.choice([-1.0, 1.0]))
        p = _anterior_chest_point(body, side, rng, spacing)
        col = np.nonzero(body[int(p[0]), :, int(p[2])])[0]
        if len(col):
            p[1] = min(body.shape[1] - 1, int(col.max()) + 1)  # first air voxel in front of the skin
        pts.append(p)
    wire = _tube_mask(img.shape, spacing, np.stack(sorted(pts, key=lambda q: q[0])), 1.0) & ~body
    for p in pts:
        out[tuple(p.astype(int))] = 2000.0
    out[wire] = 2000.0
    return Corrupted(_clip(out), lab, f"electrodes={len(pts)}")


# ----------------------------------------------------------------------------- anatomical variants


@_register("anatomy", changes_labels=True)
def _situs_inversus(img, lab, spacing, rng, classes):
    """Situs inversus totalis: the whole body mirrored left-right about the body's midline; paired left/right
    classes swap names (the trilobed lung, now on the left, keeps its lobes' right-side names)."""
    c = _centre(body_mask(img))
    # mirror about the body's centre: index i -> 2c - i, rounded to the grid
    src = np.clip(np.rint(2 * c[0] - np.arange(img.shape[0])).astype(int), 0, img.shape[0] - 1)
    out, new = img[src], lab[src]
    swapped = new.copy()
    for a, b in _PAIRS:
        if a in classes and b in classes:
            swapped[new == classes[a]] = classes[b]
            swapped[new == classes[b]] = classes[a]
    return Corrupted(_clip(out), swapped, f"mirror about x={c[0]:.1f}")


@_register("anatomy", changes_labels=True)
def _missing_lobe(img, lab, spacing, rng, classes):
    """Lobectomy: one lobe replaced by 20-40 HU post-operative fluid/fibrosis, labelled background."""
    lobe = _pick_lobe(lab, classes, rng)
    if lobe is None:
        return Corrupted(img, lab, "no lobe in the labels: unchanged")
    m = lab == classes[lobe]
    out, lab = img.copy(), lab.copy()
    out[m] = float(rng.uniform(20.0, 40.0))
    lab[m] = 0
    return Corrupted(_clip(out), lab, lobe)


@_register("anatomy", changes_labels=True)
def _scoliosis_shift(img, lab, spacing, rng, classes):
    """Scoliosis-like curve: each axial slice shifted left-right by A*sin(pi*t), A = 20-35 mm, t the slice's
    position along z (image and labels move together, air enters at the edges)."""
    amp = float(rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 35.0))
    nz = img.shape[2]
    shifts = np.rint(amp * np.sin(np.pi * (np.arange(nz) + 0.5) / nz) / spacing[0]).astype(int)
    out = np.full_like(img, HU_MIN)
    new = np.zeros_like(lab)
    nx = img.shape[0]
    for k, s in enumerate(shifts):
        if s >= 0:
            out[s:, :, k], new[s:, :, k] = img[: nx - s, :, k], lab[: nx - s, :, k]
        else:
            out[: nx + s, :, k], new[: nx + s, :, k] = img[-s:, :, k], lab[-s:, :, k]
    return Corrupted(_clip(out), new, f"amplitude={amp:+.4f}mm max_shift={int(np.abs(shifts).max())}vox")


# ----------------------------------------------------------------------------- wrong inputs


@_register("wrong_input", changes_labels=True)
def _abdomen_crop(img, lab, spacing, rng, classes):
    """Wrong body region: the field moved 40-55% of its length caudally (towards the abdomen); the slices
    below the original field repeat the lowest one (image and labels)."""
    nz = img.shape[2]
    s = max(1, int(round(rng.uniform(0.4, 0.55) * nz)))
    src = np.clip(np.arange(nz) - s, 0, nz - 1)
    return Corrupted(_clip(img[:, :, src]), lab[:, :, src], f"shift={s} slices")


@_register("wrong_input", changes_labels=False)
def _mr_like(img, lab, spacing, rng, classes):
    """Another modality: a T1-weighted-MR-like image (air 0, fat brightest, muscle mid, bone and fluid dark,
    arbitrary units up to ~1000) with a smooth 20% bias field, fed where HU are expected."""
    xp = [-1000.0, -150.0, -80.0, 10.0, 60.0, 300.0, 3071.0]
    fp = [0.0, 700.0, 950.0, 250.0, 450.0, 120.0, 60.0]
    sig = np.interp(img, xp, fp).astype(np.float32)
    bias = 1.0 + 0.2 * _smooth_field(rng, img.shape, spacing, 60.0)
    return Corrupted(np.clip(sig * bias, 0.0, None).astype(np.float32), lab, "T1-like intensities")


@_register("wrong_input", changes_labels=False)
def _missing_rescale(img, lab, spacing, rng, classes):
    """Stored values read without the rescale intercept: every voxel +1024 (air reads 0), up to 4095."""
    return Corrupted(np.clip(img + 1024.0, 0.0, 4095.0).astype(np.float32), lab, "intercept +1024 ignored")


@_register("wrong_input", changes_labels=True)
def _flipped_si(img, lab, spacing, rng, classes):
    """Wrong orientation in the header: superior and inferior swapped (image and labels flipped along z)."""
    return Corrupted(img[:, :, ::-1].copy(), lab[:, :, ::-1].copy(), "z flipped")
