"""Method options that say what they do: SmoothGrad's σ, KernelSHAP's samples and cubes, IG's rules,
the reference's probability-weighted objective, canonical names and the model's dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from monai.inferers import sliding_window_inference

from engine.attribution import (
    IntegratedGradients,
    KernelShap,
    Saliency,
    SettingsError,
    SlidingWindow,
    SmoothGrad,
    compute_maps,
    explain_volume,
)
from engine.attribution.gradients import IG_RULES, quadrature
from engine.attribution.objectives import objective_scores
from engine.attribution.perturbation import feature_mask
from engine.errors import JobSpecError
from engine.jobs import JobSpec
from tests.attribution.conftest import SHAPE, tiny_unet

ROI, OVERLAP = (8, 6, 8), 0.5
WINDOW = SlidingWindow(roi_size=ROI, overlap=OVERLAP)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(1))


def stitched(model, x):
    return sliding_window_inference(x, ROI, 1, model, overlap=OVERLAP)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -------------------------------------------------------------------------------- SmoothGrad's σ
def test_smoothgrad_sigma_is_a_fraction_of_the_declared_range_not_of_the_scan(model, image):
    method = SmoothGrad(n_samples=3, sigma=0.1, input_range=(0.0, 1.0))
    dim = image * 0.5  # range halves; σ must not
    assert method.stdev(image) == method.stdev(dim) == pytest.approx(0.1)
    pred = stitched(model, dim).argmax(1)[0]
    c = int(pred.flatten()[0])
    maps, _ = compute_maps(model, dim, pred, [c], method, window=SlidingWindow(roi_size=SHAPE), seed=5)

    class Masked(torch.nn.Module):
        def forward(self, x):
            return (model(x)[:, c] * (pred == c)).flatten(1).sum(1)

    torch.manual_seed(5)
    ref = NoiseTunnel(CaptumSaliency(Masked())).attribute(dim, nt_type="smoothgrad", nt_samples=3,
                                                          nt_samples_batch_size=1, stdevs=0.1, abs=False)
    assert rel_err(maps[0], ref[0]) < 1e-5


def test_without_a_declared_range_the_clean_sigma_can_be_pinned(image):
    method = SmoothGrad(sigma=0.1)
    pinned = method.pinned_to(image)
    noisy = image + 0.3
    assert pinned.stdev(noisy) == pytest.approx(0.1 * float(image.max() - image.min()))
    assert method.stdev(noisy * 2) != pytest.approx(pinned.stdev(noisy * 2))


def test_a_jobs_explainer_records_sigma_in_input_units_and_hu():
    from engine.job_setup import explainer_record

    spec = JobSpec.from_dict({"job": {"name": "s"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
                              "preprocess": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 2.0},
                              "attribution": {"method": "smoothgrad", "sigma": 0.1}})
    from engine import models

    record = explainer_record(spec, models.demo_model(weights=None))
    # σ = 0.1 × (2 − 0) = 0.2 input units; one input unit is 2000 HU / 2 = 1000 HU, so 200 HU
    assert record["sigma_abs"] == pytest.approx(0.2) and record["sigma_hu"] == pytest.approx(200.0)
    assert record["input_range"] == [0.0, 2.0]
    assert record["kernels"] == "auto"


def test_a_jobs_kernels_reach_the_sliding_window():
    from engine import models
    from engine.job_setup import explainer_for, preprocess_for

    spec = JobSpec.from_dict({"job": {"name": "k"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
                              "attribution": {"kernels": "torch"}})
    loaded = models.demo_model(weights=None)
    explainer = explainer_for(spec, loaded, torch.device("cpu"), preprocess_for(spec, loaded))
    assert explainer.window.kernels == "torch"


# -------------------------------------------------------------------------------- KernelSHAP
def test_cubes_are_counted_per_axis():
    mask, names = feature_mask(torch.zeros(SHAPE, dtype=torch.long), "cubes", cubes=4)
    # sides ⌈12/4⌉, ⌈10/4⌉, ⌈8/4⌉ = 3, 3, 2 → 4 × 4 × 4 cubes
    assert len(names) == 64 and int(mask.max()) == 63
    assert int(mask[0, 0, 1]) == 0 and int(mask[0, 0, 2]) == 1 and int(mask[11, 9, 7]) == 63
    mask, names = feature_mask(torch.zeros((5, 4, 3), dtype=torch.long), "cubes", cubes=(2, 2, 1))
    assert len(names) == 4 and names[-1] == "cube_1_1_0"


def test_kernel_shap_has_the_papers_sample_counts_and_refuses_too_few():
    assert KernelShap().samples == 200 and KernelShap(features="cubes").samples == 1000
    with pytest.raises(SettingsError, match="more samples than features"):
        KernelShap(features="cubes", n_samples=512)  # 8³ = 512 cubes
    KernelShap(features="cubes", cubes=4, n_samples=65)
    job = {"job": {"name": "k"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
           "attribution": {"method": "kernel_shap", "features": "cubes", "kernel_shap_samples": 100}}
    with pytest.raises(JobSpecError, match="raise n_samples above 512"):
        JobSpec.from_dict(job)


def test_kernel_shap_refuses_fewer_samples_than_segments(model, image):
    with pytest.raises(SettingsError, match="segments features"):
        explain_volume(model, image[0], method="kernel_shap", window=WINDOW, n_samples=2)


# -------------------------------------------------------------------------------- IG's rules
@pytest.mark.parametrize("rule", IG_RULES)
def test_every_ig_rule_integrates_a_linear_path_exactly(rule):
    alphas, weights = quadrature(rule, 7)
    assert weights.sum() == pytest.approx(1.0)
    if rule not in ("paper", "riemann_left", "riemann_right"):  # those are first-order rules
        assert (weights * (3 * alphas + 1)).sum() == pytest.approx(2.5)  # ∫₀¹ 3α + 1 dα


def test_gauss_legendre_is_exact_to_degree_2n_minus_1():
    alphas, weights = quadrature("gausslegendre", 4)
    assert (weights * alphas ** 7).sum() == pytest.approx(1 / 8, rel=1e-12)


def test_the_papers_ig_rule_is_the_reference_loop(model, image):
    pred = stitched(model, image).argmax(1)[0]
    classes = torch.unique(pred).tolist()
    maps, _ = compute_maps(model, image, pred, classes, IntegratedGradients(steps=5, rule="paper"), window=WINDOW)
    for i, c in enumerate(classes):
        ref = torch.zeros_like(image)
        for alpha in torch.linspace(0, 1, 5):  # the reference: linspace(0, 1, N), each step weighted 1/N
            x = (alpha * image).requires_grad_(True)
            (g,) = torch.autograd.grad((stitched(model, x)[0, c] * (pred == c)).sum(), x)
            ref += g * image / 5
        assert rel_err(maps[i], ref[0]) < 1e-5


# -------------------------------------------------------------------------------- objectives and names
def test_probability_weighted_equals_autograd_of_the_weighted_logit_sum(model, image):
    pred = stitched(model, image).argmax(1)[0]
    classes = torch.unique(pred).tolist()
    maps, _ = compute_maps(model, image, pred, classes, Saliency(), window=WINDOW, objective="probability-weighted")
    for i, c in enumerate(classes):
        x = image.clone().requires_grad_(True)
        z = stitched(model, x)[0]
        p = torch.softmax(z, 0).detach()[c] * (pred == c)
        (g,) = torch.autograd.grad((z[c] * p / p.sum()).sum(), x)
        assert rel_err(maps[i], g[0]) < 1e-5


def test_objective_values_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])  # (C=2, S=3); masks: class 0 = {0, 1}, 1 = {2}
    masks = torch.tensor([0, 0, 1])
    assert objective_scores(logits, masks, [0, 1], "sum").tolist() == pytest.approx([3.0, 3.0])
    assert objective_scores(logits, masks, [0, 1], "mean").tolist() == pytest.approx([1.5, 3.0])
    p0 = [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-2.0))]  # softmax_0 at voxels 0 and 1
    expected = (p0[0] * 1.0 + p0[1] * 2.0) / (p0[0] + p0[1])
    assert float(objective_scores(logits, masks, [0], "probability_weighted")[0]) == pytest.approx(expected)
    assert float(objective_scores(logits, masks, [0], "softmax")[0]) == pytest.approx(sum(p0))


def test_results_carry_the_methods_canonical_name(model, image):
    e = explain_volume(model, image[0], method="ig", steps=2, window=WINDOW)
    assert e.method == "integrated_gradients" and e.options["rule"] == "gausslegendre"


# -------------------------------------------------------------------------------- the model's dtype
@pytest.mark.parametrize("method,options", [("saliency", {}), ("occlusion", {})])
def test_a_float64_model_is_explained_in_float64(image, method, options):
    model = tiny_unet().double()
    x = image.double()
    e = explain_volume(model, x[0].float(), method=method, window=WINDOW, return_maps=True, **options)
    assert all(m.dtype == torch.float64 for m in e.maps.values())
    if method == "saliency":
        pred = e.prediction
        for name, m in e.maps.items():
            c = int(name)
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad((stitched(model, xg)[0, c] * (pred == c)).sum(), xg)
            assert rel_err(m, g[0, 0]) < 1e-10
