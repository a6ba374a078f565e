"""Sliding-window geometry, the stitched forward, and exact per-window backward seeds.

The stitched prediction of MONAI's sliding-window inference is

    Ẑ(v) = Σ_w  w(v) · Z_w(v) / Ω(v),      Ω(v) = Σ_w w(v)

where Z_w is the network's output on window w, w(v) the window's blending weight (constant or
gaussian) and Ω the overlap weight. For a scalar S(Ẑ) the chain rule gives, per window,

    ∂S/∂x = Σ_w  VJP_w( (∂S/∂Ẑ) · w / Ω )

so the exact backward seed of window w is the target's seed G = ∂S/∂Ẑ multiplied by w/Ω on the
window's voxels. ``window_gradients`` runs one forward per window batch and one vector-Jacobian
product per class present in it (looped over the classes; vmap-batched on request), and scatters the input
gradients into per-class full-volume maps on the compute device.

The geometry (padding, scan interval, window positions, importance map) is MONAI's, so the maps
are gradients of exactly what ``monai.inferers.sliding_window_inference`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

from engine.attribution.kernels import (
    KERNEL_CHOICES,
    KERNELS,
    EngineKernels,
    Kernels,
    engine_kernels,
    resolve_fused,
    resolve_kernels,
)

BlendMode = Literal["constant", "gaussian", "nnunet"]
VJPMode = Literal["auto", "loop", "batched"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]

#: Seed builder: (class index k, window slices, window output (B, C, *roi)) -> seed (B, C, *roi) or
#: None when class k has no support in these windows. A builder may also have an attribute
#: ``present(k, slices) -> bool`` and take ``out=`` (a scratch tensor shaped like the output,
#: overwritten and returned; passed again, it holds the builder's last seed) and ``scale=`` (a factor
#: folded into the seed): the CPU loop then builds one seed at a time in one buffer. And
#: ``live_channels(k) -> tuple[int, ...] | None``: the channels a seed of class k can be nonzero in
#: (None: any), which spares the engine's CPU kernels a pass over the seed to find them; and
#: ``live_values() -> Tensor | None``: the last seed on those channels as its own tensor
#: (B, len(live), *roi), which spares them gathering it out of the seed.
SeedFn = Callable[[int, Sequence[tuple[slice, ...]], torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True, kw_only=True)
class SlidingWindow:
    """How the model is run over a volume, held once (as MONAI's ``SlidingWindowInferer`` holds it).

    ``roi_size``, ``overlap`` and ``blend`` fix the stitched prediction; ``window_batch`` (windows
    per forward), ``autocast`` (a reduced-precision dtype, or None for exact runs), ``vjp`` (how
    per-class VJPs are taken, see :func:`resolve_vjp_mode`) and ``memory_format`` (the layout of
    the model and the window batches, see :func:`resolve_memory_format`) and ``kernels`` (PyTorch's
    CPU kernels or the engine's, see :func:`engine.attribution.kernels.resolve_kernels`) only change
    how it is computed.
    """

    roi_size: tuple[int, ...]
    overlap: float | tuple[float, ...] = 0.25
    blend: BlendMode = "constant"
    window_batch: int = 1
    autocast: torch.dtype | None = None
    vjp: VJPMode = "auto"
    memory_format: MemoryFormat = "auto"
    kernels: Kernels = "auto"

    def __post_init__(self) -> None:
        roi = tuple(int(r) for r in self.roi_size)
        if not roi or any(r <= 0 for r in roi):
            raise ValueError(f"roi_size must be positive ints, got {self.roi_size!r}")
        object.__setattr__(self, "roi_size", roi)
        ov = (self.overlap,) if isinstance(self.overlap, (int, float)) else tuple(self.overlap)
        if not all(0 <= float(o) < 1 for o in ov):
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not isinstance(self.overlap, (int, float)):
            object.__setattr__(self, "overlap", tuple(float(o) for o in ov))
        if self.blend not in ("constant", "gaussian", "nnunet"):
            raise ValueError(f"blend must be 'constant', 'gaussian' or 'nnunet', got {self.blend!r}")
        if int(self.window_batch) < 1:
            raise ValueError(f"window_batch must be at least 1, got {self.window_batch}")
        if self.vjp not in ("auto", "loop", "batched"):
            raise ValueError(f"vjp must be 'auto', 'loop' or 'batched', got {self.vjp!r}")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {self.memory_format!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")

    def geometry(self, image_size: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> WindowGeometry:
        """The window layout of this setting for one image size (MONAI's), weights in ``dtype``."""
        return window_geometry(image_size, self.roi_size, overlap=self.overlap, blend=self.blend, device=device,
                               dtype=dtype, window=self)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly settings, for run records."""
        overlap = self.overlap if isinstance(self.overlap, (int, float)) else list(self.overlap)
        return {"roi_size": list(self.roi_size), "overlap": overlap, "blend": self.blend,
                "window_batch": self.window_batch, "vjp": self.vjp, "memory_format": self.memory_format,
                "kernels": self.kernels,
                "autocast": None if self.autocast is None else str(self.autocast).removeprefix("torch.")}


@dataclass(frozen=True)
class WindowGeometry:
    """Where the windows of a sliding-window pass lie, and their blending weights.

    ``window`` holds the settings the layout was built from (batching, autocast and VJP mode
    included), so that everything that runs over these windows takes the geometry alone.
    """

    image_size: tuple[int, ...]  # spatial size of the (unpadded) input
    roi_size: tuple[int, ...]
    pad: tuple[int, ...]  # torch.nn.functional.pad order: last dim first, (before, after) pairs
    padded_size: tuple[int, ...]
    slices: tuple[tuple[slice, ...], ...]  # spatial slices in the padded volume
    weight: torch.Tensor  # (*roi) window blending weight w
    overlap_weight: torch.Tensor  # (*padded) Ω = Σ_w w
    window: SlidingWindow

    @property
    def n_windows(self) -> int:
        return len(self.slices)

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """Drop the padding from the trailing spatial dims of ``t``."""
        nd = len(self.image_size)
        index: list[slice] = [slice(None)] * (t.dim() - nd)
        for d in range(nd):
            before = self.pad[2 * (nd - 1 - d)]
            index.append(slice(before, before + self.image_size[d]))
        return t[tuple(index)]

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pad like MONAI (constant 0, split before/after) when the image is smaller than the window."""
        return F.pad(x, self.pad) if any(self.pad) else x

    def blend(self, slices: Sequence[tuple[slice, ...]]) -> torch.Tensor:
        """w/Ω for a batch of windows: (B, *roi)."""
        return torch.stack([self.weight / self.overlap_weight[s] for s in slices])


def pad_to_window(image_size: Sequence[int], roi_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI's (and nnU-Net's) padding of an image smaller than the window: ``(pad, padded_size)``,
    ``pad`` in ``torch.nn.functional.pad`` order (last dim first), ``d // 2`` before and the rest after."""
    nd = len(image_size)
    pad: list[int] = []
    for d in reversed(range(nd)):
        diff = max(int(roi_size[d]) - int(image_size[d]), 0)
        pad.extend([diff // 2, diff - diff // 2])
    return tuple(pad), tuple(max(int(image_size[d]), int(roi_size[d])) for d in range(nd))


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """MONAI's scan interval: ``int(roi * (1 - overlap))`` (at least 1), or the roi when it fits exactly."""
    out = []
    for img, roi, o in zip(image_size, roi_size, overlap):
        out.append(int(roi) if roi == img else max(int(roi * (1 - o)), 1))
    return tuple(out)


def window_geometry(
    image_size: Sequence[int],
    roi_size: Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    blend: BlendMode = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    window: SlidingWindow | None = None,
) -> WindowGeometry:
    """The window layout MONAI's ``sliding_window_inference`` uses for this image and window size
    (nnU-Net's tiling and gaussian for ``blend = "nnunet"``, see :mod:`engine.attribution.nnunet_windows`).

    ``window``: the full settings to keep with the layout (default: these with default batching).
    """
    if window is None:
        window = SlidingWindow(roi_size=tuple(int(r) for r in roi_size), overlap=overlap, blend=blend)
    if blend in GEOMETRIES:
        return GEOMETRIES[blend](image_size, roi_size, overlap=overlap, device=device, dtype=dtype, window=window)
    nd = len(image_size)
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != nd:
        raise ValueError(f"roi_size {roi} has {len(roi)} dims but the image has {nd} spatial dims")
    if any(r <= 0 for r in roi):
        raise ValueError(f"roi_size must be positive, got {roi}")
    ov = (float(overlap),) * nd if isinstance(overlap, (int, float)) else tuple(float(o) for o in overlap)
    if any(o < 0 or o >= 1 for o in ov):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("constant", "gaussian"):
        raise ValueError(f"blend must be 'constant' or 'gaussian', got {blend!r}")
    pad, padded = pad_to_window(image_size, roi)
    interval = scan_interval(padded, roi, ov)
    slices = tuple(tuple(s) for s in dense_patch_slices(padded, roi, interval, return_slice=True))
    weight = compute_importance_map(roi, mode=blend, sigma_scale=sigma_scale, device=device, dtype=dtype)
    weight = weight.reshape(roi)
    omega = torch.zeros(padded, dtype=dtype, device=device)
    for s in slices:
        omega[s] += weight
    return WindowGeometry(
        image_size=tuple(int(i) for i in image_size), roi_size=roi, pad=pad, padded_size=padded,
        slices=slices, weight=weight, overlap_weight=omega,
        window=window,
    )


#: Window layouts of other frameworks' sliding-window inference, by blend name (``"nnunet"`` is
#: registered by :mod:`engine.attribution.nnunet_windows`): ``(image_size, roi_size, *, overlap,
#: device, dtype, window) -> WindowGeometry``. The exact seeds w/Ω hold for any such layout.
GEOMETRIES: dict[str, Callable[..., WindowGeometry]] = {}


def geometry_forward(
    model: torch.nn.Module, x: torch.Tensor, geometry: WindowGeometry, *, window_batch: int = 1,
) -> torch.Tensor:
    """The stitched prediction Σ_w w · Z_w / Ω of ``x`` (1, C_in, *S) over ``geometry``'s windows, no grad."""
    xp = geometry.pad_input(x)
    out: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, geometry.n_windows, window_batch):
            batch = geometry.slices[start:start + window_batch]
            win = torch.cat([xp[(slice(None), slice(None), *s)] for s in batch])
            z = model(win).float()
            if out is None:
                out = torch.zeros((1, z.shape[1], *geometry.padded_size), device=x.device,
                                  dtype=geometry.weight.dtype)
            for b, s in enumerate(batch):
                out[(0, slice(None), *s)] += z[b] * geometry.weight
        assert out is not None
        out /= geometry.overlap_weight
    return geometry.crop(out)


def stitched_forward(model: torch.nn.Module, x: torch.Tensor, window: SlidingWindow) -> torch.Tensor:
    """MONAI's stitched sliding-window prediction Ẑ of ``x`` (1, C_in, *S) -> (1, C, *S), no grad
    (nnU-Net's for ``blend = "nnunet"``).

    The result has ``x``'s dtype (autocast and the memory format only change how the windows are computed).
    """
    prepare_model(model, resolve_memory_format(window.memory_format, x.device, x.dim() - 2))
    fast = resolve_kernels(window.kernels, x.device)
    if window.blend in GEOMETRIES:  # a layout of another framework's inference (nnU-Net's)
        geometry = window.geometry(tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
        with autocast(x.device, window.autocast), engine_kernels(model, fast, guard=False):
            return geometry_forward(model, x, geometry, window_batch=window.window_batch).to(x.dtype)
    with torch.no_grad(), autocast(x.device, window.autocast), engine_kernels(model, fast, guard=False):
        out = sliding_window_inference(
            x, window.roi_size, window.window_batch, model, overlap=window.overlap, mode=window.blend,
            padding_mode="constant", cval=0.0,
        )
    return torch.as_tensor(out).to(x.dtype)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 as IEEE float32 while the engine runs: TF32 off for cuDNN convolutions and CUDA
    matrix products, the caller's settings restored after.

    PyTorch runs cuDNN convolutions in TF32 by default (a 10-bit mantissa, ~1e-3 relative), so an
    exact run on a GPU would not be exact without this; reduced-precision (autocast) runs leave the
    settings as the user has them. The flags are CUDA's: on a CPU setting them changes nothing.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _is_exact(dtype: torch.dtype | None) -> bool:
    """Whether an autocast setting means an exact run (none, or float32)."""
    return dtype is None or dtype == torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; for None / float32, exact float32 (:func:`exact_fp32`)."""
    return exact_fp32() if _is_exact(dtype) else torch.autocast(device_type=device.type, dtype=dtype)


def _exact_if_fp32(dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """:func:`exact_fp32` for exact runs (covering their backward passes too), nothing under autocast."""
    return exact_fp32() if _is_exact(dtype) else nullcontext()


def resolve_vjp_mode(mode: VJPMode, device: torch.device) -> Literal["loop", "batched"]:
    """``auto``: a loop over the classes with a retained graph, on every device.

    The vmap-batched path (``is_grads_batched``) was measured slower everywhere: 2.5x on the CPU
    (vmap over convolution backward does not vectorise there), and on an H200 with Swin UNETR at
    96³ windows 0.88x the loop's speed at the patient level (0.66x channels-last) for 4.6x its
    memory; 17 classes of 4 windows batched need over 139 GiB (BENCHMARKS.md). ``batched`` stays
    available for models whose backward vmap does batch well.
    """
    if mode == "auto":
        return "loop"
    if mode not in ("loop", "batched"):
        raise ValueError(f"vjp must be 'auto', 'loop' or 'batched', got {mode!r}")
    return mode


def resolve_memory_format(fmt: MemoryFormat, device: torch.device, spatial_dims: int) -> torch.memory_format | None:
    """The layout to run the model and the window batches in, or None to leave them as they are.

    ``auto``: ``channels_last_3d`` for 3-D volumes on CPUs, where oneDNN's 3-D convolutions and
    their backward run about 1.2-1.4x faster in it (measured on the demo UNet, BENCHMARKS.md);
    elsewhere the model keeps the layout it has (on an H200, Swin UNETR's bf16 forward and VJPs
    ran 0.85x as fast channels-last as contiguous, BENCHMARKS.md).
    The values computed are the same either way up to float rounding (the order of the
    reductions inside the kernels differs).
    """
    if fmt == "channels_last" and spatial_dims != 3:
        raise ValueError(f"memory_format 'channels_last' needs 3-D volumes, got {spatial_dims} spatial dims")
    if fmt == "contiguous":
        return torch.contiguous_format
    if fmt == "channels_last" or (device.type == "cpu" and spatial_dims == 3):
        return torch.channels_last_3d
    return None


def prepare_model(model: torch.nn.Module, memory_format: torch.memory_format | None) -> None:
    """Put the model's 5-D weights and buffers in ``memory_format`` once (in place; the values are
    unchanged). Tensors of other ranks are left alone (``Module.to(memory_format=...)`` would refuse them)."""
    if memory_format is None:
        return
    for t in (*model.parameters(), *model.buffers()):
        if t.dim() == 5 and not t.is_contiguous(memory_format=memory_format):
            t.data = t.data.contiguous(memory_format=memory_format)


def _in_layout(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` in memory format ``fmt`` with that format's strides. A one-channel image is already
    "contiguous" in channels-last too, so ``contiguous(memory_format=...)`` keeps its contiguous strides,
    and convolutions then return a contiguous output: the model's first layers would run outside
    channels-last (and past the engine's channels-last norms)."""
    if fmt == torch.contiguous_format or t.dim() < 4 or t.shape[1] != 1:
        return t.contiguous(memory_format=fmt)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def _vjp(logits: torch.Tensor, win: torch.Tensor, seed: torch.Tensor, *, retain: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(logits, win, seed, retain_graph=retain)
    return g


def _add(maps: torch.Tensor, i: int, g: torch.Tensor, slices: Sequence[tuple[slice, ...]]) -> None:
    """Scatter-add window gradients g (B, C_in, *roi) of class row i into the full-volume maps."""
    g = g.to(maps.dtype)
    for b, s in enumerate(slices):
        maps[(i, slice(None), *s)] += g[b]


def window_gradients(
    model: torch.nn.Module,
    x: torch.Tensor,
    geometry: WindowGeometry,
    classes: Sequence[int],
    seed_fn: SeedFn,
    *,
    out: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Input gradients of every class's target through the stitched prediction.

    ``x`` is (1, C_in, *S); returns maps (K, C_in, *S) for ``classes``, multiplied by ``scale``
    and added into ``out`` when given (so SmoothGrad samples and IG steps accumulate in place,
    with their weights folded into the seeds instead of an extra buffer), and counters of the
    work done (forwards = windows run, vjps = class VJPs per window, like forwards). Batching, autocast and the
    VJP mode come from ``geometry.window``.
    """
    if x.dim() != 2 + len(geometry.image_size) or x.shape[0] != 1:
        raise ValueError(f"expected x of shape (1, C_in, *{geometry.image_size}), got {tuple(x.shape)}")
    mode = resolve_vjp_mode(geometry.window.vjp, x.device)
    fmt = resolve_memory_format(geometry.window.memory_format, x.device, len(geometry.image_size))
    prepare_model(model, fmt)
    xp = geometry.pad_input(x.detach())
    k = len(classes)
    maps = out if out is not None else torch.zeros((k, x.shape[1], *geometry.image_size), device=x.device,
                                                   dtype=x.dtype)
    padded_maps = torch.zeros((k, x.shape[1], *geometry.padded_size), device=x.device,
                              dtype=maps.dtype) if any(geometry.pad) else maps
    counters = {"forwards": 0, "vjps": 0}
    # the engine's CPU kernels (oneDNN convolutions for one-window batches, PReLU's input gradient
    # alone; engine.attribution.kernels); vmap-batched VJPs keep PyTorch's, which vmap can batch
    fast = resolve_kernels(geometry.window.kernels, x.device) and mode != "batched"
    # a channels-last model needs the instance-norm guard on any kernels (a PyTorch bug; see kernels)
    with engine_kernels(model, fast, guard=fmt == torch.channels_last_3d,
                        fuse=resolve_fused(geometry.window.kernels, geometry.roi_size)) as kernels, \
            _exact_if_fp32(geometry.window.autocast):
        _window_passes(model, xp, geometry, classes, seed_fn, padded_maps, counters, mode=mode, fmt=fmt,
                       scale=scale, kernels=kernels)
    if padded_maps is not maps:
        maps += geometry.crop(padded_maps)
    return maps, counters


def _window_passes(model: torch.nn.Module, xp: torch.Tensor, geometry: WindowGeometry, classes: Sequence[int],
                   seed_fn: SeedFn, padded_maps: torch.Tensor, counters: dict[str, int], *, mode: str,
                   fmt: torch.memory_format | None, scale: float, kernels: EngineKernels | None = None) -> None:
    """The forwards and VJPs of :func:`window_gradients`, window batch by window batch, added into
    ``padded_maps`` (K, C_in, *padded) and counted in ``counters``; ``kernels``, the engine's CPU
    kernels when they run, are told each seed's live channels where the seed builder knows them."""
    window_batch, autocast_dtype = geometry.window.window_batch, geometry.window.autocast
    for start in range(0, geometry.n_windows, window_batch):
        batch_slices = geometry.slices[start:start + window_batch]
        win = torch.cat([xp[(slice(None), slice(None), *s)] for s in batch_slices])
        win = (win if fmt is None else _in_layout(win, fmt)).requires_grad_(True)
        with torch.enable_grad(), autocast(xp.device, autocast_dtype):
            logits = model(win)
        if logits.shape[2:] != win.shape[2:]:
            raise ValueError(
                f"the model's output spatial size {tuple(logits.shape[2:])} differs from its input "
                f"{tuple(win.shape[2:])}; the engine needs a dense segmentation model"
            )
        counters["forwards"] += len(batch_slices)
        present_fn = getattr(seed_fn, "present", None)
        if mode == "loop" and present_fn is not None:
            # One class at a time: its seed is built in a scratch buffer shared by the batch's
            # classes, its VJP taken and added in before the next class (one seed alive, not K).
            todo = [i for i, c in enumerate(classes) if present_fn(c, batch_slices)]
            # In the layout the kernels read it in (EngineKernels.seed_layout): contiguous where only
            # their own head convolution reads it (a channel is then one block to write and clear),
            # else that of the model's normalised activations, which it meets through an add (a seed
            # in another layout costs a transposing add per VJP; the values are the same)
            layout = kernels.seed_layout(logits) if kernels is not None else torch.contiguous_format
            scratch = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=layout)
            live_fn = getattr(seed_fn, "live_channels", None)
            values_fn = getattr(seed_fn, "live_values", None)
            for j, i in enumerate(todo):
                seed = seed_fn(classes[i], batch_slices, logits, out=scratch, scale=scale)  # type: ignore[call-arg]
                assert seed is not None
                seed = seed.to(logits.dtype)
                live = live_fn(classes[i]) if live_fn is not None else None
                # the seed on its live channel as its own tensor: the kernels need not gather it back
                values = values_fn() if values_fn is not None and live is not None else None
                with kernels.seed_channels(seed, live, values) if kernels is not None else nullcontext():
                    g = _vjp(logits, win, seed, retain=j < len(todo) - 1)
                _add(padded_maps, i, g, batch_slices)
            counters["vjps"] += len(todo) * len(batch_slices)
            continue
        seeds: list[torch.Tensor] = []
        present: list[int] = []
        for i, c in enumerate(classes):
            seed = seed_fn(c, batch_slices, logits)
            if seed is not None:
                seeds.append((seed * scale if scale != 1.0 else seed).to(logits.dtype))
                present.append(i)
        if not present:
            continue
        if mode == "batched" and len(present) > 1:
            (grads,) = torch.autograd.grad(logits, win, torch.stack(seeds), is_grads_batched=True)
            for j, i in enumerate(present):
                _add(padded_maps, i, grads[j], batch_slices)
        else:
            for j, i in enumerate(present):
                _add(padded_maps, i, _vjp(logits, win, seeds[j], retain=j < len(present) - 1), batch_slices)
        counters["vjps"] += len(present) * len(batch_slices)
