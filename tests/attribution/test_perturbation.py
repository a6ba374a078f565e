"""KernelSHAP and occlusion over RoIs against hand computations and captum called directly."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from captum.attr import KernelShap
from monai.inferers import sliding_window_inference

from engine.attribution import SlidingWindow, explain_volume
from engine.attribution.perturbation import feature_mask, spread
from tests.attribution.conftest import SHAPE

ROI = (8, 6, 8)
OVERLAP = 0.25
WINDOW = SlidingWindow(roi_size=ROI, overlap=OVERLAP)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand((1, *SHAPE), generator=g)


def stitched(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, ROI, 1, model, overlap=OVERLAP)[0]


class MaskedStitchedSum(torch.nn.Module):
    """S_c(x) = Σ_{v∈M_c} Ẑ_c(v; x), M_c fixed from the clean prediction: the scalar captum explains."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor, c: int) -> None:
        super().__init__()
        self.model, self.mask, self.c = model, mask, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(stitched(self.model, x[i:i + 1])[self.c] * self.mask).sum() for i in range(x.shape[0])])


def mass_of(e, sign: str = "abs") -> pl.DataFrame:
    return e.importances.filter(stat="mass", sign=sign)


def test_occlusion_over_segments_equals_hand_computation(model, image):
    e = explain_volume(model, image, method="occlusion", window=WINDOW, return_maps=False)
    x = image[None]
    pred = stitched(model, x).argmax(0)
    base = float(image.min())
    present = torch.unique(pred).tolist()
    assert len(present) >= 2
    for c in present:
        s_clean = float((stitched(model, x)[c] * (pred == c)).sum())
        phis = {}
        for r in present:
            xr = x.clone()
            xr[0, :, pred == r] = base
            phis[str(r)] = s_clean - float((stitched(model, xr)[c] * (pred == c)).sum())
        total = sum(abs(v) for v in phis.values())
        got = {row["roi"]: row["value"] for row in mass_of(e).filter(target=str(c)).iter_rows(named=True)}
        for r, phi in phis.items():
            assert got[r] == pytest.approx(abs(phi) / total, rel=1e-4, abs=1e-7)
        # mean = φ_r / |r| (the uniform-spread rule), signed parts separately
        means = {row["roi"]: row["value"] for row in e.importances.filter(target=str(c), stat="mean", sign="pos")
                 .iter_rows(named=True)}
        for r, phi in phis.items():
            assert means[r] == pytest.approx(max(phi, 0.0) / int((pred == int(r)).sum()), rel=1e-4, abs=1e-7)
    # one forward for the clean input plus one per segment, for all classes together
    assert e.work["passes"] == 1 + len(present)


def test_kernel_shap_equals_captum_called_directly(model, image):
    n_samples, seed = 40, 3
    e = explain_volume(model, image, method="kernel_shap", window=WINDOW, n_samples=n_samples,
                       seed=seed, return_maps=False)
    x = image[None]
    pred = stitched(model, x).argmax(0)
    mask, names = feature_mask(pred, "segments")
    full_mask = mask[None, None]
    present = torch.unique(pred).tolist()
    for c in present:
        torch.manual_seed(seed)
        coefs = KernelShap(MaskedStitchedSum(model, pred == c, c)).attribute(
            x, baselines=float(image.min()), feature_mask=full_mask, n_samples=n_samples, return_input_shape=False,
        )[0]
        total = float(coefs.abs().sum())
        got = {row["roi"]: row["value"] for row in mass_of(e).filter(target=str(c)).iter_rows(named=True)}
        for i, r in enumerate(names):
            assert got[r] == pytest.approx(abs(float(coefs[i])) / total, rel=1e-3, abs=1e-6)
    # the cache makes the per-class KernelShap calls share their forwards
    assert e.work["passes"] <= n_samples + 1


@pytest.mark.parametrize("method,options", [
    ("occlusion", {}),
    ("kernel_shap", {"n_samples": 30}),
    ("kernel_shap", {"n_samples": 30, "features": "cubes", "cube_size": 4}),
    ("occlusion", {"features": "cubes", "cube_size": (6, 5, 4)}),
])
def test_masses_sum_to_one_per_target(model, image, method, options):
    e = explain_volume(model, image, method=method, window=WINDOW, **options)
    sums = mass_of(e).group_by("target").agg(pl.col("value").sum())
    assert sums.height == len(e.targets) >= 2
    for v in sums["value"]:
        assert v == pytest.approx(1.0, abs=1e-6)


def test_fixed_seed_is_deterministic(model, image):
    a = explain_volume(model, image, method="kernel_shap", window=ROI, n_samples=25, seed=5,
                       features="cubes", cube_size=4, return_maps=True)
    b = explain_volume(model, image, method="kernel_shap", window=ROI, n_samples=25, seed=5,
                       features="cubes", cube_size=4, return_maps=True)
    c = explain_volume(model, image, method="kernel_shap", window=ROI, n_samples=25, seed=6,
                       features="cubes", cube_size=4, return_maps=True)
    assert a.importances.equals(b.importances)
    assert all(torch.equal(a.maps[k], b.maps[k]) for k in a.maps)
    assert not all(torch.equal(a.maps[k], c.maps[k]) for k in a.maps)


def test_global_rng_is_left_alone(model, image):
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    explain_volume(model, image, method="kernel_shap", window=ROI, n_samples=10)
    assert torch.equal(torch.rand(3), expected)


def test_cubes_and_spread():
    pred = torch.zeros((5, 4, 3), dtype=torch.long)
    mask, names = feature_mask(pred, "cubes", cube_size=2)
    assert len(names) == 3 * 2 * 2 and int(mask.max()) == len(names) - 1
    assert names[0] == "cube_0_0_0" and names[-1] == "cube_2_1_1"
    assert int(mask[4, 3, 2]) == len(names) - 1 and int(mask[0, 0, 2]) == 1
    phi = torch.arange(12, dtype=torch.float32)[None]
    maps = spread(phi, mask)
    for f in range(12):  # every feature's voxels sum back to its attribution
        assert float(maps[0][mask == f].sum()) == pytest.approx(float(phi[0, f]))


def test_bad_options_are_refused(model, image):
    with pytest.raises(ValueError, match="features"):
        explain_volume(model, image, method="occlusion", window=ROI, features="voxels")
    with pytest.raises(ValueError, match="baseline"):
        explain_volume(model, image, method="occlusion", window=ROI, baseline="blur")
    with pytest.raises(ValueError, match="legacy"):
        explain_volume(model, image, method="occlusion", window=ROI, objective="legacy")


def test_a_given_partition_replaces_the_predicted_segments_as_features(model, image):
    # the paper's average-sensitivity variant explains a perturbed input over the *clean* segments;
    # here any label map can be the partition: two halves of the volume
    partition = torch.zeros(SHAPE, dtype=torch.long)
    partition[6:] = 1
    e = explain_volume(model, image, method="occlusion", window=WINDOW, partition=partition, return_maps=True)
    x = image[None]
    pred = stitched(model, x).argmax(0)
    base = float(image.min())
    for c in torch.unique(pred).tolist():
        s_clean = float((stitched(model, x)[c] * (pred == c)).sum())
        for r in (0, 1):
            xr = x.clone()
            xr[0, :, partition == r] = base
            phi = s_clean - float((stitched(model, xr)[c] * (pred == c)).sum())
            # spread uniformly: every voxel of half r carries φ_r / |r|
            got = e.maps[str(c)][partition == r]
            assert torch.allclose(got, torch.full_like(got, phi / int((partition == r).sum())), rtol=1e-4, atol=1e-7)
