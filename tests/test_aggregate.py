"""RoI aggregation (mass and mean for abs/pos/neg) against hand-computed values."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from engine.aggregate import RoISet, aggregate, roi_statistics


def _value(frame: pl.DataFrame, target: str, roi: str, stat: str, sign: str) -> float:
    row = frame.filter(
        (pl.col("target") == target) & (pl.col("roi") == roi) & (pl.col("stat") == stat) & (pl.col("sign") == sign)
    )
    assert row.height == 1, (target, roi, stat, sign)
    return float(row["value"][0])


def test_hand_computed_example():
    # One 2x3x1 map per target. RoI labels: a a b / b c -1 (the last voxel is in no RoI).
    labels = torch.tensor([[[0], [0], [1]], [[1], [2], [-1]]])
    maps = torch.tensor([
        [[[1.0], [-2.0], [3.0]], [[0.0], [-4.0], [2.0]]],  # target t1
        [[[0.5], [0.5], [0.0]], [[0.0], [0.0], [1.0]]],  # target t2
    ])
    df = aggregate(maps, RoISet(labels, ("a", "b", "c")), ["t1", "t2"])
    # t1: |a| = 1 + 2 = 3, |b| = 3 + 0 = 3, |c| = 4, whole map |.| = 12 (includes the 2 outside any RoI)
    assert _value(df, "t1", "a", "mass", "abs") == pytest.approx(3 / 12)
    assert _value(df, "t1", "b", "mass", "abs") == pytest.approx(3 / 12)
    assert _value(df, "t1", "c", "mass", "abs") == pytest.approx(4 / 12)
    # positive part: a = 1, b = 3, c = 0, total 1 + 3 + 2 = 6
    assert _value(df, "t1", "a", "mass", "pos") == pytest.approx(1 / 6)
    assert _value(df, "t1", "b", "mass", "pos") == pytest.approx(3 / 6)
    assert _value(df, "t1", "c", "mass", "pos") == 0.0
    # negative part (as a magnitude): a = 2, b = 0, c = 4, total 6
    assert _value(df, "t1", "a", "mass", "neg") == pytest.approx(2 / 6)
    assert _value(df, "t1", "c", "mass", "neg") == pytest.approx(4 / 6)
    # mean = RoI sum / RoI size: a has 2 voxels, b 2, c 1
    assert _value(df, "t1", "a", "mean", "abs") == pytest.approx(3 / 2)
    assert _value(df, "t1", "b", "mean", "pos") == pytest.approx(3 / 2)
    assert _value(df, "t1", "c", "mean", "neg") == pytest.approx(4.0)
    # t2 has no negative attribution: its neg masses are 0 (not NaN)
    assert _value(df, "t2", "a", "mass", "neg") == 0.0
    assert _value(df, "t2", "a", "mass", "abs") == pytest.approx(1.0 / 2.0)
    assert df.height == 2 * 3 * 2 * 3  # targets x RoIs x stats x signs


def test_joined_rois_are_sums_of_their_parts():
    labels = torch.tensor([[[0, 1, 2, 2]]])
    maps = torch.tensor([[[[1.0, -3.0, 2.0, 2.0]]]])
    df = aggregate(maps, RoISet(labels, ("x", "y", "z"), {"xy": ("x", "y")}), ["t"])
    assert _value(df, "t", "xy", "mass", "abs") == pytest.approx(4 / 8)
    assert _value(df, "t", "xy", "mean", "abs") == pytest.approx(4 / 2)
    assert _value(df, "t", "xy", "mean", "neg") == pytest.approx(3 / 2)


def test_an_empty_roi_keeps_its_row_with_mass_0_and_a_null_mean_and_masses_of_a_partition_sum_to_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 5, 4), generator=g)  # label 4 unused
    maps = torch.randn((3, 6, 5, 4), generator=g)
    df = aggregate(maps, RoISet(labels, ("r0", "r1", "r2", "r3", "empty")), ["a", "b", "c"])
    assert df.height == 3 * 5 * 2 * 3
    empty = df.filter(pl.col("roi") == "empty")
    assert empty.height == 3 * 2 * 3
    assert empty.filter(pl.col("stat") == "mass")["value"].to_list() == [0.0] * 9
    assert empty.filter(pl.col("stat") == "mean")["value"].null_count() == 9  # null, not NaN
    assert df.filter(pl.col("roi") != "empty")["value"].null_count() == 0
    sums = df.filter((pl.col("stat") == "mass")).group_by(["target", "sign"]).agg(pl.col("value").sum())
    np.testing.assert_allclose(sums["value"].to_numpy(), 1.0, rtol=1e-12)


def test_statistics_equal_a_numpy_loop():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 5, (7, 6, 5), generator=g)
    maps = torch.randn((4, 7, 6, 5), generator=g)
    stats = roi_statistics(maps, labels, 5)
    a = maps.double().numpy()
    lab = labels.numpy()
    for k in range(4):
        for s, phi in enumerate((np.abs, lambda v: np.clip(v, 0, None), lambda v: np.clip(-v, 0, None))):
            total = phi(a[k]).sum()
            for r in range(5):
                inside = phi(a[k][lab == r]).sum()
                assert float(stats.sums[k, s, r]) == pytest.approx(inside, rel=1e-12, abs=1e-12)
                assert float(stats.mass[k, s, r]) == pytest.approx(inside / total, rel=1e-12)
                assert float(stats.mean[k, s, r]) == pytest.approx(inside / (lab == r).sum(), rel=1e-12)


def test_statistics_leave_float64_maps_alone_and_a_nan_reaches_every_sign_of_its_roi():
    labels = torch.tensor([[[0, 0, 1, -1]]])
    maps = torch.tensor([[[[1.0, -2.0, 3.0, -4.0]]], [[[float("nan"), 1.0, -1.0, 0.0]]]], dtype=torch.float64)
    before = maps.clone()
    stats = roi_statistics(maps, labels, 2)
    assert torch.equal(maps[0], before[0]) and maps[1, 0, 0, 0].isnan()  # not negated in place
    assert stats.sums[0].tolist() == [[3.0, 3.0], [1.0, 3.0], [2.0, 0.0]]  # abs / pos / neg x RoI 0, 1
    assert stats.totals[0].tolist() == [10.0, 4.0, 6.0]  # includes the voxel outside every RoI
    assert stats.sums[1, :, 0].isnan().all() and stats.totals[1].isnan().all()
    assert stats.sums[1, :, 1].tolist() == [1.0, 0.0, 1.0]


def test_labels_outside_the_named_rois_are_refused():
    maps = torch.ones((1, 1, 1, 3))
    with pytest.raises(ValueError, match=r"\[-1, 2\).*one name per label"):
        roi_statistics(maps, torch.tensor([[[0, 1, 2]]]), 2)
    with pytest.raises(ValueError, match="got values in"):
        roi_statistics(maps, torch.tensor([[[0, -2, 1]]]), 2)


def test_bad_roi_sets_are_refused():
    with pytest.raises(ValueError, match="unique"):
        RoISet(torch.zeros((2, 2, 2), dtype=torch.long), ("a", "a"))
    with pytest.raises(ValueError, match="unknown RoIs"):
        RoISet(torch.zeros((2, 2, 2), dtype=torch.long), ("a",), {"j": ("a", "b")})
    with pytest.raises(ValueError, match="differ in shape"):
        roi_statistics(torch.zeros((1, 2, 2, 2)), torch.zeros((3, 2, 2), dtype=torch.long), 1)
