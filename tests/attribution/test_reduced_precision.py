"""bf16 autocast on the CPU: opt-in, applied when asked, close to (not equal to) the exact fp32 maps."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from engine.attribution import Saliency, SlidingWindow, compute_maps
from engine.job_setup import resolve_autocast
from tests.attribution.conftest import SHAPE, tiny_unet


@pytest.mark.parametrize(("name", "device", "expected"), [
    (None, "cpu", None),
    ("bf16", "cpu", torch.bfloat16),
    ("fp16", "cpu", None),  # CPU fp16 convolutions are emulated: slower than fp32, so not applied
    ("bf16", "cuda", torch.bfloat16),
    ("fp16", "cuda", torch.float16),
])
def test_a_jobs_autocast_applies_bf16_on_cpus_and_both_dtypes_on_gpus(name, device, expected, monkeypatch):
    monkeypatch.setattr("engine.job_setup.cpu_has_bf16", lambda: True)
    assert resolve_autocast(name, torch.device(device)) == expected


def test_bf16_on_a_cpu_without_native_bf16_runs_exact_fp32(monkeypatch, caplog):
    monkeypatch.setattr("engine.job_setup.cpu_has_bf16", lambda: False)
    assert resolve_autocast("bf16", torch.device("cpu")) is None
    assert "no native bf16" in caplog.text


def test_bf16_maps_on_the_cpu_are_close_to_fp32_autograd_but_computed_in_bf16():
    g = torch.Generator().manual_seed(3)
    image = torch.rand((1, 1, *SHAPE), generator=g)
    model = tiny_unet(seed=2)
    roi = (8, 6, 8)
    with torch.no_grad():
        pred = sliding_window_inference(image, roi, 1, model, overlap=0.25)[0].argmax(0)
    classes = torch.unique(pred).tolist()
    bf16, _ = compute_maps(model, image, pred, classes, Saliency(),
                           window=SlidingWindow(roi_size=roi, autocast=torch.bfloat16))
    assert bf16.dtype == torch.float32  # maps are accumulated in the input's dtype
    for i, c in enumerate(classes):
        x = image.clone().requires_grad_(True)
        z = sliding_window_inference(x, roi, 1, model, overlap=0.25)
        (ref,) = torch.autograd.grad((z[0, c] * (pred == c)).sum(), x)
        a, b = bf16[i].flatten().double(), ref[0].flatten().double()
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel > 1e-5, "bf16 maps equal the fp32 ones: autocast was not applied"
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99


class _RecordsTF32(torch.autograd.Function):
    """Identity that records PyTorch's TF32 switches in its forward and in its backward."""

    seen: list[tuple[str, bool, bool]] = []

    @staticmethod
    def forward(ctx, x):
        _RecordsTF32.seen.append(("forward", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _RecordsTF32.seen.append(("backward", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return g


class _Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_unet(seed=1)

    def forward(self, x):
        return self.net(_RecordsTF32.apply(x))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_exact_runs_turn_tf32_off_in_forwards_and_backwards_and_restore_it(autocast, monkeypatch):
    # PyTorch's default runs cuDNN convolutions in TF32 (~1e-3): exact fp32 maps on a GPU need it off
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    image = torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(0))
    model = _Recorder().eval()
    _RecordsTF32.seen.clear()
    compute_maps(model, image, torch.zeros(SHAPE, dtype=torch.long), [0], Saliency(),
                 window=SlidingWindow(roi_size=(8, 6, 8), autocast=autocast))
    phases = {p for p, *_ in _RecordsTF32.seen}
    assert phases == {"forward", "backward"}
    expected = (False, False) if autocast is None else (True, True)  # autocast runs keep the user's settings
    assert {tuple(flags) for _, *flags in _RecordsTF32.seen} == {expected}
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
