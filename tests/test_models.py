"""Tests for engine.models: specs, safe weight loading, bundles, TorchScript and validation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import models
from engine.errors import JobSpecError, ModelError
from engine.labels import THORAX_CLASSES
from engine.models import (
    LoadedModel,
    ModelSpec,
    demo_model,
    load_model,
    load_state_dict_file,
    paper_swin_unetr_spec,
    validate_model,
)

SMALL = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1)
NAMES = ("background", "a", "b")


def _small_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    return UNet(**SMALL)


class Arbitrary:
    """Stands in for any pickled object that is not a tensor."""

    def __init__(self) -> None:
        self.payload = "code could run here"


def test_state_dict_with_module_prefix_and_container(tmp_path: Path) -> None:
    net = _small_unet()
    p = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, p)
    loaded = load_model(ModelSpec(kind="network", name="UNet", args=SMALL, weights=str(p), class_names=NAMES,
                                  roi_size=(16, 16, 16)))
    assert not loaded.module.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)
    assert validate_model(loaded) == (1, 3, 16, 16, 16)
    assert "w.pt" in loaded.source


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = _small_unet().state_dict()
    dropped = next(iter(sd))
    sd.pop(dropped)
    sd["extra.weight"] = torch.zeros(1)
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    with pytest.raises(ModelError, match="missing key") as info:
        load_model(ModelSpec(kind="network", name="UNet", args=SMALL, weights=str(p), class_names=NAMES))
    assert dropped in str(info.value) and "extra.weight" in str(info.value) and "unexpected" in str(info.value)


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save(Arbitrary(), p)
    with pytest.raises(ModelError, match="refused"):
        load_state_dict_file(p)
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_safetensors_needs_package(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\0" * 16)
    if importlib.util.find_spec("safetensors") is None:
        with pytest.raises(ModelError, match="safetensors package is not installed"):
            load_state_dict_file(p)
    else:
        with pytest.raises(ModelError):
            load_state_dict_file(p)


def _bundle(root: Path, *, channel_def: dict | None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    net = {"_target_": "monai.networks.nets.UNet", **{k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}}
    config = {"network_def": net, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]}}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    outputs = {"pred": {"type": "image", "num_channels": 3}}
    if channel_def is not None:
        outputs["pred"]["channel_def"] = channel_def
    meta = {"version": "0.1", "network_data_format": {"inputs": {"image": {"num_channels": 1}}, "outputs": outputs}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save(_small_unet().state_dict(), root / "models" / "model.pt")
    return root


def test_bundle_with_channel_def(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b", channel_def={"0": "background", "1": "liver", "2": "spleen"})
    loaded = load_model(ModelSpec.from_dict({"kind": "bundle", "path": "b"}, base_dir=tmp_path))
    assert loaded.class_names == ("background", "liver", "spleen")
    assert loaded.roi_size == (16, 16, 16) and loaded.in_channels == 1
    assert validate_model(loaded) == (1, 3, 16, 16, 16)
    assert str(root) in loaded.source


def test_bundle_without_channel_def(tmp_path: Path) -> None:
    _bundle(tmp_path / "b", channel_def=None)
    with pytest.raises(ModelError, match="channel_def"):
        load_model(ModelSpec(kind="bundle", path=str(tmp_path / "b")))
    # class names given in the spec are enough
    loaded = load_model(ModelSpec(kind="bundle", path=str(tmp_path / "b"), class_names=NAMES))
    assert loaded.class_names == NAMES


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_channel_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(_small_unet().eval()), str(p))
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps({"0": "background", "1": "a", "2": "b", "3": "c"}))
    loaded = load_model(ModelSpec(kind="torchscript", path=str(p), class_names_file=str(names_file),
                                  roi_size=(16, 16, 16)))
    with pytest.raises(ModelError, match="3 channels but 4 class names"):
        validate_model(loaded)
    with pytest.raises(ModelError, match="no class names"):
        load_model(ModelSpec(kind="torchscript", path=str(p)))


class Halves(nn.Module):
    """Segments at half resolution: not explainable voxel by voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_output_spatial_size_mismatch() -> None:
    loaded = LoadedModel(module=Halves().eval(), class_names=NAMES, roi_size=(16, 16, 16), in_channels=1, source="t")
    with pytest.raises(ModelError, match=r"output spatial size \(8, 8, 8\) differs from input size \(16, 16, 16\)"):
        validate_model(loaded)


def test_forward_failure_names_the_shape() -> None:
    loaded = LoadedModel(module=Halves().eval(), class_names=NAMES, roi_size=(16, 16, 16), in_channels=2, source="t")
    with pytest.raises(ModelError, match=r"zeros of shape \(1, 2, 16, 16, 16\) failed"):
        validate_model(loaded)


def test_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = demo_model(weights=None)
    assert loaded.class_names == THORAX_CLASSES
    assert validate_model(loaded, roi_size=(32, 32, 32)) == (1, 17, 32, 32, 32)
    with pytest.raises(ModelError, match="demo weights"):
        demo_model(weights=tmp_path / "missing.pt")
    p = tmp_path / "demo.pt"
    torch.save(loaded.module.state_dict(), p)
    assert demo_model(weights=p).module.state_dict().keys() == loaded.module.state_dict().keys()
    # the architecture is read from the constant at call time
    halved = tuple(max(2, c // 2) for c in models.DEMO_ARCH["channels"])
    monkeypatch.setattr(models, "DEMO_ARCH", {**models.DEMO_ARCH, "channels": halved})
    smaller = demo_model(weights=None)
    assert sum(t.numel() for t in smaller.module.parameters()) < sum(t.numel() for t in loaded.module.parameters())


def test_model_spec_from_dict() -> None:
    with pytest.raises(JobSpecError, match="weigths.*did you mean 'weights'"):
        ModelSpec.from_dict({"kind": "network", "name": "UNet", "weigths": "x.pt"})
    with pytest.raises(JobSpecError, match="kind"):
        ModelSpec.from_dict({"name": "UNet"})
    with pytest.raises(JobSpecError, match="roi_size"):
        ModelSpec.from_dict({"kind": "network", "name": "UNet", "roi_size": [96, 96]})
    spec = ModelSpec.from_dict({"kind": "network", "name": "UNet", "weights": "w.pt", "roi_size": 64}, base_dir="/j")
    assert spec.weights == "/j/w.pt" and spec.roi_size == (64, 64, 64)


def test_unknown_network_and_bad_args() -> None:
    with pytest.raises(ModelError, match="did you mean.*SwinUNETR"):
        load_model(ModelSpec(kind="network", name="SwinUnetr", class_names=NAMES))
    with pytest.raises(ModelError, match="cannot be built"):
        load_model(ModelSpec(kind="network", name="UNet", args={"spatial_dim": 3}, class_names=NAMES))


def test_paper_swin_unetr_spec() -> None:
    spec = paper_swin_unetr_spec(None)
    assert spec.args["feature_size"] == 48 and spec.args["use_v2"] is True and "img_size" not in spec.args
    assert spec.roi_size == (96, 96, 96) and spec.overlap == 0.25 and spec.class_names == THORAX_CLASSES
    loaded = load_model(spec)
    assert type(loaded.module).__name__ == "SwinUNETR" and loaded.overlap == 0.25
    if importlib.util.find_spec("einops") is None:
        with pytest.raises(ModelError, match="einops"):
            validate_model(loaded, roi_size=(32, 32, 32))
    else:
        assert validate_model(loaded, roi_size=(64, 64, 64)) == (1, 17, 64, 64, 64)  # 32³ leaves a 1-voxel bottleneck
