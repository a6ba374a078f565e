"""Out of device memory: the explainer steps down (looped VJPs, fewer windows, fewer classes) and
gets the same importances; at the bottom it says what to change."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.attribution import Explainer, SlidingWindow, make_method
from tests.attribution.conftest import SHAPE, tiny_unet


class _SmallDevice(torch.nn.Module):
    """A model on a pretend device that holds at most ``max_batch`` windows at once."""

    def __init__(self, max_batch: int) -> None:
        super().__init__()
        self.net = tiny_unet(seed=4)
        self.max_batch = max_batch
        self.refused = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            self.refused += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} windows")
        return self.net(x)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(5))


def _explainer(**window) -> Explainer:
    return Explainer(method=make_method("saliency"), window=SlidingWindow(roi_size=(8, 6, 8), overlap=0.5, **window))


def test_running_out_of_memory_steps_down_the_window_batch_and_gives_the_same_importances(image, caplog):
    model = _SmallDevice(max_batch=1)
    with caplog.at_level(logging.WARNING, logger="engine.attribution.explain"):
        got = _explainer(window_batch=4, vjp="batched").explain(model, image)
    assert model.refused == 3  # 4 windows (batched VJPs, then looped), then 2; 1 fits
    assert got.options["window_batch"] == 1 and got.options["vjp"] == "loop" and got.options["memory_steps"] == 3
    assert caplog.text.count("out of device memory") == 3
    expected = _explainer(window_batch=1).explain(model.net, image)
    assert got.importances.drop("value").equals(expected.importances.drop("value"))
    diff = (got.importances["value"] - expected.importances["value"]).abs().max()
    assert diff <= 1e-5 * max(expected.importances["value"].abs().max(), 1e-12)


def test_the_steps_go_vjp_then_windows_then_classes_and_stop():
    e = _explainer(window_batch=4, vjp="batched")
    seen = []
    while e is not None:
        seen.append((e.window.vjp, e.window.window_batch, e.class_chunk))
        e = e.smaller()
    assert seen == [("batched", 4, None), ("loop", 4, None), ("loop", 2, None), ("loop", 1, None), ("loop", 1, 8),
                    ("loop", 1, 4), ("loop", 1, 2), ("loop", 1, 1)]


def test_a_volume_that_never_fits_gets_a_one_line_error_saying_what_to_change(image):
    model = _SmallDevice(max_batch=0)
    with pytest.raises(torch.OutOfMemoryError, match="autocast = 'bf16', a smaller roi_size") as err:
        _explainer().explain(model, image)
    assert "\n" not in str(err.value)
