"""The engine's CPU kernels: the same values as PyTorch's, 1.6-1.9x faster input gradients.

Two places where PyTorch's CPU defaults cost the engine most of its time, measured on the demo UNet
(``benchmarks/attribution_speed.py``, BENCHMARKS.md):

* **Convolutions.** PyTorch sends a CPU float32 3-D convolution to oneDNN only when its heuristic
  expects that to pay: with a batch of one and a 3x3x3 kernel it takes its own im2col path
  ("slow_conv3d", "slow_conv_transpose3d") whenever N * C * D * H <= 20480, which is every layer but
  the full-resolution ones of a typical 3-D UNet at 48-96 voxel windows. For those shapes forward and
  input gradient are 5-12x slower than oneDNN's on the same tensors, and the engine runs one window
  at a time on CPUs and takes one VJP per class. Here ``conv3d`` / ``conv_transpose3d`` calls with
  float32 CPU tensors and frozen weights run through oneDNN (``torch.ops.mkldnn._convolution_pointwise``
  / ``_convolution_transpose_pointwise``, the kernels ``torch.compile`` uses for CPU convolutions),
  with their exact adjoints as backward: the input gradient of a convolution is the transposed
  convolution of the output gradient with the same weight, and vice versa.
* **PReLU's backward** always reduces the weight's gradient too, and when the incoming gradient and
  the saved input have different memory layouts (instance norms return contiguous tensors between
  channels-last convolutions) it falls to a scalar loop: ~1 ms per call, a quarter of a bf16 VJP.
  With a frozen weight the input gradient alone is ``gy`` where x > 0 and ``a * gy`` elsewhere
  (``leaky_relu_backward`` for one slope), taken on ``gy`` in the input's layout.

Values equal PyTorch's own up to float rounding (the reduction order inside the convolution kernels
differs; the PReLU gradient is the same products). Tested at 1e-5 relative against autograd. Where
a ReLU-type activation's input lies within rounding of zero (an untrained network on noise), any
two fp32 kernel orders can take different branches and the gradient differs at those voxels, ~1e-5
relative on a test nnU-Net; float64 sides with neither. Any other call (weights that require grad,
other devices, dtypes or ranks, string padding, tensor subclasses) runs PyTorch's kernels unchanged;
under autocast the convolutions are PyTorch's (bf16 ones already run on oneDNN) and PReLU is taken.

**A guard for a PyTorch bug.** On CPUs (torch 2.13) ``instance_norm``'s backward is silently wrong
for a batch of one when the incoming gradient is channels-last and the norm's output is not
(``InstanceNorm`` always returns a contiguous tensor): relative errors of order 1, not rounding.
Channels-last convolutions return channels-last gradients, and an activation's backward keeps
that layout, so a channels-last model whose norm is followed by GELU, or by an in-place residual
add (MONAI's ``DynUNet`` / ``UnetResBlock``, Swin UNETR's decoder), got wrong maps. With the guard
on, every ``instance_norm`` output that requires grad is a copy whose backward hands the norm its
gradient in the output's layout (tested against float64 on such models; the copy is one per norm
per forward).

:func:`engine_kernels` is what the engine enters around a window's forward and its VJPs: it freezes
the model's parameters for the duration (the attribution needs input gradients only; the flags are
restored afterwards) and enters :class:`EngineKernels` when :func:`resolve_kernels` says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch.overrides import TorchFunctionMode

Kernels = Literal["auto", "engine", "torch"]
#: The accepted values of ``kernels`` (``SlidingWindow``, a job's ``[attribution] kernels``).
KERNELS: tuple[str, ...] = get_args(Kernels)

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


def resolve_kernels(kernels: Kernels, device: torch.device | str) -> bool:
    """True when the model should run under :class:`EngineKernels`.

    ``auto``: on CPUs whose PyTorch has oneDNN; ``engine``: the same, and an error where it cannot
    apply; ``torch``: PyTorch's own kernels everywhere.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be 'auto', 'engine' or 'torch', got {kernels!r}")
    if kernels == "torch":
        return False
    on_cpu = torch.device(device).type == "cpu"
    if kernels == "engine" and not on_cpu:
        raise ValueError(f"kernels 'engine' run on CPUs only, not on {torch.device(device)}; "
                         "use kernels='auto' or 'torch'")
    if kernels == "engine" and not onednn_available():
        raise ValueError("kernels 'engine' need a PyTorch build with oneDNN (torch.backends.mkldnn); "
                         "use kernels='auto' or 'torch'")
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
    return {**{k: _DEFAULTS.get(k) for k in names}, **dict(zip(names, args)), **kwargs}


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def _plain_cpu(*tensors: Any) -> bool:
    """Plain tensors or parameters on the CPU (subclasses such as MONAI's MetaTensor keep their dispatch)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors)


def _eligible(x: Any, w: Any, b: Any) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    if not _plain_cpu(*tensors) or x.dim() != 5 or w.dim() != 5 or x.is_mkldnn or w.is_mkldnn:
        return False
    if any(t.dtype != torch.float32 for t in tensors):
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


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _PReLU(torch.autograd.Function):
    """PReLU with a frozen weight; backward: the input gradient only, in the input's layout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        y = torch.prelu(x, a)
        ctx.save_for_backward(x.to(y.dtype), a.to(y.dtype))  # the dtypes the forward computed in
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        x, a = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous(memory_format=_layout_of(x))
        if a.numel() == 1:
            return torch.ops.aten.leaky_relu_backward(gy, x, a.item(), False), None
        slope = a.reshape(1, -1, *([1] * (x.dim() - 2)))  # one slope per channel
        return torch.where(x > 0, gy, gy * slope), None


