"""Attributions of an nnU-Net model are exactly the gradients of what nnUNetPredictor returns.

The independent computation is nnU-Net's own ``predict_sliding_window_return_logits`` (its padding,
slicers, gaussian, mirroring and stitching code, run through autograd). nnU-Net runs it under
``torch.inference_mode`` and accumulates in float16 with ``torch.div(..., out=)``, neither of which
autograd can pass; the test calls the undecorated functions (``__wrapped__``) with the module's
``torch`` seen through a proxy whose ``half`` is float64 and whose ``div(out=)`` is the out-of-place
division copied back. Every other line that runs is nnU-Net's.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the optional extra nnunet: pip install -c constraints.txt -e '.[nnunet]'")

from engine.attribution import Saliency, compute_maps  # noqa: E402
from engine.attribution.nnunet_windows import nnunet_geometry  # noqa: E402
from engine.attribution.sliding import SlidingWindow, stitched_forward  # noqa: E402
from engine.models import ModelSpec, load_model  # noqa: E402
from tests.nnunet._folders import write_folder  # noqa: E402

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("nnunet") / "model", LABELS, folds=(0, 1), mirror_axes=(0, 1, 2))


def _predictor(folder: Path, *, mirroring: bool, folds=(0, 1)):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, device=torch.device("cpu"),
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return p


class _Float64Torch:
    """``torch`` as nnU-Net's predictor module sees it, with float64 accumulation and autograd-able div."""

    half = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def div(a, b, out=None):
        return a / b if out is None else out.copy_(a / b)


def differentiable_nnunet_logits(predictors, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """nnU-Net's stitched logits, averaged over folds, as a differentiable function of ``x`` (C, *S).

    One predictor per fold: ``predict_logits_from_preprocessed_data`` reloads one network's weights
    in place for each fold, which would invalidate the graph of the previous fold.
    """
    import nnunetv2.inference.predict_from_raw_data as module
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setattr(module, "torch", _Float64Torch())
    out = None
    for predictor in predictors:
        for name in ("_internal_maybe_mirror_and_predict", "_internal_predict_sliding_window_return_logits"):
            setattr(predictor, name, types.MethodType(getattr(nnUNetPredictor, name).__wrapped__, predictor))
        logits = nnUNetPredictor.predict_sliding_window_return_logits.__wrapped__(predictor, x)
        out = logits if out is None else out + logits
    return out / len(predictors)


@pytest.mark.parametrize("size", [(20, 12, 8), (37, 29, 17), (10, 9, 8), (16, 40, 5)])
def test_windows_and_gaussian_are_nnunets(folder, size):
    p = _predictor(folder, mirroring=False)
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    g = nnunet_geometry(size, p.configuration_manager.patch_size, tile_step_size=0.5)
    padded, _ = pad_nd_image(torch.zeros((1, *size)), p.configuration_manager.patch_size, "constant", {"value": 0},
                             True, None)
    assert g.padded_size == tuple(padded.shape[1:])
    theirs = [tuple(s[1:]) for s in p._internal_get_sliding_window_slicers(padded.shape[1:])]
    assert list(g.slices) == theirs
    gaussian = compute_gaussian(tuple(p.configuration_manager.patch_size), sigma_scale=1 / 8, value_scaling_factor=10,
                                device=torch.device("cpu"))
    assert torch.equal(g.weight, gaussian.float())
    # the padding: nnU-Net's pad_nd_image and the geometry place the image at the same offset
    x = torch.rand((1, *size))
    xp, _ = pad_nd_image(x, p.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    assert torch.equal(g.pad_input(x[None])[0], xp)


@pytest.mark.parametrize("mirroring", [False, True])
def test_stitched_logits_match_nnunet_predictor_to_float16(folder, mirroring):
    loaded = load_model(ModelSpec(kind="nnunet", path=str(folder), mirroring=mirroring))
    x = torch.randn((1, 1, 30, 19, 13), generator=torch.Generator().manual_seed(3))
    window = SlidingWindow(roi_size=loaded.roi_size, overlap=loaded.overlap, blend="nnunet")
    geometry = window.geometry(x.shape[2:])
    ours = stitched_forward(loaded.module, x, window)[0]
    with torch.no_grad():
        theirs = _predictor(folder, mirroring=mirroring).predict_logits_from_preprocessed_data(x[0]).float()
    assert ours.shape == theirs.shape
    # nnU-Net sums g·Z and g in float16. Where the summed gaussian Ω is below 1e-3 (the image's
    # corners, reached only by the gaussian's tails, down to float16's smallest subnormal 6e-8) its
    # products underflow and its logits are quantised; elsewhere they agree to float16 precision.
    covered = geometry.crop(geometry.overlap_weight[None])[0] >= 1e-3
    assert covered.float().mean() > 0.8
    err = (ours - theirs).abs().amax(0)[covered]
    assert float(err.max()) <= 4e-3 * float(theirs.abs().max())
    agree = (ours.argmax(0) == theirs.argmax(0))[covered].float().mean()
    assert agree >= 0.995


@pytest.mark.parametrize("mirroring", [False, True])
def test_saliency_equals_autograd_through_nnunets_predictor(folder, mirroring, monkeypatch):
    loaded = load_model(ModelSpec(kind="nnunet", path=str(folder), mirroring=mirroring))
    x = torch.randn((1, 1, 26, 17, 11), generator=torch.Generator().manual_seed(5))
    predictors = [_predictor(folder, mirroring=mirroring, folds=(f,)) for f in (0, 1)]
    xg = x[0].clone().requires_grad_(True)
    logits = differentiable_nnunet_logits(predictors, xg, monkeypatch)
    prediction = logits.detach().argmax(0)
    classes = torch.unique(prediction).tolist()
    assert len(classes) >= 2
    # The windows' mathematics, on the kernels nnU-Net's predictor runs (PyTorch's): on this untrained
    # network and a noise input some LeakyReLU inputs are within 3e-7 of zero, so two fp32 kernel
    # orders can take different branches there and the gradient jumps by ~1e-5 at those voxels.
    window = SlidingWindow(roi_size=loaded.roi_size, overlap=loaded.overlap, blend="nnunet", kernels="torch")
    maps, work = compute_maps(loaded.module, x, prediction, classes, Saliency(), window=window)
    assert work["forwards"] == len(nnunet_geometry(x.shape[2:], loaded.roi_size).slices)
    fast, _ = compute_maps(loaded.module, x, prediction, classes, Saliency(),
                           window=dataclasses.replace(window, kernels="auto"))  # oneDNN convolutions
    for i, c in enumerate(classes):
        (expected,) = torch.autograd.grad((logits[c] * (prediction == c)).sum(), xg, retain_graph=True)
        err = float((maps[i, 0].double() - expected[0]).abs().max() / expected.abs().max())
        assert err < 1e-5, f"class {c}: relative error {err:.1e}"
        rel = (fast[i, 0].double() - expected[0]).abs() / expected.abs().max()
        assert float(rel.max()) < 1e-4, f"class {c}: oneDNN kernels, relative error {float(rel.max()):.1e}"
        assert float((rel > 1e-6).double().mean()) < 0.05, f"class {c}: oneDNN kernels differ beyond kinks"
