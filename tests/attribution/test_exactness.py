"""Exactness of the attribution core against independent computations (captum, autograd)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from monai.inferers import sliding_window_inference

from engine.attribution import (
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    SlidingWindow,
    compute_maps,
    explain_volume,
)
from engine.attribution.sliding import window_geometry
from tests.attribution.conftest import SHAPE


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand((1, 1, *SHAPE), generator=g)


def prediction_of(model: torch.nn.Module, x: torch.Tensor, roi, overlap=0.25, blend="constant") -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, roi, 1, model, overlap=overlap, mode=blend)[0].argmax(0)


class MaskedClassSum(torch.nn.Module):
    """S_c(x) = Σ_{v∈M_c} model(x)_c(v) with a fixed mask: the scalar captum explains."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor, c: int) -> None:
        super().__init__()
        self.model, self.mask, self.c = model, mask, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x)[:, self.c] * self.mask).flatten(1).sum(1)


def _classes(pred: torch.Tensor) -> list[int]:
    return torch.unique(pred).tolist()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max-norm relative error ‖a − b‖∞ / ‖b‖∞ ≤ rel (float32 summation order differs per path)."""
    err = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


# (i) one window covering the volume: equal to captum ---------------------------------------------
def test_saliency_equals_captum(model, image):
    pred = prediction_of(model, image, SHAPE)
    classes = _classes(pred)
    maps, _ = compute_maps(model, image, pred, classes, Saliency(), window=SlidingWindow(roi_size=SHAPE))
    for i, c in enumerate(classes):
        ref = CaptumSaliency(MaskedClassSum(model, pred == c, c)).attribute(image, abs=False)
        assert_rel_close(maps[i], ref[0])


def test_smoothgrad_equals_captum_noise_tunnel_with_same_noise(model, image):
    pred = prediction_of(model, image, SHAPE)
    classes = _classes(pred)
    method = SmoothGrad(n_samples=4, sigma=0.15)
    maps, _ = compute_maps(model, image, pred, classes, method, window=SlidingWindow(roi_size=SHAPE), seed=123)
    stdev = method.stdev(image)
    for i, c in enumerate(classes):
        torch.manual_seed(123)  # captum draws its noise from the global generator
        nt = NoiseTunnel(CaptumSaliency(MaskedClassSum(model, pred == c, c)))
        ref = nt.attribute(image, nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=1, stdevs=stdev, abs=False)
        assert_rel_close(maps[i], ref[0])


@pytest.mark.parametrize("baseline", ["zeros", 0.25])
def test_integrated_gradients_equals_captum(model, image, baseline):
    pred = prediction_of(model, image, SHAPE)
    classes = _classes(pred)
    maps, _ = compute_maps(
        model, image, pred, classes, IntegratedGradients(steps=7, baseline=baseline), window=SlidingWindow(roi_size=SHAPE)
    )
    base = torch.zeros_like(image) if baseline == "zeros" else torch.full_like(image, baseline)
    for i, c in enumerate(classes):
        ref = CaptumIG(MaskedClassSum(model, pred == c, c)).attribute(
            image, baselines=base, n_steps=7, internal_batch_size=1
        )
        assert_rel_close(maps[i], ref[0])


def test_input_x_gradient_is_input_times_saliency(model, image):
    pred = prediction_of(model, image, SHAPE)
    classes = _classes(pred)
    grad, _ = compute_maps(model, image, pred, classes, Saliency(), window=SlidingWindow(roi_size=SHAPE))
    ixg, _ = compute_maps(model, image, pred, classes, InputXGradient(), window=SlidingWindow(roi_size=SHAPE))
    torch.testing.assert_close(ixg, grad * image[0])


# (ii) overlapping windows: equal to autograd through MONAI's stitched prediction --------------------
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_overlapping_windows_equal_autograd_through_stitching(model, image, blend, overlap):
    roi = (8, 6, 8)
    pred = prediction_of(model, image, roi, overlap, blend)
    classes = _classes(pred)
    maps, work = compute_maps(model, image, pred, classes, Saliency(), window=SlidingWindow(roi_size=roi, overlap=overlap, blend=blend))
    n_windows = window_geometry(SHAPE, roi, overlap=overlap).n_windows
    assert n_windows >= 4 and work["forwards"] == n_windows  # several overlapping windows, one forward each
    for i, c in enumerate(classes):
        x = image.clone().requires_grad_(True)
        z = sliding_window_inference(x, roi, 1, model, overlap=overlap, mode=blend)
        (g,) = torch.autograd.grad((z[0, c] * (pred == c)).sum(), x)
        assert_rel_close(maps[i], g[0])


def test_window_larger_than_image_is_padded_like_monai(model, image):
    roi = (16, 12, 8)  # larger than the image in two dims
    pred = prediction_of(model, image, roi)
    c = int(pred.flatten()[0])
    maps, _ = compute_maps(model, image, pred, [c], Saliency(), window=SlidingWindow(roi_size=roi))
    x = image.clone().requires_grad_(True)
    z = sliding_window_inference(x, roi, 1, model, overlap=0.25)
    (g,) = torch.autograd.grad((z[0, c] * (pred == c)).sum(), x)
    assert_rel_close(maps[0], g[0])


def test_mean_and_probability_targets_equal_autograd(model, image):
    roi, overlap = (8, 6, 8), 0.5
    pred = prediction_of(model, image, roi, overlap)
    classes = _classes(pred)
    mean_maps, _ = compute_maps(model, image, pred, classes, Saliency(), window=SlidingWindow(roi_size=roi, overlap=overlap), objective="mean")
    prob_maps, _ = compute_maps(
        model, image, pred, classes, Saliency(), window=SlidingWindow(roi_size=roi, overlap=overlap), objective="softmax"
    )
    for i, c in enumerate(classes):
        mask = pred == c
        x = image.clone().requires_grad_(True)
        z = sliding_window_inference(x, roi, 1, model, overlap=overlap)[0]
        (g_mean,) = torch.autograd.grad((z[c] * mask).sum() / mask.sum(), x, retain_graph=True)
        (g_prob,) = torch.autograd.grad((torch.softmax(z, 0)[c] * mask).sum(), x)
        assert_rel_close(mean_maps[i], g_mean[0])
        assert_rel_close(prob_maps[i], g_prob[0])


def test_legacy_target_adds_unblended_window_gradients(model, image):
    roi, overlap = (8, 6, 8), 0.5
    pred = prediction_of(model, image, roi, overlap)
    c = int(pred.flatten()[0])
    legacy, _ = compute_maps(model, image, pred, [c], Saliency(), window=SlidingWindow(roi_size=roi, overlap=overlap), objective="legacy")
    exact, _ = compute_maps(model, image, pred, [c], Saliency(), window=SlidingWindow(roi_size=roi, overlap=overlap))
    # Independent: Σ_w ∂/∂x Σ_{v∈M_c∩w} Z_{w,c}(v), windows from MONAI's own layout.
    from monai.data.utils import dense_patch_slices

    ref = torch.zeros_like(image)
    for s in dense_patch_slices(SHAPE, roi, (4, 3, 4)):
        x = image.clone().requires_grad_(True)
        out = model(x[(slice(None), slice(None), *s)])
        (g,) = torch.autograd.grad((out[0, c] * (pred[s] == c)).sum(), x)
        ref += g
    assert_rel_close(legacy[0], ref[0])
    assert not torch.allclose(legacy, exact)  # with overlap, legacy is not the stitched gradient


# (iii) class specificity -----------------------------------------------------------------------
class RegionModel(torch.nn.Module):
    """Class c's logit at v depends only on x(v) (pointwise), so ∂S_c/∂x lives on M_c exactly."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, n_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(n_classes, dtype=torch.float32).reshape(n_classes, 1, 1, 1, 1))
            self.conv.bias.copy_(-(torch.arange(n_classes, dtype=torch.float32) ** 2) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_class_specificity_mass_inside_region():
    # Intensity i in region i makes class i win the argmax (logit_c = c x - c²/2 peaks at c = x).
    image = torch.zeros((1, 12, 10, 8))
    image[0, :6] = 1.0
    image[0, 6:, :5] = 2.0
    image[0, 6:, 5:] = 3.0
    e = explain_volume(RegionModel(4), image, method="saliency", window=SlidingWindow(roi_size=(8, 6, 8), overlap=0.5, blend="gaussian"))
    self_mass = e.importances.filter(stat="mass", sign="abs").filter(
        e.importances.filter(stat="mass", sign="abs")["target"] == e.importances.filter(stat="mass", sign="abs")["roi"]
    )
    assert set(self_mass["target"]) == {"1", "2", "3"}
    assert (self_mass["value"] >= 0.99).all()


# (iv) chunked classes, batched windows and batched VJPs give the same maps -------------------------
def test_chunked_batched_and_plain_paths_agree(model, image):
    roi, overlap = (8, 6, 8), 0.25
    pred = prediction_of(model, image, roi, overlap)
    classes = _classes(pred)
    method = SmoothGrad(n_samples=2)
    plain, plain_work = compute_maps(model, image, pred, classes, method,
                                     window=SlidingWindow(roi_size=roi, overlap=overlap, vjp="loop"))
    n_windows = window_geometry(SHAPE, roi, overlap=overlap).n_windows
    # hand count: the work is per window, whatever the batching (each class's mask may miss some windows)
    assert plain_work["forwards"] == 2 * n_windows
    assert 0 < plain_work["vjps"] <= 2 * n_windows * len(classes)
    variants = [
        (dict(), 1),
        (dict(window_batch=3), None),
        (dict(vjp="batched"), None),
        (dict(window_batch=4, vjp="batched"), 2),
    ]
    for options, chunk in variants:
        window = SlidingWindow(roi_size=roi, overlap=overlap, **options)
        other, work = compute_maps(model, image, pred, classes, method, window=window, class_chunk=chunk)
        assert_rel_close(other, plain)
        chunks = -(-len(classes) // (chunk or len(classes)))  # each class chunk runs the windows again
        assert (work["forwards"], work["vjps"]) == (chunks * plain_work["forwards"], plain_work["vjps"]), options


# (v) a fixed seed gives identical results --------------------------------------------------------
def test_fixed_seed_is_deterministic(model, image):
    a = explain_volume(model, image[0], method="smoothgrad", window=(8, 6, 8), n_samples=3, seed=7, return_maps=True)
    b = explain_volume(model, image[0], method="smoothgrad", window=(8, 6, 8), n_samples=3, seed=7, return_maps=True)
    c = explain_volume(model, image[0], method="smoothgrad", window=(8, 6, 8), n_samples=3, seed=8, return_maps=True)
    assert a.importances.equals(b.importances)
    assert all(torch.equal(a.maps[k], b.maps[k]) for k in a.maps)
    assert not all(torch.equal(a.maps[k], c.maps[k]) for k in a.maps)


# (vi) memory layout and window batching: equal to autograd on a plain contiguous copy -------------
@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous", "auto"])
@pytest.mark.parametrize("window_batch", [1, 3])
def test_channels_last_and_batched_windows_equal_autograd_on_a_contiguous_model(image, memory_format, window_batch):
    from tests.attribution.conftest import tiny_unet

    roi, overlap = (8, 6, 8), 0.5
    reference = tiny_unet()  # same seed, same weights, never converted: the independent computation
    engine_model = tiny_unet()
    pred = prediction_of(reference, image, roi, overlap)
    classes = _classes(pred)
    window = SlidingWindow(roi_size=roi, overlap=overlap, window_batch=window_batch, memory_format=memory_format)
    maps, _ = compute_maps(engine_model, image, pred, classes, Saliency(), window=window)
    conv = next(p for p in engine_model.parameters() if p.dim() == 5 and p.shape[1] > 1)
    # on the CPU, "auto" means channels-last: the test must run the layout it names
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) == (memory_format != "contiguous")
    assert not next(p for p in reference.parameters() if p.dim() == 5 and p.shape[1] > 1).is_contiguous(
        memory_format=torch.channels_last_3d)
    for i, c in enumerate(classes):
        x = image.clone().requires_grad_(True)
        z = sliding_window_inference(x, roi, 1, reference, overlap=overlap)
        (g,) = torch.autograd.grad((z[0, c] * (pred == c)).sum(), x)
        assert_rel_close(maps[i], g[0])


def test_unknown_memory_format_is_refused():
    with pytest.raises(ValueError, match="memory_format"):
        SlidingWindow(roi_size=(8, 8, 8), memory_format="nhwc")  # type: ignore[arg-type]


def test_auto_layout_is_channels_last_on_cpus_and_left_alone_elsewhere():
    from engine.attribution.sliding import resolve_memory_format

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_memory_format("auto", cpu, 3) == torch.channels_last_3d
    assert resolve_memory_format("auto", cuda, 3) is None  # a GPU model keeps the layout it has
    assert resolve_memory_format("auto", cpu, 2) is None
    assert resolve_memory_format("contiguous", cuda, 3) == torch.contiguous_format
    assert resolve_memory_format("channels_last", cuda, 3) == torch.channels_last_3d
    with pytest.raises(ValueError, match="3-D"):
        resolve_memory_format("channels_last", cpu, 2)


@pytest.mark.parametrize("objective", ["sum", "mean", "legacy", "softmax", "probability_weighted"])
def test_seeds_built_one_after_another_in_one_scratch_equal_fresh_ones(model, image, objective):
    """The CPU loop builds each class's seed in one scratch buffer, clearing only the channel the
    previous seed wrote, and folds the sample weight into it: every seed equals a fresh build times
    the weight, whatever the scratch held before the first one."""
    from engine.attribution.objectives import ObjectiveSeeds

    roi, overlap = (8, 6, 8), 0.5
    pred = prediction_of(model, image, roi, overlap)
    geometry = window_geometry(SHAPE, roi, overlap=overlap)
    seeds = ObjectiveSeeds(objective, pred, geometry, model=model)
    build = seeds.seed_fn(image)
    slices = geometry.slices[:1]
    logits = torch.randn(1, 4, *roi)
    scratch = torch.full_like(logits, float("nan"))  # any content the first time
    order = [*_classes(pred), *_classes(pred)[::-1]]
    fresh = {c: build(c, slices, logits) for c in order}
    built = 0
    for c in order:
        reused = build(c, slices, logits, out=scratch, scale=0.25)
        if fresh[c] is None:
            assert reused is None
            continue
        assert reused is scratch
        assert torch.equal(reused, fresh[c] * 0.25)
        built += 1
    assert built >= 3


def test_auto_vjp_mode_loops_over_the_classes_on_every_device():
    # measured: vmap-batched VJPs slower than the loop on the CPU and on an H200, for 4.6x the memory
    from engine.attribution.sliding import resolve_vjp_mode

    for device in ("cpu", "cuda"):
        assert resolve_vjp_mode("auto", torch.device(device)) == "loop"
        assert resolve_vjp_mode("batched", torch.device(device)) == "batched"
    with pytest.raises(ValueError, match="vjp"):
        resolve_vjp_mode("vmap", torch.device("cpu"))  # type: ignore[arg-type]
