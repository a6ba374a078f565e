"""Tests for the synthetic thorax CT phantoms (engine.phantoms)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from engine.labels import THORAX_CLASSES
from engine.phantoms import (
    ANOMALY_TYPES,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    SITE_PROTOCOLS,
    Phantom,
    anomaly_schedule,
    generate_cohort,
    iter_training_pairs,
    make_phantom,
)

L = {name: i for i, name in enumerate(THORAX_CLASSES)}
LOBES = [n for n in THORAX_CLASSES if n.startswith("lung_")]
META_KEYS = {
    "patient_id", "age", "sex", "site", "scanner_kernel", "contrast", "noise_hu",
    "random_group", "anomaly", "anomaly_type",
}


def centroid(ph: Phantom, name: str) -> np.ndarray:
    """World (RAS+, mm) centroid of one class."""
    idx = np.argwhere(ph.labels == L[name])
    assert len(idx), name
    return (ph.affine[:3, :3] @ idx.mean(axis=0)) + ph.affine[:3, 3]


def grad_energy(img: np.ndarray, mask: np.ndarray) -> float:
    g = np.sqrt(sum(d**2 for d in np.gradient(img.astype(np.float64))))
    return float(g[mask].mean())


@pytest.fixture(scope="module")
def normal() -> Phantom:
    return make_phantom(1, seed=0)


def test_defaults_and_affine(normal: Phantom) -> None:
    assert DEFAULT_SHAPE == (48, 40, 40) and DEFAULT_SPACING == (7.0, 7.0, 7.0)
    assert normal.image.shape == DEFAULT_SHAPE == normal.labels.shape
    assert normal.image.dtype == np.float32 and normal.labels.dtype == np.uint8
    assert normal.affine.shape == (4, 4) and normal.affine.dtype == np.float64
    assert nib.aff2axcodes(normal.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(normal.affine)[:3], DEFAULT_SPACING)
    # volume centred on the world origin
    far = normal.affine @ np.array([*(np.array(DEFAULT_SHAPE) - 1), 1.0])
    np.testing.assert_allclose(normal.affine[:3, 3], -far[:3])
    assert META_KEYS <= set(normal.metadata)
    assert normal.metadata["anomaly"] is False and normal.metadata["anomaly_type"] == "none"


def test_determinism_and_seed() -> None:
    a, b = make_phantom(3, seed=7), make_phantom(3, seed=7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.metadata == b.metadata
    c = make_phantom(3, seed=8)
    assert a.image.tobytes() != c.image.tobytes()
    assert a.labels.tobytes() != c.labels.tobytes()


def test_cohort_deterministic_and_size_independent(tmp_path) -> None:
    m5 = generate_cohort(tmp_path / "a", n_patients=5, seed=3)
    m5b = generate_cohort(tmp_path / "a", n_patients=5, seed=3)
    assert m5.equals(m5b)
    m8 = generate_cohort(tmp_path / "b", n_patients=8, seed=3, anomaly_fraction=0.125)
    meta_cols = [c for c in m5.columns if not c.endswith("_path")]
    assert m5.select(meta_cols).equals(m8.head(5).select(meta_cols))
    for i in range(5):
        for col in ("image_path", "label_path"):
            x = np.asarray(nib.load(m5[col][i]).dataobj)
            y = np.asarray(nib.load(m8[col][i]).dataobj)
            assert x.tobytes() == y.tobytes()


def test_all_classes_present_at_default_size() -> None:
    for i in range(4):
        for site in SITE_PROTOCOLS:
            counts = np.bincount(make_phantom(i, site=site).labels.ravel(), minlength=17)
            assert len(counts) == 17, "labels outside 0..16"
            missing = [THORAX_CLASSES[k] for k in range(17) if counts[k] < 3]
            assert not missing, (i, site, missing)


def test_anatomy_orientation(normal: Phantom) -> None:
    c = {n: centroid(normal, n) for n in THORAX_CLASSES[1:]}
    # RAS+: the patient's left is at negative world x
    for n in ("lung_upper_lobe_left", "lung_lower_lobe_left", "autochthon_left", "heart"):
        assert c[n][0] < 0, n
    for n in ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right",
              "autochthon_right"):
        assert c[n][0] > 0, n
    assert c["heart"][1] > c["vertebrae"][1] + 40  # anterior
    assert c["sternum"][1] > c["vertebrae"][1] + 80
    assert c["sternum"][1] > c["heart"][1]
    assert c["trachea"][2] > c["heart"][2] + 60  # superior
    assert c["thyroid_gland"][2] > c["trachea"][2]
    assert abs(c["sternum"][0]) < 10 and abs(c["vertebrae"][0]) < 10 and abs(c["trachea"][0]) < 10
    assert c["lung_upper_lobe_left"][2] > c["lung_lower_lobe_left"][2]
    assert c["lung_upper_lobe_right"][2] > c["lung_middle_lobe_right"][2]
    assert c["lung_middle_lobe_right"][1] > c["lung_lower_lobe_right"][1]
    assert c["autochthon_left"][1] < c["vertebrae"][1]
    # descending aorta, in slices below the heart's centre, runs left of the spine
    zs = np.argwhere(normal.labels == L["aorta"])
    world = zs @ normal.affine[:3, :3].T + normal.affine[:3, 3]
    low = world[world[:, 2] < c["heart"][2]]
    assert len(low) and low[:, 0].mean() < 0 and low[:, 1].mean() < c["heart"][1]


def test_hounsfield_ranges() -> None:
    for site in SITE_PROTOCOLS:
        ph = make_phantom(2, site=site)
        lung = np.isin(ph.labels, [L[n] for n in LOBES])
        assert ph.image[lung].mean() < -600
        assert ph.image[ph.labels == L["vertebrae"]].mean() > 300
        bone = np.isin(ph.labels, [L["ribs"], L["vertebrae"], L["sternum"]])
        assert ph.image[bone].mean() > 300
        for n in ("heart", "autochthon_left", "autochthon_right"):
            assert -100 < ph.image[ph.labels == L[n]].mean() < 400, n
        corners = ph.image[[0, -1]][:, [0, -1]]  # outside the body
        assert abs(float(corners.mean()) + 1000) < 30
        assert ph.image.min() >= -1024 and ph.image.max() <= 3071
        assert np.all(ph.image == np.rint(ph.image))


def test_contrast_phase_changes_blood() -> None:
    aorta = {}
    for i in range(30):
        ph = make_phantom(i, site="A")
        phase = ph.metadata["contrast"]
        aorta.setdefault(phase, ph.image[ph.labels == L["aorta"]].mean())
        if len(aorta) == 3:
            break
    assert set(aorta) == {"none", "arterial", "venous"}
    assert aorta["arterial"] > aorta["venous"] > aorta["none"] + 60


def test_nifti_roundtrip_and_manifest(tmp_path) -> None:
    df = generate_cohort(tmp_path / "c", n_patients=32, seed=0)
    assert df.columns[:3] == ["patient_id", "image_path", "label_path"]
    assert META_KEYS - {"patient_id"} <= set(df.columns)
    assert df["patient_id"].to_list() == [f"phantom-{i:03d}" for i in range(32)]
    on_disk = pl.read_csv(tmp_path / "c" / "manifest.csv")
    assert on_disk.columns == df.columns and on_disk.height == 32
    n_anom = int(df["anomaly"].sum())
    assert n_anom == 4  # 0.125 * 32
    assert (df["anomaly"] == (df["anomaly_type"] != "none")).all()
    assert set(df["anomaly_type"]) - {"none"} <= set(ANOMALY_TYPES)
    assert len(set(df["anomaly_type"]) - {"none"}) == 4  # types cycle, no repeats
    assert set(df["random_group"]) == {"g1", "g2"}
    for row in df.head(3).iter_rows(named=True):
        assert row["image_path"].startswith("/")
        ph = make_phantom(int(row["patient_id"][-3:]), seed=0, anomaly_type=row["anomaly_type"])
        img, lab = nib.load(row["image_path"]), nib.load(row["label_path"])
        np.testing.assert_allclose(img.affine, ph.affine)
        np.testing.assert_allclose(lab.affine, ph.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert img.shape == ph.image.shape == lab.shape
        np.testing.assert_array_equal(np.asarray(img.dataobj).astype(np.float32), ph.image)
        labels = np.asarray(lab.dataobj)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, ph.labels)
        for k in ("age", "sex", "site", "scanner_kernel", "contrast", "noise_hu", "random_group"):
            assert row[k] == ph.metadata[k], k


def test_anomaly_schedule() -> None:
    s40 = anomaly_schedule(40, seed=0)
    assert set(s40) == {"none", *ANOMALY_TYPES}  # every type once in 40
    assert anomaly_schedule(32, seed=0) == s40[:32]
    for seed in range(5):
        assert sum(t != "none" for t in anomaly_schedule(32, seed=seed)) == 4
    assert anomaly_schedule(10, anomaly_fraction=0.0) == ["none"] * 10
    assert "none" not in anomaly_schedule(10, anomaly_fraction=1.0)
    n = sum(t != "none" for t in anomaly_schedule(100, seed=1, anomaly_fraction=0.3))
    assert n in (30, 31)


def test_every_anomaly_changes_the_image() -> None:
    idx = 5
    base = make_phantom(idx)
    body = base.labels > 0
    lobe_counts = {n: int((base.labels == L[n]).sum()) for n in LOBES}
    for atype in ANOMALY_TYPES:
        ph = make_phantom(idx, anomaly_type=atype)
        assert ph.metadata["anomaly"] is True and ph.metadata["anomaly_type"] == atype
        diff = np.abs(ph.image - base.image)
        assert diff.mean() > 3.0 and diff.max() > 300, atype
        if atype == "mirrored":
            assert centroid(base, "heart")[0] < -5 < 5 < centroid(ph, "heart")[0]
            assert np.sign(centroid(ph, "aorta")[0]) != np.sign(centroid(base, "aorta")[0])
        elif atype == "missing_lobe":
            gone = [n for n in LOBES if not (ph.labels == L[n]).any()]
            assert len(gone) == 1 and gone[0] == ph.metadata["anomaly_detail"]
            m = base.labels == L[gone[0]]
            assert -100 < ph.image[m].mean() < 120  # collapsed tissue / fluid
        elif atype == "pleural_effusion":
            lost = (np.isin(base.labels, [L[n] for n in LOBES])) & (ph.labels == 0)
            assert lost.sum() > 0.1 * min(lobe_counts.values())
            assert -60 < ph.image[lost].mean() < 90
        elif atype == "metal_streak":
            assert ph.image.max() > 2500 and base.image.max() < 2500
            assert (diff[body] > 200).sum() > 30  # streaks reach well beyond the metal
        elif atype == "extreme_noise":
            assert ph.metadata["noise_hu"] >= 5 * base.metadata["noise_hu"]
            assert (ph.image - base.image).std() > 3 * base.metadata["noise_hu"]
        if atype not in ("mirrored", "missing_lobe", "pleural_effusion"):
            np.testing.assert_array_equal(ph.labels, base.labels)


def test_sites_differ_in_kernel_and_noise() -> None:
    kernels = {s: k for s, (k, _) in SITE_PROTOCOLS.items()}
    assert len(set(kernels.values())) == 3
    phs = {s: make_phantom(4, site=s) for s in SITE_PROTOCOLS}
    for s, ph in phs.items():
        lo, hi = SITE_PROTOCOLS[s][1]
        assert ph.metadata["scanner_kernel"] == kernels[s]
        assert lo <= ph.metadata["noise_hu"] <= hi
        np.testing.assert_array_equal(ph.labels, phs["A"].labels)  # same anatomy
    body = phs["A"].labels > 0
    soft = next(s for s, k in kernels.items() if k == "soft")
    sharp = next(s for s, k in kernels.items() if k == "sharp")
    assert grad_energy(phs[sharp].image, body) > 1.5 * grad_energy(phs[soft].image, body)
    # in a cohort the site alone determines the kernel
    metas = [make_phantom(i).metadata for i in range(12)]
    assert {m["site"] for m in metas} == set(SITE_PROTOCOLS)
    assert all(m["scanner_kernel"] == kernels[m["site"]] for m in metas)


def test_other_shapes_and_spacings() -> None:
    ph = make_phantom(0, shape=(30, 24, 26), spacing=(11.0, 11.5, 10.0))
    assert ph.image.shape == (30, 24, 26)
    np.testing.assert_allclose(np.diag(ph.affine)[:3], (11.0, 11.5, 10.0))
    assert {L["heart"], L["vertebrae"], L["lung_upper_lobe_left"]} <= set(np.unique(ph.labels))
    hi = make_phantom(0, shape=(84, 70, 70), spacing=(4.0, 4.0, 4.0))
    assert len(np.unique(hi.labels)) == 17


def test_iter_training_pairs() -> None:
    pairs = list(iter_training_pairs(seed=2, n=3, shape=(24, 20, 20), spacing=(14.0, 14.0, 14.0)))
    assert len(pairs) == 3
    for img, lab in pairs:
        assert img.shape == lab.shape == (24, 20, 20)
        assert img.dtype == np.float32 and lab.dtype == np.uint8
    ref = make_phantom(1, seed=2, shape=(24, 20, 20), spacing=(14.0, 14.0, 14.0))
    assert pairs[1][0].tobytes() == ref.image.tobytes()


@pytest.mark.parametrize(
    "call",
    [
        lambda p: generate_cohort(p, n_patients=0),
        lambda p: generate_cohort(p, anomaly_fraction=1.5),
        lambda p: generate_cohort(p, anomaly_fraction=-0.1),
        lambda p: generate_cohort(p, shape=(48, 40)),
        lambda p: generate_cohort(p, shape=(48, 0, 40)),
        lambda p: generate_cohort(p, spacing=(7.0, -1.0, 7.0)),
        lambda p: make_phantom(0, anomaly_type="alien"),
        lambda p: make_phantom(0, site="Z"),
        lambda p: make_phantom(-1),
        lambda p: make_phantom(0, shape=(48.5, 40, 40)),
        lambda p: next(iter_training_pairs(n=0)),
    ],
)
def test_invalid_parameters(tmp_path, call) -> None:
    with pytest.raises(ValueError):
        call(tmp_path)
