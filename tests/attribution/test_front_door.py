"""One front door: every method through the same contract, settings held by objects, names that say what they are."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
import torch
from monai.inferers import sliding_window_inference

from engine.attribution import METHODS, Explainer, SettingsError, SlidingWindow, explain_volume, make_method
from engine.attribution.sliding import stitched_forward
from engine.errors import JobSpecError
from engine.jobs import JobSpec
from tests.attribution.conftest import SHAPE

WINDOW = SlidingWindow(roi_size=(8, 6, 8), overlap=0.5, blend="gaussian", window_batch=3)
SMALL = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 3}, "kernel_shap": {"n_samples": 20}}


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(1))


def test_stitched_forward_is_monai_under_the_window_settings(model, image):
    x = image[None]
    expected = sliding_window_inference(x, WINDOW.roi_size, 3, model, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(stitched_forward(model, x, WINDOW), expected)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_goes_through_the_same_front_door(model, image, name):
    e = explain_volume(model, image, method=name, window=WINDOW, return_maps=True, **SMALL.get(name, {}))
    assert e.method == name and e.targets and set(e.maps) == set(e.targets)
    assert all(m.shape == SHAPE for m in e.maps.values())
    masses = e.importances.filter(stat="mass", sign="abs").group_by("target").agg(pl.col("value").sum())
    assert masses["value"].to_list() == pytest.approx([1.0] * masses.height, abs=1e-5)
    assert e.options["objective"] == "sum" and e.options["roi_size"] == [8, 6, 8] and e.work["forwards"] > 0


def test_the_explainer_is_the_same_as_explain_volume(model, image):
    explainer = Explainer(method=make_method("smoothgrad", n_samples=2), window=WINDOW, seed=3)
    a = explainer.explain(model, image, return_maps=True)
    b = explain_volume(model, image, method="smoothgrad", n_samples=2, window=WINDOW, seed=3, return_maps=True)
    assert a.importances.equals(b.importances)


@pytest.mark.parametrize("name", ["occlusion", "kernel_shap"])
def test_perturbation_methods_refuse_gradient_only_settings(model, image, name):
    with pytest.raises(SettingsError, match="class_chunk"):
        explain_volume(model, image, method=name, window=WINDOW, class_chunk=1, **SMALL.get(name, {}))
    with pytest.raises(SettingsError, match="vjp"):
        explain_volume(model, image, method=name, window=SlidingWindow(roi_size=(8, 6, 8), vjp="loop"),
                       **SMALL.get(name, {}))


def test_unknown_methods_and_options_say_what_exists():
    with pytest.raises(ValueError, match="kernel_shap"):
        make_method("lime")
    with pytest.raises(ValueError, match="n_samples"):
        make_method("occlusion", n_samples=3)


def test_the_old_target_keyword_points_to_objective(model, image):
    with pytest.raises(TypeError, match="objective"):
        explain_volume(model, image, method="saliency", window=WINDOW, target="sum")
    job = {"job": {"name": "x"}, "cohort": {"phantoms": 1}, "model": {"kind": "demo"},
           "attribution": {"target": "sum"}}
    with pytest.raises(JobSpecError, match="now `objective`"):
        JobSpec.from_dict(job)
    job["attribution"] = {"objective": "probability"}
    with pytest.raises(JobSpecError, match="softmax"):
        JobSpec.from_dict(job)


def test_layers_point_down():
    code = ("import sys, engine.report.maps, engine.attribution.perturbation, engine.analytics.evaluate; "
            "bad = [m for m in ('engine.pipeline', 'engine.runtime', 'engine.store') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_attribution_modules_have_no_import_cycle():
    import ast
    import graphlib
    from pathlib import Path

    import engine.attribution

    folder = Path(engine.attribution.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        graph[path.stem] = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                            and n.module and n.module.startswith("engine.attribution.")}
    assert graph["perturbation"] >= {"base", "objectives", "sliding"} and "explain" not in graph["perturbation"]
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
