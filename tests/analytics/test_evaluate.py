"""The benchmark metrics against hand-computed cases and independent numpy implementations."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from monai.networks.nets import UNet

from engine.analytics.evaluate import (
    EvaluateSpec,
    ModelSetup,
    agreement,
    average_sensitivity,
    effective_complexity,
    evaluate_patient,
    faithfulness_correlation,
    format_report,
    forward_equivalents,
    output_drops,
    output_scores,
    random_subsets,
    smallest_stable_n,
    smoothgrad_stability,
    spearman,
)
from engine.attribution import SlidingWindow, SmoothGrad, compute_maps


# --------------------------------------------------------------------------- independent numpy versions
def np_pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / np.sqrt((xc ** 2).sum() * (yc ** 2).sum()))


def np_ranks(x):
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def np_faithfulness(a, subsets, drops):
    a = np.asarray(a, float).ravel()
    a = a / np.abs(a).max()
    sums = [a[s].sum() for s in subsets]
    return np_pearson(sums, drops)


def np_sensitivity(a, perturbed):
    a = np.asarray(a, float)
    a = a / np.abs(a).max()
    return float(np.mean([np.linalg.norm(a - p / np.abs(p).max()) / np.linalg.norm(a) for p in perturbed]))


# --------------------------------------------------------------------------- faithfulness correlation
def test_faithfulness_hand_computed():
    a = torch.tensor([1.0, -2.0, 0.0, 4.0])  # normalised: [0.25, -0.5, 0, 1]
    subsets = torch.tensor([[0, 1], [2, 3], [1, 3]])  # sums: -0.25, 1, 0.5
    assert faithfulness_correlation(a, subsets, [2 * -0.25 + 3, 2 * 1 + 3, 2 * 0.5 + 3]) == pytest.approx(1.0)
    assert faithfulness_correlation(a, subsets, [0.25, -1.0, -0.5]) == pytest.approx(-1.0)
    # sums (-0.25, 1, 0.5) against drops (0, 2, 1): r = 0.9934 by hand
    xm, ym = 1.25 / 3, 1.0
    x, y = np.array([-0.25, 1, 0.5]) - xm, np.array([0, 2, 1]) - ym
    assert faithfulness_correlation(a, subsets, [0, 2, 1]) == pytest.approx((x * y).sum() / np.sqrt((x**2).sum() * (y**2).sum()))
    assert math.isnan(faithfulness_correlation(a, subsets, [1.0, 1.0, 1.0]))  # constant drops


def test_faithfulness_equals_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5, 4))
    subsets = random_subsets(a.size, 30, 20, seed=3)
    drops = rng.normal(size=20)
    got = faithfulness_correlation(torch.from_numpy(a), subsets, drops)
    assert got == pytest.approx(np_faithfulness(a, subsets.numpy(), drops), rel=1e-10)


def test_random_subsets_are_seeded_and_without_replacement():
    s1, s2, s3 = (random_subsets(100, 20, 5, seed=k) for k in (1, 1, 2))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert all(len(set(r.tolist())) == 20 for r in s1)
    with pytest.raises(ValueError):
        random_subsets(10, 11, 2, seed=0)


def test_output_scores_recompute_the_mask():
    logits = torch.tensor([[1.0, 5.0, 0.0], [2.0, 1.0, 4.0]])  # argmax: 1, 0, 1
    assert output_scores(logits, [0, 1]).tolist() == pytest.approx([5.0, 6.0])


def test_output_drops_hand_computed():
    x = torch.tensor([[[1.0, 2.0, 3.0]]])  # (1, C_in=1, S=3)
    score = lambda inp: torch.stack([inp.sum(), (inp ** 2).sum()])  # noqa: E731
    drops = output_drops(score, x, torch.tensor([[0], [1, ]]), baseline=0.0)
    assert drops.tolist() == [[1.0, 1.0], [2.0, 4.0]]


# --------------------------------------------------------------------------- average sensitivity
def test_average_sensitivity_hand_computed():
    a = torch.tensor([2.0, 0.0])
    # Â = [1, 0]; [1, 1] → [1, 1], distance 1; [-4, 0] → [-1, 0], distance 2; ‖Â‖ = 1
    assert average_sensitivity(a, [torch.tensor([1.0, 1.0]), torch.tensor([-4.0, 0.0])]) == pytest.approx(1.5)
    assert average_sensitivity(a, [a * 7]) == 0.0  # scale-invariant by the normalisation
    assert math.isnan(average_sensitivity(torch.zeros(2), [a]))


def test_average_sensitivity_equals_numpy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 5, 6))
    ps = [a + rng.normal(scale=0.3, size=a.shape) for _ in range(3)]
    got = average_sensitivity(torch.from_numpy(a), [torch.from_numpy(p) for p in ps])
    assert got == pytest.approx(np_sensitivity(a, ps), rel=1e-10)


# --------------------------------------------------------------------------- effective complexity
def test_effective_complexity_hand_computed():
    a = torch.tensor([10.0, 1.0, 0.5, -2.0, 0.05])  # |a|/max: 1, .1, .05, .2, .005
    assert effective_complexity(a) == pytest.approx(2 / 5)  # 0.1 itself is not above 0.1
    assert effective_complexity(a, threshold=0.04) == pytest.approx(4 / 5)
    assert effective_complexity(torch.zeros(3)) == 0.0


def test_effective_complexity_equals_numpy():
    a = np.random.default_rng(2).standard_cauchy(size=(7, 6, 5))
    assert effective_complexity(torch.from_numpy(a)) == pytest.approx(float(np.mean(np.abs(a) / np.abs(a).max() > 0.1)))


# --------------------------------------------------------------------------- cost, ranks, stability
def test_forward_equivalents():
    assert forward_equivalents({"forwards": 3, "vjps": 34, "passes": 2}) == 71.0
    assert forward_equivalents({"forwards": 8, "vjps": 4}, n_windows=4, vjp_cost=3.0) == 5.0


def test_spearman_hand_and_numpy():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1, 3, 2): 1 - 6·2 / (3·8) = 0.5
    assert spearman([0.1, 0.5, 0.9], [0.0, 2.0, 1.0]) == pytest.approx(0.5)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)  # with ties
    assert spearman(x, y) == pytest.approx(np_pearson(np_ranks(x), np_ranks(y)), rel=1e-10)
    assert agreement({"a": 0.5, "b": 0.3}, {"a": 0.2, "c": 0.9}) == pytest.approx(spearman([0.5, 0.3, 0], [0.2, 0, 0.9]))


def test_smallest_stable_n():
    ns = [1, 2, 4, 8, 16]
    assert smallest_stable_n(ns, [0.9, 0.97, 0.93, 0.96, 1.0]) == 8
    assert smallest_stable_n(ns, [0.96, 0.97, 0.99, 0.96, 1.0]) == 1
    assert smallest_stable_n(ns, [0.99, float("nan"), 0.99, 0.99, 1.0]) == 4


# --------------------------------------------------------------------------- on a tiny model
SHAPE, ROI = (12, 10, 8), (8, 6, 8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(1))


SETUP = ModelSetup.of(ROI, ("a", "b", "c"))


def test_stability_prefix_equals_smoothgrad_runs(model, image):
    spec = EvaluateSpec(targets=("a", "b", "c"), stability_samples=(1, 3), smoothgrad_sigma=0.1, seed=4)
    pred = torch.zeros(SHAPE, dtype=torch.long)
    pred[6:] = 1
    by_n = smoothgrad_stability(model, image, pred, [0, 1], SETUP, spec)
    for n in (1, 3):
        ref, _ = compute_maps(model, image[None], pred, [0, 1], SmoothGrad(n_samples=n, sigma=0.1),
                              window=SlidingWindow(roi_size=ROI), seed=4)
        torch.testing.assert_close(by_n[n], ref.sum(1), rtol=1e-5, atol=1e-6)


def test_evaluate_patient_is_deterministic_and_complete(model, image):
    spec = EvaluateSpec(targets=("a", "b", "c"), methods=("saliency", "kernel_shap_cubes", "occlusion"), runs=6,
                        subset_fraction=0.2, n_perturbations=1, kernel_shap_samples_cubes=24, cube_size=4,
                        stability_samples=(1, 2), seed=1)
    a = evaluate_patient(model, image, patient_id="p", setup=SETUP, spec=spec)
    b = evaluate_patient(model, image, patient_id="p", setup=SETUP, spec=spec)
    timed = pl.col("metric") == "wall_time_s"
    assert a.filter(~timed).equals(b.filter(~timed))
    metrics = set(a["metric"])
    assert {"faithfulness_correlation", "average_sensitivity", "effective_complexity", "wall_time_s",
            "cost_forward_equivalents", "roi_agreement_spearman", "stability_spearman_n1", "stability_min_n"} <= metrics
    assert set(a.filter(pl.col("metric") == "roi_agreement_spearman")["method"]) == {
        "saliency~kernel_shap_cubes", "saliency~occlusion", "kernel_shap_cubes~occlusion"}
    # a stability correlation of n_max with itself is 1
    assert (a.filter(pl.col("metric") == "stability_spearman_n2").drop_nulls()["value"].fill_nan(1.0) == 1.0).all()
    report = format_report(a, methods=spec.methods)
    assert report.splitlines()[0] == "All target classes" and "occlusion" in report
    c = evaluate_patient(model, image, patient_id="p", setup=SETUP, spec=EvaluateSpec(**{**spec.to_dict(), "seed": 2,
                         "methods": spec.methods, "targets": spec.targets, "stability_samples": (1, 2)}))
    assert not a.filter(~timed).equals(c.filter(~timed))


def test_spec_validation_and_paper_defaults():
    with pytest.raises(ValueError, match="unknown method"):
        EvaluateSpec(methods=("lime",))
    with pytest.raises(ValueError, match="runs"):
        EvaluateSpec(runs=1)
    p = EvaluateSpec(runs=5).with_paper_defaults()
    assert (p.runs, p.n_perturbations, p.noise, p.ig_rule) == (100, 3, 0.1, "paper")
    assert (p.kernel_shap_samples_segments, p.kernel_shap_samples_cubes, p.cubes) == (200, 1000, 8)
    # the paper's 50,176 voxels were 0.2-0.4% of a CT: 0.3% of the demo's 48·40·40 = 76,800 voxels is 230
    assert p.subset_of(48 * 40 * 40) == 230
    assert EvaluateSpec(subset_fraction=0.25).subset_of(400) == 100
    with pytest.raises(ValueError, match="exceeds"):
        EvaluateSpec(subset_size=50_176).subset_of(1000)


def test_sensitivity_uses_the_clean_sigma_and_optionally_the_clean_segments(model, image):
    from engine.attribution import explain_volume

    spec = EvaluateSpec(targets=("a", "b", "c"), methods=("smoothgrad", "occlusion"), runs=3, subset_fraction=0.1,
                        n_perturbations=1, noise=0.3, smoothgrad_samples=2, stability_samples=(), seed=2,
                        sensitivity_partition="clean")
    rows = evaluate_patient(model, image, patient_id="p", setup=SETUP, spec=spec, stability=False)
    g = torch.Generator().manual_seed(2 * 1_000_003 + 0 + 500_009)  # the protocol's noise for patient 0
    noisy = image + (torch.rand(image.shape, generator=g) * 2 - 1) * 0.3
    lo, hi = float(image.min()), float(image.max())  # no declared range: the clean image's, for both inputs
    window = SETUP.explainer.window

    def maps(x, method, **options):
        e = explain_volume(model, x, method=method, window=window, seed=2, targets=["a", "b", "c"],
                           class_names=("a", "b", "c"), return_maps=True, **options)
        return e.maps

    clean_pred = explain_volume(model, image, method="saliency", window=window).prediction
    for method, options in (("smoothgrad", {"n_samples": 2, "input_range": (lo, hi)}),
                            ("occlusion", {"partition": clean_pred})):
        extra = {"partition": options.pop("partition")} if "partition" in options else {}
        a = maps(image, method, **options)
        b = maps(noisy, method, **options, **extra)
        got = rows.filter((pl.col("method") == method) & (pl.col("metric") == "average_sensitivity"))
        for row in got.iter_rows(named=True):
            t = row["target"]
            ref = np.linalg.norm((a[t] / a[t].abs().max() - b[t] / b[t].abs().max()).numpy()) / \
                np.linalg.norm((a[t] / a[t].abs().max()).numpy())
            assert row["value"] == pytest.approx(float(ref), rel=1e-5)
