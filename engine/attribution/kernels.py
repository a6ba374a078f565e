"""oneDNN convolutions for one-window batches on CPUs: the same values, 1.6-1.9x faster VJPs.

PyTorch sends a CPU float32 3-D convolution to oneDNN only when its heuristic expects that to pay:
with a batch of one and a 3x3x3 kernel it takes its own im2col path ("slow_conv3d",
"slow_conv_transpose3d") whenever N * C * D * H <= 20480, which is every layer but the
full-resolution ones of a typical 3-D UNet at 48-96 voxel windows. For those shapes, forward and
input-gradient are 5-12x slower than oneDNN's on the same tensors (measured:
``benchmarks/attribution_speed.py``, BENCHMARKS.md), and the engine always runs one window at a time
on CPUs (``window_batch = 1``) and takes one VJP per class, so nearly all of its backward time was
spent there.

:class:`OneDNNConvolutions` is a ``TorchFunctionMode`` that routes ``conv3d`` and
``conv_transpose3d`` calls with float32 CPU tensors and frozen weights through oneDNN
(``torch.ops.mkldnn._convolution_pointwise`` / ``_convolution_transpose_pointwise``, the
kernels ``torch.compile`` uses for CPU convolutions), with their exact adjoints as backward:
the input gradient of a convolution is the transposed convolution of the output gradient with
the same weight, and vice versa. Values equal PyTorch's own up to float rounding (the reduction
order inside the kernels differs; tested at 1e-5 relative against autograd). Where a ReLU-type
activation's input lies within rounding of zero (an untrained network on noise), any two fp32
kernel orders can take different branches and the gradient differs at those voxels, ~1e-5 relative
on a test nnU-Net; float64 sides with neither. Any other call —
weights that require grad, autocast, other devices, dtypes, ranks, string padding, tensor
subclasses — runs PyTorch's own kernels unchanged.

:func:`conv_kernels` is what the engine enters around a window's forward and its VJPs: it freezes
the model's parameters for the duration (the attribution needs input gradients only; the flags are
restored afterwards) and enters the mode when :func:`resolve_conv_backend` says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode

ConvBackend = Literal["auto", "onednn", "torch"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN enabled and the pointwise convolution kernels."""
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        has_ops = mk is not None and hasattr(mk, "_convolution_pointwise") and hasattr(
            mk, "_convolution_transpose_pointwise")
    except (AttributeError, RuntimeError):
        has_ops = False
    return bool(has_ops and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def resolve_conv_backend(backend: ConvBackend, device: torch.device | str) -> bool:
    """True when convolutions should run through :class:`OneDNNConvolutions`.

    ``auto``: on CPUs whose PyTorch has oneDNN; ``onednn``: the same, and an error where it cannot
    apply; ``torch``: PyTorch's own choice of kernels everywhere.
    """
    if backend not in ("auto", "onednn", "torch"):
        raise ValueError(f"conv_backend must be 'auto', 'onednn' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    on_cpu = torch.device(device).type == "cpu"
    if backend == "onednn" and not on_cpu:
        raise ValueError(f"conv_backend 'onednn' runs on CPUs only, not on {torch.device(device)}; "
                         "use conv_backend='auto' or 'torch'")
    if backend == "onednn" and not onednn_available():
        raise ValueError("conv_backend 'onednn' needs a PyTorch build with oneDNN (torch.backends.mkldnn); "
                         "use conv_backend='auto' or 'torch'")
    return on_cpu and onednn_available()


def _triple(v: Any) -> list[int] | None:
    """A 3-D conv parameter as three ints, or None when it is not numeric (e.g. padding='same')."""
    if isinstance(v, int):
        return [v, v, v]
    if isinstance(v, (tuple, list)) and len(v) in (1, 3) and all(isinstance(a, int) for a in v):
        return [int(a) for a in v] * (3 if len(v) == 1 else 1)
    return None


def _bind(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = {**{k: _DEFAULTS.get(k) for k in names}, **dict(zip(names, args)), **kwargs}
    return bound


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def _eligible(x: Any, w: Any, b: Any) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # subclasses keep theirs
        return False
    if x.device.type != "cpu" or x.dim() != 5 or w.dim() != 5 or x.is_mkldnn or w.is_mkldnn:
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if w.requires_grad or (b is not None and b.requires_grad):
        return False  # weight gradients are wanted: PyTorch's kernels compute them
    return not torch.is_autocast_enabled("cpu")


class _Conv3d(torch.autograd.Function):
    """conv3d through oneDNN; backward: the input gradient only (weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.conv = (stride, padding, dilation, groups, tuple(x.shape[2:]))
        return torch.ops.mkldnn._convolution_pointwise(_dense(x), _dense(w), b, padding, stride, dilation, groups,
                                                       "none", [], None)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups, in_size = ctx.conv
        # the output padding that makes the transposed convolution return x's size
        out_pad = [in_size[i] - ((gy.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                 + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(3)]
        gx = torch.ops.mkldnn._convolution_transpose_pointwise(_dense(gy), _dense(w), None, padding, out_pad, stride,
                                                               dilation, groups, "none", [], None)
        return gx, None, None, None, None, None, None


class _ConvTranspose3d(torch.autograd.Function):
    """conv_transpose3d through oneDNN; backward: the input gradient only (weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: list[int],
                padding: list[int], output_padding: list[int], groups: int, dilation: list[int]) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.conv = (stride, padding, dilation, groups)
        return torch.ops.mkldnn._convolution_transpose_pointwise(_dense(x), _dense(w), b, padding, output_padding,
                                                                 stride, dilation, groups, "none", [], None)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gx = torch.ops.mkldnn._convolution_pointwise(_dense(gy), _dense(w), None, padding, stride, dilation, groups,
                                                     "none", [], None)
        return gx, None, None, None, None, None, None, None


class OneDNNConvolutions(TorchFunctionMode):
    """Run eligible ``conv3d`` / ``conv_transpose3d`` calls through oneDNN (see the module docstring).

    ``calls`` counts the convolutions it routed, for tests and benchmarks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv3d or func is torch.nn.functional.conv3d:
            a = _bind(_CONV_ARGS, args, kwargs)
            if a is not None and _eligible(a["input"], a["weight"], a["bias"]):
                s, p, d = _triple(a["stride"]), _triple(a["padding"]), _triple(a["dilation"])
                if s is not None and p is not None and d is not None and isinstance(a["groups"], int):
                    self.calls += 1
                    return _Conv3d.apply(a["input"], a["weight"], a["bias"], s, p, d, a["groups"])
        elif func is torch.conv_transpose3d or func is torch.nn.functional.conv_transpose3d:
            a = _bind(_CONVT_ARGS, args, kwargs)
            if a is not None and _eligible(a["input"], a["weight"], a["bias"]):
                s, p, d = _triple(a["stride"]), _triple(a["padding"]), _triple(a["dilation"])
                op = _triple(a["output_padding"])
                # the backward's convolution returns x's size only when output_padding < stride
                if (s is not None and p is not None and d is not None and op is not None
                        and isinstance(a["groups"], int) and all(o < st for o, st in zip(op, s))):
                    self.calls += 1
                    return _ConvTranspose3d.apply(a["input"], a["weight"], a["bias"], s, p, op, a["groups"], d)
        return func(*args, **kwargs)


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside (input gradients only); the flags are restored after."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


@contextmanager
def conv_kernels(model: torch.nn.Module, onednn: bool) -> Iterator[OneDNNConvolutions | None]:
    """Frozen parameters, and :class:`OneDNNConvolutions` when ``onednn`` (from
    :func:`resolve_conv_backend`); yields the mode (or None) so callers can read its ``calls``."""
    with frozen_parameters(model):
        if not onednn:
            yield None
            return
        with OneDNNConvolutions() as mode:
            yield mode
