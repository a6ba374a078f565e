"""The anomaly-kind library (engine.corruptions): each kind changes what it says, on phantoms and a real CT."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from engine import corruptions as C
from engine.labels import THORAX_CLASSES, totalsegmentator_to_thorax
from engine.phantoms import DEFAULT_SPACING, make_phantom
from tests._data import totalseg_dir

L = {n: i for i, n in enumerate(THORAX_CLASSES)}
SP = DEFAULT_SPACING


@pytest.fixture(scope="module")
def ph():
    return make_phantom(5, seed=0)


def run(kind, ph, seed=3):
    return C.corrupt(kind, ph.image, ph.labels, spacing=SP, rng=seed)


def centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def test_every_family_holds_kinds_and_every_kind_is_registered_with_a_known_family():
    assert set(C.FAMILIES) == {k.family for k in C.KINDS.values()}
    assert len(C.KINDS) >= 20
    assert all(len(C.kinds_of(f)) >= 3 for f in C.FAMILIES)


@pytest.mark.parametrize("kind", list(C.KINDS))
def test_each_kind_is_deterministic_changes_the_image_and_leaves_its_inputs_alone(kind, ph):
    img0, lab0 = ph.image.copy(), ph.labels.copy()
    a, b = run(kind, ph, 7), run(kind, ph, 7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.detail == b.detail
    np.testing.assert_array_equal(ph.image, img0)
    np.testing.assert_array_equal(ph.labels, lab0)
    assert a.image.shape == ph.image.shape and a.image.dtype == np.float32
    assert (a.image != ph.image).any()
    if not C.KINDS[kind].changes_labels:
        np.testing.assert_array_equal(a.labels, ph.labels)


def test_unknown_kind_and_mismatched_shapes_are_refused_with_what_to_use(ph):
    with pytest.raises(ValueError, match="unknown anomaly kind 'nope'; use one of"):
        C.corrupt("nope", ph.image, ph.labels, spacing=SP, rng=0)
    with pytest.raises(ValueError, match="same shape"):
        C.corrupt("hu_offset", ph.image, ph.labels[:-1], spacing=SP, rng=0)


def test_calibration_offset_shifts_the_mean_hu_inside_the_body_by_the_offset(ph):
    out = run("hu_offset", ph)
    off = float(re.search(r"offset=([-+\d.]+)", out.detail).group(1))
    assert 100 <= abs(off) <= 200
    body = C.body_mask(ph.image)
    unclipped = body & (ph.image + off > C.HU_MIN) & (ph.image + off < C.HU_MAX)
    assert unclipped.mean() > 0.3
    assert float((out.image - ph.image)[unclipped].mean()) == pytest.approx(off, abs=0.1)


def test_truncation_sets_everything_outside_the_fov_circle_to_air_and_background(ph):
    out = run("truncated_fov", ph)
    changed = out.image != ph.image
    outside = (out.image == C.HU_MIN) & (out.labels == 0)
    assert (outside | ~changed).all()
    # the kept region is a disc: a voxel column is either cut in every slice or in none
    cut_cols = (out.image == C.HU_MIN).all(axis=2) & (ph.image > C.HU_MIN).any(axis=2)
    assert cut_cols.any()
    assert (out.labels[cut_cols] == 0).all()
    body = C.body_mask(ph.image)
    assert (out.labels[body & ~cut_cols[..., None]] == ph.labels[body & ~cut_cols[..., None]]).all()


def test_rings_are_the_same_in_every_slice_and_symmetric_about_the_isocentre(ph):
    out = run("ring_artifact", ph)
    d = (out.image - ph.image).astype(np.float64)
    ok = (out.image > C.HU_MIN) & (out.image < C.HU_MAX)
    # same ring in two slices wherever neither is clipped
    both = ok[:, :, 10] & ok[:, :, 25]
    np.testing.assert_allclose(d[:, :, 10][both], d[:, :, 25][both], atol=1e-3)
    # x -> n-1-x about the grid centre leaves the radius, hence the ring, unchanged
    mirrored = ok & ok[::-1]
    np.testing.assert_allclose(d[mirrored], d[::-1][mirrored], atol=1e-3)
    assert d.max() > 50 and d.min() < -50


def test_streaks_touch_only_a_slab_of_three_to_six_slices_with_bright_and_dark_lines(ph):
    out = run("streak_artifact", ph)
    d = out.image - ph.image
    slices = np.nonzero((d != 0).any(axis=(0, 1)))[0]
    assert 3 <= len(slices) <= 6 and np.all(np.diff(slices) == 1)
    assert d.max() > 100 and d.min() < -100


def test_mistimed_contrast_brightens_the_heart_and_leaves_the_aorta_unenhanced(ph):
    out = run("contrast_timing", ph)
    heart = ph.labels == L["heart"]
    assert 250 <= np.median(out.image[heart] - ph.image[heart]) <= 400
    assert np.median(out.image[ph.labels == L["aorta"]]) == pytest.approx(40.0, abs=1.0)


def test_slice_gaps_blank_whole_axial_slices_and_nothing_else(ph):
    out = run("slice_gaps", ph)
    gone = [int(s) for s in out.detail.split("=")[1].split(",")]
    assert 2 <= len(gone) <= 6
    assert (out.image[:, :, gone] == C.HU_MIN).all() and (out.labels[:, :, gone] == 0).all()
    keep = np.setdiff1d(np.arange(ph.image.shape[2]), gone)
    np.testing.assert_array_equal(out.image[:, :, keep], ph.image[:, :, keep])


def test_motion_blurs_along_z_and_puts_ghost_signal_in_the_air_around_the_body(ph):
    out = run("motion_ghosting", ph)
    air = ~C.body_mask(ph.image) & (ph.image < -900)
    assert out.image[air].mean() > ph.image[air].mean() + 50
    # blur along z: slice-to-slice differences shrink
    assert np.abs(np.diff(out.image, axis=2)).mean() < np.abs(np.diff(ph.image, axis=2)).mean()


def test_low_dose_noise_is_added_inside_the_body_only(ph):
    out = run("low_dose_noise", ph)
    body = C.body_mask(ph.image)
    np.testing.assert_array_equal(out.image[~body], ph.image[~body])
    sd = float(re.search(r"noise_sd=(\d+)", out.detail).group(1))
    lung = np.isin(ph.labels, [L[n] for n in C.LOBES])  # far from the clip limits
    assert np.std(out.image[lung] - ph.image[lung]) == pytest.approx(sd, rel=0.15)


def test_consolidation_makes_part_of_one_lobe_airless_and_keeps_the_labels(ph):
    out = run("consolidation", ph)
    changed = out.image != ph.image
    assert len(np.unique(ph.labels[changed])) == 1 and THORAX_CLASSES[int(ph.labels[changed][0])] in C.LOBES
    assert out.image[changed].mean() > -50
    np.testing.assert_array_equal(out.labels, ph.labels)


def test_effusion_fills_the_posterior_lower_part_of_one_lung_with_fluid_labelled_background(ph):
    out = run("pleural_effusion", ph)
    changed = out.image != ph.image
    was = ph.labels[changed]
    side = out.detail.split()[0]
    assert set(THORAX_CLASSES[i] for i in np.unique(was)) <= {n for n in C.LOBES if n.endswith(side)}
    assert (out.labels[changed] == 0).all() and (10 <= out.image[changed]).all() and (out.image[changed] <= 20).all()
    lung = np.isin(ph.labels, [L[n] for n in C.LOBES if n.endswith(side)])
    assert centroid(changed)[1] < centroid(lung)[1] and centroid(changed)[2] < centroid(lung)[2]
    # RAS: the patient's left is at low x
    mid = centroid(C.body_mask(ph.image))[0]
    assert (centroid(changed)[0] < mid) == (side == "left")


def test_a_lung_mass_is_a_compact_soft_tissue_blob_labelled_background(ph):
    out = run("lung_mass", ph)
    changed = out.image != ph.image
    r = float(re.search(r"r=(\d+)mm", out.detail).group(1))
    pts = np.argwhere(changed) * np.array(SP)
    assert np.ptp(pts, axis=0).max() <= 2 * 1.25 * r * 1.9  # lobulated sphere, generous bound
    assert (out.labels[changed] == 0).all() and abs(np.median(out.image[changed]) - 40) < 15


def test_atelectasis_shrinks_a_lobe_to_an_airless_medial_remnant_and_conserves_the_lung(ph):
    out = run("atelectasis", ph)
    lobe = out.detail.split()[0]
    side = "left" if lobe.endswith("left") else "right"
    before, after = (ph.labels == L[lobe]).sum(), (out.labels == L[lobe]).sum()
    assert 0.2 * before <= after <= 0.4 * before
    assert out.image[out.labels == L[lobe]].min() >= 40
    same_side = [L[n] for n in C.LOBES if n.endswith(side)]
    assert np.isin(out.labels, same_side).sum() == np.isin(ph.labels, same_side).sum()


@pytest.mark.parametrize(("kind", "hu", "left"), [("pacemaker", 3000.0, True), ("port_catheter", 1500.0, False)])
def test_devices_sit_in_the_anterior_chest_on_their_side(kind, hu, left, ph):
    out = run(kind, ph)
    dev = out.image == hu
    assert dev.sum() >= 2
    c, body_c = centroid(dev), centroid(C.body_mask(ph.image))
    assert (c[0] < body_c[0]) == left and c[1] > body_c[1]
    assert (out.image > ph.image + 300).sum() > dev.sum()  # the lead / catheter as well


def test_ecg_wires_change_only_voxels_outside_or_on_the_skin(ph):
    out = run("ecg_wires", ph)
    changed = out.image != ph.image
    inner = C.body_mask(ph.image)
    inner = ndimage.binary_erosion(inner, iterations=2)
    assert changed.any() and not (changed & inner).any()
    assert out.image[changed].max() == 2000.0


def test_situs_inversus_mirrors_the_heart_centroid_about_the_midline_and_swaps_left_and_right(ph):
    out = run("situs_inversus", ph)
    mid = centroid(C.body_mask(ph.image))[0]
    h0, h1 = centroid(ph.labels == L["heart"]), centroid(out.labels == L["heart"])
    assert h1[0] == pytest.approx(2 * mid - h0[0], abs=1.0) and (h0[0] - mid) * (h1[0] - mid) < 0
    assert abs(h1[1] - h0[1]) < 1e-6 and abs(h1[2] - h0[2]) < 1e-6
    # the lobes now on the patient's left are the former right lobes, with their names swapped
    assert centroid(out.labels == L["lung_upper_lobe_left"])[0] < mid
    assert centroid(out.labels == L["lung_middle_lobe_right"])[0] < mid


def test_missing_lobe_removes_one_lobe_from_labels_and_image(ph):
    out = run("missing_lobe", ph)
    lobe = out.detail
    assert (out.labels == L[lobe]).sum() == 0 and (ph.labels == L[lobe]).sum() > 0
    gone = ph.labels == L[lobe]
    assert (out.image[gone] >= 20).all() and (out.image[gone] <= 40).all()


def test_scoliosis_shifts_each_slice_sideways_along_a_sine_with_its_labels(ph):
    out = run("scoliosis_shift", ph)
    amp = float(re.search(r"amplitude=([-+\d.]+)mm", out.detail).group(1))
    nz = ph.image.shape[2]
    expect = np.rint(amp * np.sin(np.pi * (np.arange(nz) + 0.5) / nz) / SP[0]).astype(int)
    v = L["vertebrae"]
    for k in range(nz):
        a, b = np.argwhere(ph.labels[:, :, k] == v), np.argwhere(out.labels[:, :, k] == v)
        if len(a) and len(a) == len(b):
            assert b[:, 0].mean() - a[:, 0].mean() == pytest.approx(expect[k], abs=1e-6)
    assert np.abs(expect).max() >= 2


def test_abdomen_crop_moves_the_lungs_up_and_out_of_the_field(ph):
    out = run("abdomen_crop", ph)
    s = int(re.search(r"shift=(\d+)", out.detail).group(1))
    lung0 = np.isin(ph.labels, [L[n] for n in C.LOBES])
    lung1 = np.isin(out.labels, [L[n] for n in C.LOBES])
    assert lung1.sum() < lung0.sum()
    np.testing.assert_array_equal(out.image[:, :, s:], ph.image[:, :, : ph.image.shape[2] - s])


def test_mr_like_intensities_are_non_negative_with_fat_brighter_than_muscle_and_bone_dark(ph):
    out = run("mr_like", ph)
    assert out.image.min() >= 0
    fat = (ph.image > -130) & (ph.image < -70)
    muscle = (ph.image > 40) & (ph.image < 60)
    bone = ph.image > 700
    assert out.image[fat].mean() > out.image[muscle].mean() > out.image[bone].mean()
    assert out.image[ph.image <= -1000].max() < 50


def test_missing_rescale_adds_the_1024_intercept(ph):
    out = run("missing_rescale", ph)
    ok = ph.image + 1024 <= 4095
    np.testing.assert_array_equal(out.image[ok], ph.image[ok] + 1024)


def test_flipped_orientation_is_the_volume_upside_down(ph):
    out = run("flipped_si", ph)
    np.testing.assert_array_equal(out.image, ph.image[:, :, ::-1])
    np.testing.assert_array_equal(out.labels, ph.labels[:, :, ::-1])


# ----------------------------------------------------------------------------- a real CT


@pytest.fixture(scope="module")
def real_ct():
    d = totalseg_dir()
    img = nib.as_closest_canonical(nib.load(d / "example_ct_sm.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(d / "example_seg.nii.gz"))
    names = {int(k): v for k, v in json.loads((d / "classes_total.json").read_text()).items()}
    ts = np.asarray(seg.dataobj).astype(np.int64)
    lab = np.zeros(ts.shape, np.uint8)
    for ts_id, name in totalsegmentator_to_thorax(names).items():
        lab[ts == ts_id] = L[name]
    return np.asarray(img.dataobj, dtype=np.float32), lab, tuple(float(z) for z in img.header.get_zooms()[:3])


@pytest.mark.parametrize("kind", list(C.KINDS))
def test_every_kind_applies_to_the_real_totalsegmentator_ct(kind, real_ct):
    img, lab, sp = real_ct
    out = C.corrupt(kind, img, lab, spacing=sp, rng=1)
    assert out.image.shape == img.shape and np.isfinite(out.image).all()
    assert (out.image != img).any() or "unchanged" in out.detail


def test_on_the_real_ct_the_offset_shift_holds_and_lobe_kinds_act_on_its_lobes(real_ct):
    img, lab, sp = real_ct
    out = C.corrupt("hu_offset", img, lab, spacing=sp, rng=1)
    off = float(re.search(r"offset=([-+\d.]+)", out.detail).group(1))
    ok = C.body_mask(img) & (img + off > C.HU_MIN) & (img + off < C.HU_MAX)
    assert float((out.image - img)[ok].mean()) == pytest.approx(off, abs=0.1)
    miss = C.corrupt("missing_lobe", img, lab, spacing=sp, rng=1)
    assert (lab == L[miss.detail]).any() and not (miss.labels == L[miss.detail]).any()
    eff = C.corrupt("pleural_effusion", img, lab, spacing=sp, rng=1)
    assert (eff.labels == 0).sum() > (lab == 0).sum()


def test_on_the_real_ct_situs_inversus_mirrors_the_aorta_about_the_body_midline(real_ct):
    img, lab, sp = real_ct
    out = C.corrupt("situs_inversus", img, lab, spacing=sp, rng=1)
    mid = centroid(C.body_mask(img))[0]
    a0, a1 = centroid(lab == L["aorta"]), centroid(out.labels == L["aorta"])
    assert a1[0] == pytest.approx(2 * mid - a0[0], abs=1.0)


def test_a_phantom_with_a_corruption_is_the_normal_phantom_with_that_kind_applied():
    normal = make_phantom(4, seed=2)
    bad = make_phantom(4, seed=2, corruption="lung_mass")
    again = make_phantom(4, seed=2, corruption="lung_mass")
    np.testing.assert_array_equal(bad.image, again.image)
    changed = bad.image != normal.image
    assert changed.any() and (bad.labels[changed] == 0).all()
    assert bad.metadata["anomaly_type"] == "lung_mass" and bad.metadata["anomaly_family"] == "pathology"
    assert bad.metadata["anomaly"] is True and bad.metadata["patient_id"] == normal.metadata["patient_id"]
    with pytest.raises(ValueError, match="unknown corruption"):
        make_phantom(4, seed=2, corruption="nope")
