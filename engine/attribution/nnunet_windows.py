"""nnU-Net's sliding window as a :class:`~engine.attribution.sliding.WindowGeometry` (``blend = "nnunet"``).

``nnUNetPredictor.predict_sliding_window_return_logits`` pads the image to at least the patch
size (zeros, ``d // 2`` before and the rest after, as MONAI), places windows at
``compute_steps_for_sliding_window`` (per axis ``ceil((size - patch) / (patch · tile_step)) + 1``
steps spread evenly, rounded), weights every window's prediction by ``compute_gaussian`` (σ =
patch/8, scaled to a maximum of 10, zeros replaced by the smallest non-zero value, float16) and
divides by the summed weights:

    Ẑ(v) = Σ_w g(v) · Z_w(v) / Σ_w g(v)

This is the engine's stitched prediction with w = g and Ω = Σ_w g, so the engine's exact backward
seeds G · g/Ω apply unchanged. The steps and the gaussian are nnU-Net's own functions; the gaussian
keeps nnU-Net's float16 values (cast to float32), and Ω and the stitch are summed in float32 where
nnU-Net sums in float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.attribution.sliding import GEOMETRIES, SlidingWindow, WindowGeometry, geometry_forward, pad_to_window


def tile_step_of(overlap: float) -> float:
    """nnU-Net's ``tile_step_size`` from the engine's overlap (1 - tile step), rounded back to the user's value."""
    return round(1.0 - float(overlap), 10)


def nnunet_geometry(
    image_size: Sequence[int],
    patch_size: Sequence[int],
    *,
    tile_step_size: float = 0.5,
    use_gaussian: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    window: SlidingWindow | None = None,
) -> WindowGeometry:
    """The windows and weights ``nnUNetPredictor`` uses for an image of ``image_size`` (spatial)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    nd = len(image_size)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != nd:
        raise ValueError(f"patch size {patch} has {len(patch)} dims but the image has {nd}")
    pad, padded = pad_to_window(image_size, patch)
    steps = compute_steps_for_sliding_window(padded, patch, float(tile_step_size))
    starts = torch.cartesian_prod(*[torch.tensor(s) for s in steps]).reshape(-1, nd).tolist()
    slices = tuple(tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch)) for start in starts)
    if use_gaussian:
        weight = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
        weight = weight.clone().to(device=device, dtype=dtype)
    else:
        weight = torch.ones(patch, dtype=dtype, device=device)
    omega = torch.zeros(padded, dtype=dtype, device=device)
    for s in slices:
        omega[s] += weight
    return WindowGeometry(image_size=tuple(int(i) for i in image_size), roi_size=patch, pad=pad,
                          padded_size=padded, slices=slices, weight=weight, overlap_weight=omega,
                          window=window if window is not None else SlidingWindow(
                              roi_size=patch, overlap=round(1.0 - float(tile_step_size), 10), blend="nnunet"))


def _from_overlap(image_size: Sequence[int], roi_size: Sequence[int], *, overlap: float | Sequence[float],
                  device: torch.device | str, dtype: torch.dtype, window: SlidingWindow | None) -> WindowGeometry:
    """The ``GEOMETRIES`` entry: the engine's overlap is 1 - nnU-Net's tile step."""
    return nnunet_geometry(image_size, roi_size, tile_step_size=tile_step_of(float(overlap)),  # type: ignore[arg-type]
                           device=device, dtype=dtype, window=window)


GEOMETRIES["nnunet"] = _from_overlap
__all__ = ["geometry_forward", "nnunet_geometry", "tile_step_of"]