def _prelu_eligible(x: Any, a: Any) -> bool:
    return (_plain_cpu(x, a) and x.dim() >= 2 and not a.requires_grad and x.is_floating_point()
            and a.is_floating_point() and (a.numel() == 1 or a.numel() == x.shape[1]))


class _GradInLayout(torch.autograd.Function):
    """A copy of an instance norm's output whose backward passes the gradient on in that output's layout."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        ctx.layout = _layout_of(y)
        return y.clone()  # a copy, not a view: the model may modify it in place (``out += residual``)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous(memory_format=ctx.layout)


class EngineKernels(TorchFunctionMode):
    """With ``fast``, run eligible ``conv3d`` / ``conv_transpose3d`` calls through oneDNN and ``prelu``
    with a frozen weight through an input-gradient-only backward; with ``guard``, hand every
    ``instance_norm`` its gradient in its output's layout (see the module docstring).

    ``calls`` counts the convolutions it routed, ``prelu_calls`` the PReLUs and ``guarded`` the
    instance norms, for tests and benchmarks.
    """

    def __init__(self, fast: bool = True, guard: bool = True) -> None:
        super().__init__()
        self.fast = fast
        self.guard = guard
        self.calls = 0
        self.prelu_calls = 0
        self.guarded = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.instance_norm or func is torch.instance_norm:
            out = func(*args, **kwargs)
            if self.guard and isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                self.guarded += 1
                return _GradInLayout.apply(out)
            return out
        if not self.fast:
            return func(*args, **kwargs)
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
        elif func is torch.prelu or func is torch.nn.functional.prelu:
            a = _bind(("input", "weight"), args, kwargs)
            if a is not None and _prelu_eligible(a["input"], a["weight"]):
                self.prelu_calls += 1
                return _PReLU.apply(a["input"], a["weight"])
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
def engine_kernels(model: torch.nn.Module, on: bool, guard: bool = True) -> Iterator[EngineKernels | None]:
    """Frozen parameters, and :class:`EngineKernels` with its fast kernels when ``on`` (from
    :func:`resolve_kernels`) and its instance-norm guard when ``guard`` (the engine sets it whenever
    the model runs channels-last); yields the mode (or None) so callers can read its counters."""
    with frozen_parameters(model):
        if not (on or guard):
            yield None
            return
        with EngineKernels(fast=on, guard=guard) as mode:
            yield mode
