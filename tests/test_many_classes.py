"""Many classes (TotalSegmentator's 117 + background): chunked attribution holds one chunk of maps, exactly."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from monai.networks.nets import UNet

from engine.attribution import GradientMethod, explain_volume
from engine.store import PatientResult, Store

SHAPE = (24, 20, 20)
N_CLASSES = 118


class EveryClassSomewhere(torch.nn.Module):
    """A random UNet plus a fixed logit bump that makes each class win in its own slab of the volume.

    The bump is a constant, so gradients are the UNet's; it only makes every class predicted.
    """

    def __init__(self, shape=SHAPE, n=N_CLASSES) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = UNet(3, 1, n, channels=(4, 8), strides=(2,), num_res_units=0)
        region = (torch.arange(int(torch.tensor(shape).prod())) * n // int(torch.tensor(shape).prod())).reshape(shape)
        self.register_buffer("bump", 20.0 * torch.nn.functional.one_hot(region, n).permute(3, 0, 1, 2).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bump


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return EveryClassSomewhere().eval()


def _explain(model, image, **kw):
    names = [f"class_{i:03d}" for i in range(N_CLASSES)]
    return explain_volume(model, image, method="saliency", class_names=names, window=SHAPE, **kw)


def test_chunks_hold_only_their_maps_and_give_the_same_rows(model, monkeypatch):
    image = torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(0))
    whole = _explain(model, image)
    assert len(whole.targets) == N_CLASSES
    seen: list[int] = []
    original = GradientMethod.attribute

    def recording(self, problem):
        result = original(self, problem)
        seen.append(int(result.maps.shape[0]))  # the maps alive at once
        return result

    monkeypatch.setattr(GradientMethod, "attribute", recording)
    chunked = _explain(model, image, class_chunk=16)
    assert max(seen) == 16 and sum(seen) == N_CLASSES
    key = ["target", "roi", "stat", "sign"]
    a, b = whole.importances.sort(key), chunked.importances.sort(key)
    assert a.select(key).equals(b.select(key))
    assert (a["value"] - b["value"]).abs().max() <= 1e-6 * max(1.0, float(a["value"].abs().max()))


def test_a_chunks_maps_are_the_gradients_of_its_classes(model):
    """Two classes of the last chunk against autograd through the network (one window covers the volume)."""
    image = torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(1))
    ex = _explain(model, image, class_chunk=50, return_maps=True, targets=[117, 100])
    x = image[None].clone().requires_grad_(True)
    logits = model(x)[0]
    pred = logits.detach().argmax(0)
    for c in (117, 100):
        (g,) = torch.autograd.grad((logits[c] * (pred == c)).sum(), x, retain_graph=True)
        ours = ex.maps[f"class_{c:03d}"]
        assert float((ours - g[0, 0]).abs().max()) <= 1e-5 * float(g.abs().max())


def test_the_store_keeps_every_row_of_a_118_class_patient(model, tmp_path):
    image = torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(2))
    ex = _explain(model, image, class_chunk=32)
    rois = ex.importances["roi"].n_unique()
    assert ex.importances.height == N_CLASSES * rois * 2 * 3
    predictions = pl.DataFrame({"class": list(ex.class_names), "voxels": list(ex.voxels().values()),
                                "dice": [None] * N_CLASSES, "iou": [None] * N_CLASSES},
                               schema={"class": pl.String, "voxels": pl.Int64, "dice": pl.Float64, "iou": pl.Float64})
    with Store(tmp_path / "s.duckdb", read_only=False) as store:
        store.create_run("r", config={})
        store.register_patients("r", pl.DataFrame({"patient_id": ["p"], "image_path": ["x.nii.gz"]}))
        written = store.write_patient("r", PatientResult(
            "p", ex.importances.with_columns(pl.lit("saliency").alias("method")), predictions))
        assert written == ex.importances.height
        back = store.importances("r")
    assert back.height == written and back["target"].n_unique() == N_CLASSES
