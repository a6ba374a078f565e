"""The engine's CPU kernels: the same values as PyTorch's, faster forwards and input gradients.

Where PyTorch's CPU defaults cost the engine most of its time, measured on the demo UNet
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
  convolution of the output gradient with the same weight, and vice versa. Under CPU bf16 autocast
  they run the same oneDNN kernels in bf16, as autocast's would (bitwise equal, tested).
* **Dead output channels.** A class's VJP seeds one channel of the logits, so the head convolution's
  output gradient has one live channel of K; PyTorch still runs the whole K-channel transposed
  convolution (on the demo UNet, whose head is a 17 -> 17 3x3x3 convolution, 81% of a VJP's FLOPs).
  The routed backward checks which channels of its output gradient hold any nonzero value and, when
  at most half do, runs on those channels and the matching weight slices only: the dropped terms are
  exact zeros. A site (convolution) whose gradient once had all channels live is not checked again
  in the session; the check is a pass over the gradient, ~0.2-0.3 ms at the demo's full resolution.
  Into a contiguous input (a head after an instance norm) a stride-1 narrowed gradient is taken as
  the convolution of the flipped kernel, as fast and bitwise the same here, because it returns the
  input's layout: the class seed's identity branch then meets it without a transposing add.
* **Dead voxels.** A class seed is also zero outside the class's voxels, so a narrowed output
  gradient is taken on the box around its nonzero voxels when that box holds at most half of them:
  the transposed convolution of the box alone, written into exact zeros. On the demo phantom the
  boxes of 15 of the 17 classes hold 0.6-19% of the window (BENCHMARKS.md).
* **Input gradients into an image's few channels.** oneDNN's transposed convolution to one output
  channel is poorly vectorised: on the demo UNet's first layers (8 -> 1 channel, stride 2) it takes
  1.1-1.4 ms where PyTorch's im2col kernel takes 0.3 ms, but from ~9e5 gradient elements (8 x 48^3)
  the order reverses. A convolution whose input has at most two channels and whose output gradient
  has at most 2^19 elements takes its input gradient from the im2col kernel, in float32 (under bf16
  autocast that is the input's dtype, and more precise). A fixed rule: a timed choice would make
  two runs differ in their last bits.
* **Instance norms in channels-last.** PyTorch's CPU ``instance_norm`` copies a channels-last input
  to contiguous and returns a contiguous output, between convolutions that run channels-last. So
  each VJP paid a transposing copy of the full-resolution gradient: oneDNN reorders a contiguous
  gradient before the up-convolution's backward (1.5 ms of a 14 ms VJP on the demo UNet). A float32
  channels-last norm of at least 2^16 elements per sample, on the input's own statistics with
  frozen or no affine parameters, runs PyTorch's forward bit for bit and copies its output to
  channels-last, once per forward (a copy of it goes to the model, which may modify it in place,
  where the backward keeps it). Its backward, ``rstd * gamma * (g - mean(g) - x_hat *
  mean(g * x_hat))``, runs on the channels-last gradient viewed as rows of whole channel groups
  (``_period``), where PyTorch's elementwise kernels vectorise, and returns a channels-last
  gradient. Of a large gradient (from 2^21 elements per sample) it takes both per-channel sums in
  one pass (:func:`_column_sums`: batch norm's backward reduction on blocks of 64 rows) where the
  eager sums read the tensors four times and wrote their product: on the demo UNet at 64^3 windows
  the head's norm backward went from 8.5 to 5.6 ms and a class VJP 8% faster, 14% at 80^3. It is as
  close to float64 as PyTorch's own (tested). :attr:`EngineKernels.norm_layout`
  tells the engine the norms' layout, and the engine builds its class seeds in it: through a
  residual head the seed meets the normalised activations without a transposing add.
* **Residual heads.** MONAI's ``ResidualUnit`` with an identity shortcut ends the demo UNet: its
  logits are ``conv(h) + h``. Autograd gives the seed to both branches and adds the convolution's input
  gradient to it, a full-resolution add per class VJP. ``conv(x) + x`` for a routed float32 convolution
  with as many output as input channels, stride 1 and a centred padding takes its input gradient as one
  transposed convolution by the kernel plus the identity at its centre tap (:class:`_ResidualConv`;
  the forward is the same add, bit for bit). The engine's seed builder also hands the kernels the seed
  on its live channel as its own tensor, so the narrowed backward does not gather it out of the seed.
* **Instance norm and activation, fused and compiled** (``kernels="compiled"``; ``"auto"`` from windows of
  :data:`FUSE_MIN_VOXELS` voxels). The norm's backward and the PReLU's before it are memory-bound
  passes over full-resolution tensors, about thirteen of them in eager kernels; at large windows those
  tensors outgrow the CPU's caches and every pass goes to memory. A PReLU of the engine's norm output
  (MONAI's ADN) leaves its output gradient with the norm (:class:`_NormActivation`), whose backward takes
  both in one ``torch.compile``d kernel (:func:`_norm_activation_gradient`, two passes). LeakyReLU (in
  place too, as in nnU-Net and DynUNet) and ReLU fuse the same way. On the demo UNet whole one-window
  volumes ran 1.08x faster at the demo's 48 x 40 x 40 windows and, against the eager kernels with
  their one-pass sums and the heap's huge pages, 0.99x at 64^3, 1.19x at 96^3 and 1.08x at 128^3
  (BENCHMARKS.md); the compile costs 12-16 s once per process with a cold Inductor cache. Where
  compiling fails it says so once and the eager kernels run.
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
other devices, dtypes or ranks, string padding, tensor subclasses, fp16 autocast) runs PyTorch's kernels
unchanged.

**A guard for a PyTorch bug.** (For the norms PyTorch still runs.) On CPUs (torch 2.13) ``instance_norm``'s backward is silently wrong
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

import functools
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch.overrides import TorchFunctionMode

_log = logging.getLogger(__name__)

Kernels = Literal["auto", "engine", "compiled", "torch"]
#: The accepted values of ``kernels`` (``SlidingWindow``, a job's ``[attribution] kernels``).
KERNELS: tuple[str, ...] = get_args(Kernels)
#: ``KERNELS`` as an error message names them: ``'auto', 'engine', 'compiled', 'torch'``.
KERNEL_CHOICES = ", ".join(repr(k) for k in KERNELS)

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
    apply; ``compiled``: ``engine``, with each instance norm's backward and that of the activation after
    it fused by ``torch.compile`` (:class:`_NormActivation`); ``torch``: PyTorch's own kernels everywhere.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "torch":
        return False
    on_cpu = torch.device(device).type == "cpu"
    if kernels in ("engine", "compiled") and not on_cpu:
        raise ValueError(f"kernels {kernels!r} run on CPUs only, not on {torch.device(device)}; "
                         "use kernels='auto' or 'torch'")
    if kernels in ("engine", "compiled") and not onednn_available():
        raise ValueError(f"kernels {kernels!r} need a PyTorch build with oneDNN (torch.backends.mkldnn); "
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


def _eligible(x: Any, w: Any, b: Any) -> torch.dtype | None:
    """The dtype the convolution computes in when the engine can run it (float32, or bfloat16 under
    CPU bf16 autocast), else None."""
    tensors = (x, w) if b is None else (x, w, b)
    if not _plain_cpu(*tensors) or x.dim() != 5 or w.dim() != 5 or x.is_mkldnn or w.is_mkldnn:
        return None
    if w.requires_grad or (b is not None and b.requires_grad):
        return None  # weight gradients are wanted: PyTorch's kernels compute them
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        ok = all(t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
        return torch.bfloat16 if ok else None
    return torch.float32 if all(t.dtype == torch.float32 for t in tensors) else None


#: Input gradients into at most this many channels (an image's) from an output gradient of at most
#: this many elements run on PyTorch's im2col transposed convolution instead of oneDNN's, whose
#: kernels for one or two output channels are poorly vectorised: 3-5x faster up to 2^19 elements on
#: this machine (BENCHMARKS.md), slower from ~9e5 (8 x 48^3) on. A fixed rule, not a timed choice,
#: so that two runs give the same bits.
_FEW_CHANNELS = 2
_FEW_CHANNELS_MAX_GRAD = 1 << 19


class _Sites:
    """Per-convolution state of one :class:`EngineKernels` session, keyed by the weight's storage and
    shape: the sites whose output gradient has shown all its channels live (not checked again)."""

    def __init__(self) -> None:
        self.dense: set[tuple[int, tuple[int, ...]]] = set()
        self.narrowed = 0  # backward calls that ran on the live channels only
        self.boxed = 0  # narrowed calls that ran on the box around the gradient's nonzero voxels
        # (seed, the channels it can be nonzero in, its values on them or None): see seed_channels
        self.hint: tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None] | None = None
        self.weights: dict[Any, torch.Tensor] = {}  # narrowed weights, by site, channels, dim and dtype
        self.flips: dict[Any, torch.Tensor] = {}  # flipped narrowed weights (they are in self.weights)
        self.indices: dict[tuple[int, ...], torch.Tensor] = {}  # hinted channel sets as index tensors
        self.residuals: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # w + I, by site (_ResidualConv)
        self.folded = 0  # residual adds whose identity branch was folded into the convolution's backward

    def narrow(self, key: tuple[int, tuple[int, ...]], gy: torch.Tensor, w: torch.Tensor,
               dim: int, hint: tuple[int, ...] | None = None,
               values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``gy`` and ``w`` restricted to gy's live channels (``w``'s ``dim`` indexes them) when at
        most half of them are live; else both unchanged, and the site is not checked again. ``hint``:
        channels known to hold every nonzero of gy (the engine's class seed), which spares the check;
        ``values``: gy on those channels, which spares gathering them (a strided pass over all of gy).
        The narrowed weight is channels-last: oneDNN runs a one-channel transposed convolution 10-20x
        slower on a contiguous weight; it is kept for the session, per site and channel set."""
        if key in self.dense:
            return gy, w
        if hint is not None:
            channels, live = hint, self._index(hint)
        else:
            live = _live_channels(gy)
            channels = tuple(live.tolist())
        if 2 * len(channels) > gy.shape[1]:
            if hint is None:
                self.dense.add(key)
            return gy, w
        self.narrowed += 1
        wkey = (key, channels, dim, w.dtype)
        narrowed = self.weights.get(wkey)
        if narrowed is None:
            narrowed = self.weights[wkey] = w.index_select(dim, live).contiguous(memory_format=torch.channels_last_3d)
        if values is not None:
            return _dense(values.to(gy.dtype)).contiguous(memory_format=_layout_of(gy)), narrowed
        return _select_channels(gy, live, channels), narrowed

    def residual(self, conv: tuple[Any, ...]) -> tuple[Any, ...]:
        """``conv`` (a routed convolution's backward state, see _residual_weight) with its weight plus
        the identity at the kernel's centre tap, and a site of its own (kept for the session)."""
        w, *rest, site = conv
        wr = self.residuals.get(site[1])
        if wr is None:
            wr = w.clone()  # in w's layout
            eye = torch.arange(w.shape[0])
            wr[(eye, eye, *(torch.tensor(k // 2) for k in w.shape[2:]))] += 1.0
            self.residuals[site[1]] = wr
        return (wr, *rest, (self, (wr.data_ptr(), tuple(wr.shape))))

    def _index(self, channels: tuple[int, ...]) -> torch.Tensor:
        """``channels`` as an index tensor (kept: a hint names the same channels for every site)."""
        t = self.indices.get(channels)
        if t is None:
            t = self.indices[channels] = torch.tensor(channels, dtype=torch.long)
        return t

    def flipped(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (out, in, *k) as the kernel of its transposed convolution written as a convolution:
        in and out swapped, every spatial axis reversed (kept for the session)."""
        key = (w.data_ptr(), tuple(w.shape), w.dtype)
        f = self.flips.get(key)
        if f is None:
            f = self.flips[key] = w.transpose(0, 1).flip(2, 3, 4).contiguous()
        return f


def _select_channels(gy: torch.Tensor, live: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
    """``gy.index_select(1, live)`` (``channels``: the same indices as ints) in gy's layout. On a
    channels-last tensor ``index_select`` first copies the whole tensor to contiguous (1.0 ms for the
    demo head's 17 x 48 x 40 x 40); gathering the channels as slices reads only them (0.06 ms for one).
    One channel of a contiguous tensor is a contiguous slice already."""
    if not channels:
        return gy.index_select(1, live)
    if len(channels) == 1 and gy.is_contiguous():
        return gy[:, channels[0]:channels[0] + 1]
    if _layout_of(gy) != torch.channels_last_3d:
        return gy.index_select(1, live)
    return torch.cat([gy[:, i:i + 1] for i in channels], 1).contiguous(memory_format=torch.channels_last_3d)


def _live_channels(gy: torch.Tensor) -> torch.Tensor:
    """Indices of the channels of ``gy`` (N, C, *S) that hold any nonzero value (NaN and inf count)."""
    # a sum of magnitudes is zero only when every term is (bf16 sums accumulate in float32 and any
    # nonzero bf16 magnitude is representable); inf and NaN are nonzero
    if _layout_of(gy) == torch.channels_last_3d:
        rows = gy.permute(0, 2, 3, 4, 1).reshape(-1, gy.shape[1])  # a view, channels innermost
        total = rows.abs().sum(0)
    else:
        total = gy.abs().sum(dim=(0, *range(2, gy.dim())))
    return total.ne(0).nonzero().flatten()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, layout: torch.memory_format) -> torch.Tensor:
    """The input gradient when no output channel or voxel is live: exact zeros, in ``layout``."""
    return torch.empty(shape, dtype=dtype, memory_format=layout).zero_()


#: Where a routed convolution's backward may narrow its output gradient: the session's sites and the
#: convolution's key, or None (grouped convolutions).
_Site = tuple[_Sites, tuple[int, tuple[int, ...]]] | None


def _live_gradient(gy: torch.Tensor, w: torch.Tensor, site: _Site, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``gy`` dense in ``w``'s dtype, and both narrowed to gy's live channels where the site allows
    (``w``'s ``dim`` indexes gy's channels); gy may come back with no channel at all."""
    if site is None:
        return _dense(gy.to(w.dtype)), w
    sites, key = site
    if sites.hint is not None and gy is sites.hint[0]:  # the seed itself
        return sites.narrow(key, _dense(gy.to(w.dtype)), w, dim, sites.hint[1], sites.hint[2])
    return sites.narrow(key, _dense(gy.to(w.dtype)), w, dim)


#: A narrowed input gradient is taken on the box around its output gradient's nonzero voxels when the
#: box holds at most this share of them (the rest of the input gradient is exact zeros).
_BOX_SHARE = 0.5


def _nonzero_box(gy: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per spatial axis of ``gy`` (N, C, D, H, W), the first and last index holding a nonzero value in
    any sample or channel (NaN and inf count: ``amax`` propagates NaN); None when gy is all zeros.
    Float maxima, not boolean ``any``: PyTorch's boolean reductions are ~8x slower here."""
    a = gy[0, 0].abs() if gy.shape[0] * gy.shape[1] == 1 else gy.abs().amax(dim=(0, 1))
    d, h, w = a.shape
    flat = a.reshape(d, h * w)
    plane = flat.amax(0).view(h, w)  # the maximum over depth
    box = []
    for profile in (flat.amax(1), plane.amax(1), plane.amax(0)):
        hit = profile.ne(0).nonzero()
        if hit.numel() == 0:
            return None
        box.append((int(hit[0]), int(hit[-1])))
    return box


def _box_pays(box: list[tuple[int, int]], size: Sequence[int]) -> bool:
    """Whether ``box`` holds at most ``_BOX_SHARE`` of the voxels of ``size``."""
    return math.prod(hi - lo + 1 for lo, hi in box) <= _BOX_SHARE * math.prod(size)


def _boxed_input_gradient(gy: torch.Tensor, w: torch.Tensor, box: list[tuple[int, int]], stride: list[int],
                          padding: list[int], dilation: list[int], x_shape: tuple[int, ...],
                          x_layout: torch.memory_format) -> torch.Tensor:
    """The input gradient of a convolution (groups 1) whose output gradient ``gy`` is zero outside
    ``box``: the transposed convolution of the box alone, without padding, reaches input voxels
    ``lo * s - p`` to ``hi * s - p + d * (k - 1)`` on each axis; those inside the input are written
    into exact zeros. The dropped terms are products with zeros, as with dead channels."""
    crop = gy[(slice(None), slice(None), *(slice(lo, hi + 1) for lo, hi in box))]
    crop = crop.contiguous(memory_format=_layout_of(gy) if gy.shape[1] > 1 else torch.contiguous_format)
    part = torch.ops.mkldnn._convolution_transpose_pointwise(crop, _dense(w), None, [0, 0, 0], [0, 0, 0], stride,
                                                            dilation, 1, "none", [], None)
    gx = _zeros(x_shape, part.dtype, x_layout)
    src, dst = [slice(None), slice(None)], [slice(None), slice(None)]
    for i, (lo, _) in enumerate(box):
        start = lo * stride[i] - padding[i]  # the input voxel of part's first voxel on this axis
        a, b = max(0, start), min(x_shape[2 + i], start + part.shape[2 + i])
        src.append(slice(a - start, b - start))
        dst.append(slice(a, b))
    gx[tuple(dst)] = part[tuple(src)]
    return gx


def _as_convolution(stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    w: torch.Tensor) -> list[int] | None:
    """The padding with which a convolution by the flipped kernel equals the transposed convolution
    (the input gradient of a stride-1 convolution): dilation * (k - 1) - padding per axis; None when
    that does not hold (strides, groups, or a padding wider than the kernel's reach)."""
    if groups != 1 or any(st != 1 for st in stride):
        return None
    pad = [d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], padding)]
    return pad if all(q >= 0 for q in pad) else None


class _Conv3d(torch.autograd.Function):
    """conv3d through oneDNN; backward: the input gradient only (weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int, dtype: torch.dtype, site: _Site) -> torch.Tensor:
        w = w.to(dtype)
        y = torch.ops.mkldnn._convolution_pointwise(_dense(x.to(dtype)), _dense(w), None if b is None else b.to(dtype),
                                                    padding, stride, dilation, groups, "none", [], None)
        # Everything the backward needs is known here, once per forward; the backward runs once per
        # class. The weight is frozen (a parameter, or its cast for autocast), so it is held as is
        # rather than through save_for_backward's version checks.
        # The output padding that makes the transposed convolution return x's size:
        out_pad = [x.shape[2 + i] - ((y.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                     + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(3)]
        ctx.conv = (w, stride, padding, dilation, groups, out_pad, tuple(x.shape), x.dtype, _layout_of(x), site)
        ctx.x_ref = weakref.ref(x)  # to recognise ``conv(x) + x`` (see _ResidualConv); holds nothing alive
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        return (_conv_input_gradient(gy, ctx.conv), *(None,) * 8)


def _conv_input_gradient(gy: torch.Tensor, conv: tuple[Any, ...]) -> torch.Tensor:
    """The input gradient of a routed convolution (``conv``: what its forward held) for output gradient gy."""
    w, stride, padding, dilation, groups, out_pad, x_shape, x_dtype, x_layout, site = conv
    channels = w.shape[0]
    gy, w = _live_gradient(gy, w, site, 0)  # the weight's output channels are gy's
    if gy.shape[1] == 0:
        return _zeros(x_shape, x_dtype, x_layout)
    if gy.shape[1] < channels and groups == 1 and x_shape[1] > _FEW_CHANNELS:
        # a narrowed gradient (a class seed at the head) is zero outside the class's voxels too
        box = _nonzero_box(gy)
        if box is None:
            return _zeros(x_shape, x_dtype, x_layout)
        if _box_pays(box, gy.shape[2:]):
            assert site is not None  # narrowed: only a site narrows
            site[0].boxed += 1
            return _boxed_input_gradient(gy, w, box, stride, padding, dilation, x_shape, x_layout).to(x_dtype)
    narrowed_into_contiguous = gy.shape[1] < channels and x_layout == torch.contiguous_format
    flipped_pad = _as_convolution(stride, padding, dilation, groups, w) if narrowed_into_contiguous else None
    if groups == 1 and x_shape[1] <= _FEW_CHANNELS and gy.numel() <= _FEW_CHANNELS_MAX_GRAD:
        # float32, whatever the autocast dtype: as fast, more precise, and the input's dtype
        gx = torch.ops.aten.slow_conv_transpose3d(gy.float(), w.float(), list(w.shape[2:]), None, stride,
                                                  padding, out_pad, dilation)
    elif flipped_pad is not None:
        # A narrowed gradient into a contiguous input (a head after a norm): the transposed
        # convolution as a convolution with the flipped kernel returns x's layout, so the
        # gradient meets the other branches' without a transposing add (BENCHMARKS.md)
        assert site is not None  # narrowed: only a site narrows
        gx = torch.ops.mkldnn._convolution_pointwise(gy.contiguous(), site[0].flipped(w), None, flipped_pad, stride,
                                                     dilation, groups, "none", [], None)
    else:
        gx = torch.ops.mkldnn._convolution_transpose_pointwise(gy, _dense(w), None, padding, out_pad, stride,
                                                               dilation, groups, "none", [], None)
    return gx.to(x_dtype)


def _residual_weight(conv: tuple[Any, ...], x: torch.Tensor) -> bool:
    """Whether ``conv(x) + x`` can take its input gradient as one transposed convolution whose kernel is
    the convolution's plus the identity at its centre tap: a float32 convolution with groups 1, as many
    output channels as input channels, stride 1 and a centred ("same") padding, and a float32 x."""
    w, stride, padding, dilation, groups, _, x_shape, x_dtype, _, site = conv
    return (site is not None and groups == 1 and w.dtype == torch.float32 and x_dtype == torch.float32
            and x.dtype == torch.float32 and tuple(x.shape) == x_shape and w.shape[0] == w.shape[1] == x_shape[1]
            and all(st == 1 for st in stride)
            and all(k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(w.shape[2:], padding, dilation)))


class _ResidualConv(torch.autograd.Function):
    """``a + x`` where ``a`` is a routed convolution of x that meets _residual_weight's terms (MONAI's
    ``ResidualUnit`` with an identity shortcut: the UNet's head). The forward is the same add; the
    backward folds the identity branch into the convolution's: ``conv^T(g, w) + g = conv^T(g, w + I)``
    with I the identity at the kernel's centre, one transposed convolution (narrowed to the seed's
    live channels and boxed as any other) instead of that and a full-resolution add of g into it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, conv: tuple[Any, ...]) -> torch.Tensor:
        ctx.conv = conv
        return torch.add(a, x)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _conv_input_gradient(gy, ctx.conv), None, None


class _ConvTranspose3d(torch.autograd.Function):
    """conv_transpose3d through oneDNN; backward: the input gradient only (weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: list[int],
                padding: list[int], output_padding: list[int], groups: int, dilation: list[int], dtype: torch.dtype,
                site: _Site) -> torch.Tensor:
        w = w.to(dtype)
        ctx.conv = (w, stride, padding, dilation, groups, tuple(x.shape), x.dtype, site)  # frozen: held as is
        return torch.ops.mkldnn._convolution_transpose_pointwise(_dense(x.to(dtype)), _dense(w),
                                                                 None if b is None else b.to(dtype), padding,
                                                                 output_padding, stride, dilation, groups, "none", [],
                                                                 None)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        w, stride, padding, dilation, groups, x_shape, x_dtype, site = ctx.conv
        gy, w = _live_gradient(gy, w, site, 1)  # a transposed convolution's weight is (in, out, *k)
        if gy.shape[1] == 0:
            return (_zeros(x_shape, x_dtype, _layout_of(gy)), *(None,) * 9)
        gx = torch.ops.mkldnn._convolution_pointwise(gy, _dense(w), None, padding, stride, dilation, groups,
                                                     "none", [], None)
        return gx.to(x_dtype), None, None, None, None, None, None, None, None, None


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
        ctx.slope = float(a.to(y.dtype)) if a.numel() == 1 else None  # read once per forward, not per VJP
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        x, a = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous(memory_format=_layout_of(x))
        slope = ctx.slope if ctx.slope is not None else a.reshape(1, -1, *([1] * (x.dim() - 2)))  # or one per channel
        return _slope_gradient(gy, x, slope), None


def _slope_gradient(gy: torch.Tensor, x: torch.Tensor, slope: float | torch.Tensor) -> torch.Tensor:
    """The input gradient of ``x if x > 0 else slope * x`` (PReLU, LeakyReLU, ReLU) for output gradient
    ``gy``: ``leaky_relu_backward`` for one slope (a float), else ``gy`` where x > 0 and ``slope * gy``
    elsewhere (``slope`` a tensor that broadcasts over x: one per channel)."""
    if isinstance(slope, float):
        return torch.ops.aten.leaky_relu_backward(gy, x, slope, False)
    return torch.where(x > 0, gy, gy * slope)


def _prelu_eligible(x: Any, a: Any) -> bool:
    return (_plain_cpu(x, a) and x.dim() >= 2 and not a.requires_grad and x.is_floating_point()
            and a.is_floating_point() and (a.numel() == 1 or a.numel() == x.shape[1]))


#: ``kernels="auto"`` compiles the fused instance-norm + activation backward (:class:`_NormActivation`) for windows
#: of at least this many voxels (2^19, about 81^3). Measured on the demo UNet (BENCHMARKS.md), whole
#: one-window volumes: 1.08x at the demo's 48 x 40 x 40 windows, 0.99x at 64^3, 1.19x at 96^3 and 1.08x at
#: 128^3, where the full-resolution tensors outgrow the CPU's caches and every pass the eager kernels make
#: goes to memory. The compile (13 s once per process with a cold Inductor cache) pays for itself after 22
#: one-window volumes at 96^3 and 19 at 128^3, within one CT's windows, and never at 64^3.
FUSE_MIN_VOXELS = 1 << 19


def resolve_fused(kernels: Kernels, roi_size: Sequence[int]) -> bool:
    """Whether the engine's kernels also run the compiled fused norm + activation backward: always for
    ``compiled``, for ``auto`` when a window has at least :data:`FUSE_MIN_VOXELS` voxels, never for
    ``engine`` or ``torch``. (Only where :func:`resolve_kernels` turns the engine's kernels on.)"""
    return kernels == "compiled" or (kernels == "auto" and math.prod(int(r) for r in roi_size) >= FUSE_MIN_VOXELS)


#: Instance norms of channels-last tensors with at least this many elements per sample run in the
#: engine's own channels-last kernel; smaller ones (where its few extra operations cost more than the
#: transposing copies they save) keep PyTorch's, under the guard.
_NORM_MIN_ELEMENTS = 1 << 16
#: The longest row of a channels-last plane viewed as rows of whole channel groups (see ``_period``).
_NORM_ROW = 2048


def _period(spatial: int, channels: int) -> int:
    """The largest k with k * channels <= _NORM_ROW that divides ``spatial``: a channels-last sample
    (spatial x channels, channels innermost) is viewed as spatial / k rows of k * channels, and a
    per-channel vector tiled k times broadcasts over whole rows. With rows of ``channels`` elements
    (17 on the demo UNet) PyTorch's elementwise kernels barely vectorise; rows of ~2,000 do."""
    return max(d for d in range(1, max(1, _NORM_ROW // channels) + 1) if spatial % d == 0)


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """A channels-last (N, C, *S) tensor as the view (N, S / k, k * C)."""
    return t.permute(0, *range(2, t.dim()), 1).reshape(t.shape[0], -1, k * t.shape[1])


def _tiled(v: torch.Tensor, k: int) -> torch.Tensor:
    """Per-(sample, channel) vectors (..., N, C) tiled to broadcast over ``_rows``' rows: (..., N, 1, k * C)."""
    *lead, n, c = v.shape
    return v.unsqueeze(-2).expand(*lead, n, k, c).reshape(*lead, n, 1, k * c)


class _InstanceNorm(torch.autograd.Function):
    """Instance norm of a channels-last tensor, kept channels-last through forward and backward.

    PyTorch's CPU instance norm copies a channels-last input to contiguous and returns a contiguous
    output; the convolutions around it run channels-last, so every forward and every VJP paid
    transposing copies of the full-resolution activations and gradients (on the demo UNet's head,
    1.5 ms per VJP into the up-convolution's backward alone: oneDNN reorders a contiguous gradient
    first). Here the forward is PyTorch's, bit for bit, its output copied to channels-last once per
    forward; the backward, ``rstd * gamma * (g - mean(g) - x_hat * mean(g * x_hat))`` per sample and
    channel, runs on the channels-last gradient viewed as rows of whole channel groups (``_period``)
    and returns a channels-last gradient. The weight and bias are frozen (input gradients only).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        k = _period(x[0, 0].numel(), c)
        # PyTorch's own forward, bitwise (instance_norm is this batch norm of the (1, N * C, *S) view),
        # so predictions and everything downstream see the values they always saw; its output is
        # copied to channels-last once per forward instead of the gradient once per VJP
        w = None if weight is None else weight.to(x.dtype).repeat(n)
        b = None if bias is None else bias.to(x.dtype).repeat(n)
        out, mean, invstd = torch.native_batch_norm(x.contiguous().view(1, n * c, *x.shape[2:]), w, b, None, None,
                                                    True, 0.0, eps)
        y = out.view(x.shape).contiguous(memory_format=torch.channels_last_3d)
        rstd = invstd.view(n, c)
        if weight is None and bias is None:
            x_hat = y
        else:  # the normalised input, for the backward, from the statistics the forward used
            x_hat = torch.empty_like(y)
            torch.addcmul(_tiled(-mean.view(n, c) * rstd, k), _rows(x, k), _tiled(rstd, k), out=_rows(x_hat, k))
        ctx.save_for_backward(x_hat)
        scale = rstd if weight is None else rstd * weight.to(x.dtype)  # per (sample, channel): the gradient's scale
        ctx.norm = (k, scale, _tiled(scale, k))
        ctx.affine = not (weight is None and bias is None)
        # An activation fused with this norm (_NormActivation) leaves its output gradient here, by backward pass,
        # and passes nothing down its own edge: without it the norm's output may get no gradient at all
        ctx.stash = {}
        ctx.set_materialize_grads(False)
        # the model may modify the output in place (``out += residual`` in MONAI's UnetResBlock, Swin
        # UNETR's decoder): the saved x_hat must not be it
        return y.clone() if x_hat is y else y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None]:
        fused = ctx.stash.pop(torch._C._current_graph_task_id(), None)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (x_hat,) = ctx.saved_tensors
        gx = None if fused is None else _NormActivation.input_gradient(*fused, x_hat, ctx.norm)
        if g is not None:  # the norm's output used elsewhere too (or not fused at all)
            gn = _norm_input_gradient(g, x_hat, ctx.norm)
            gx = gn if gx is None else gx.add_(gn)
        return gx, None, None, None


#: The most rows one accumulator sums in :func:`_column_sums` (each column's sum is then taken over the
#: blocks' partial sums): as close to float64 as PyTorch's cascaded ``sum`` (BENCHMARKS.md).
_SUM_ROWS = 64
#: :func:`_column_sums` takes its one-pass kernel from this many elements per sample on (2^21, about 8 MB
#: of float32: from the demo UNet's head at 64^3 windows, 4.5 M elements, where it took the norm's backward
#: from 8.5 to 5.4-5.8 ms); below, where the tensors stay in the CPU's caches, the cascaded sums were as fast
#: or faster (BENCHMARKS.md). A fixed rule, so that two runs give the same bits.
_ONE_PASS_MIN = 1 << 21


@functools.lru_cache(maxsize=256)
def _row_block(rows: int) -> int:
    """The most rows, at most _SUM_ROWS and at least 8, that divide ``rows``; 0 when none does."""
    return next((r for r in range(_SUM_ROWS, 7, -1) if rows % r == 0), 0)


def _column_sums(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(g.sum(0), (g * x).sum(0))`` of two contiguous (R, K) matrices, as a (2, K) tensor.

    Large ones in one pass over both: batch norm's backward reduction (PyTorch's kernel for samples of
    features, the features innermost) with the identity for its normalisation (mean 0, inverse std 1),
    whose bias gradient is the first sum and weight gradient the second. It runs on blocks of rows (the
    view (r, R / r * K), r = _row_block(R)) and the blocks' partial sums are then summed, so that no
    accumulator adds more than r values: as close to float64 as the cascaded sums, which with the
    full-size product between them read the tensors four times and write one. Small ones (below
    _ONE_PASS_MIN elements), and row counts that no block size divides, take those cascaded sums."""
    rows, cols = g.shape
    r = _row_block(rows) if g.numel() >= _ONE_PASS_MIN else 0
    if r == 0:
        return torch.stack((g.sum(0), (g * x).sum(0)))
    width = rows // r * cols
    ones, zeros = torch.ones(width, dtype=g.dtype), torch.zeros(width, dtype=g.dtype)
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(g.view(r, width), x.view(r, width), ones, None, None, zeros,
                                                          ones, True, 0.0, [False, True, True])
    return torch.stack((gb, gw)).view(2, rows // r, cols).sum(1)


def _norm_input_gradient(g: torch.Tensor, x_hat: torch.Tensor, norm: tuple[int, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:class:`_InstanceNorm`'s input gradient for output gradient ``g`` (``norm``: its forward's state)."""
    k, scale, tiled_scale = norm
    n, c = x_hat.shape[:2]
    g = g.to(x_hat.dtype).contiguous(memory_format=torch.channels_last_3d)
    gr, xr = _rows(g, k), _rows(x_hat, k)
    # the means of g and of g * x_hat per (sample, channel), times -scale: (2, N, C)
    sums = torch.stack([_column_sums(gr[i], xr[i]) for i in range(n)], 1).view(2, n, k, c).sum(2)
    coef = _tiled(sums.mul_(scale).div_(-(gr.shape[1] * k)), k)
    gx = torch.empty_like(x_hat)
    out = _rows(gx, k)
    torch.addcmul(coef[0], xr, coef[1], out=out)
    out.addcmul_(gr, tiled_scale)
    return gx


def _norm_activation_gradient(gy: torch.Tensor, y: torch.Tensor, x_hat: torch.Tensor, slope: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``act(instance_norm(x))`` for the activation's output gradient ``gy``
    (``act``: PReLU, LeakyReLU or ReLU, ``y if y > 0 else slope * y``), in one function for
    ``torch.compile`` to fuse: ``y`` is the norm's output (the activation's input), ``x_hat`` the
    normalised input, ``slope`` (1, C or 1, 1, 1, 1) and ``scale`` rstd times the norm's weight
    (N, C, 1, 1, 1). Two passes over full-resolution tensors where the eager kernels (the activation's
    backward, then the norm's) make about thirteen."""
    g = torch.where(y > 0, gy, gy * slope)
    n = g[0, 0].numel()
    # The sums axis by axis (each row, then each plane, then the volume), as short sums: a seed that
    # covers most of the window (the background's) makes g nearly constant per channel, and g - mean(g)
    # cancels most of it, which magnifies the sums' rounding; one long sum per channel left the
    # background's map 4x further from float64 than the eager kernels'. Still one pass over memory.
    mean_g = g.sum(4, keepdim=True).sum(3, keepdim=True).sum(2, keepdim=True) / n
    mean_gx = (g * x_hat).sum(4, keepdim=True).sum(3, keepdim=True).sum(2, keepdim=True) / n
    return scale * (g - mean_g - x_hat * mean_gx)


class _Compiled:
    """``torch.compile`` of :func:`_norm_activation_gradient`, made on first use in the process. When compiling
    fails (no C++ compiler, an unsupported PyTorch) it says so once, in one line, and the fused norm
    runs its eager kernels from then on: the values are the same up to rounding and nothing is lost."""

    fn: Any = None
    failed: str | None = None

    @classmethod
    def norm_activation(cls) -> Any:
        if cls.fn is None and cls.failed is None:
            _log.info("kernels='compiled': compiling the fused instance-norm + activation backward (once per "
                      "process and tensor shape; 10-15 s with a cold Inductor cache)")
            cls.fn = torch.compile(_norm_activation_gradient, fullgraph=True)
        return cls.fn

    @staticmethod
    def threads() -> Any:
        """Inductor compiles in as many processes as this process has intra-op threads (it would start
        one compile process per core otherwise: in every one of a node's single-threaded actors)."""
        import torch._inductor.config as inductor

        return inductor.patch(compile_threads=max(1, min(inductor.compile_threads, torch.get_num_threads())))

    @classmethod
    def fail(cls, err: BaseException) -> None:
        cls.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        cls.fn = None
        _log.warning("kernels='compiled': torch.compile of the fused instance-norm + activation backward failed (%s); "
                     "running the engine's eager kernels instead (the same values; use kernels='engine' to skip "
                     "the attempt)", cls.failed)


class _NormActivation(torch.autograd.Function):
    """A PReLU, LeakyReLU or ReLU of ``y``, the output of an :class:`_InstanceNorm` (MONAI's ADN: norm,
    dropout, activation; nnU-Net's and DynUNet's conv, norm, in-place LeakyReLU), whose input gradient is
    taken together with the norm's in one compiled kernel (:func:`_norm_activation_gradient`) instead of the
    activation's backward and then the norm's.

    The forward is the same activation (in place when the call was: y is then marked dirty and comes
    back as the output, as autograd's own in-place activations do). The backward leaves its output
    gradient with the norm's node, keyed by the running backward pass, and passes nothing down to y; the
    norm's backward, which autograd runs after it, takes x's gradient from that gradient and from
    whatever else reached y (another use of the norm's output). So gradients through other paths still
    count, and a pass that is cut short leaves nothing behind for the next. Falls back to the two eager
    kernels when compiling fails.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, slope: torch.Tensor, norm: Any, act: Any, inplace: bool) -> torch.Tensor:
        ctx.norm_node = norm
        if inplace:  # act returns y itself, activated; its sign is y's before (the slopes are >= 0, see _norm_act)
            ctx.mark_dirty(y)
        out = act(y)
        # the branch is chosen on y's sign, which is the saved x_hat's when the norm has no affine parameters
        ctx.fused = (y if norm.affine else None, slope.to(y.dtype).reshape(1, -1, 1, 1, 1))
        return out

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor | None) -> tuple[None, ...]:
        if gy is not None:
            y, slope = ctx.fused
            ctx.norm_node.stash[torch._C._current_graph_task_id()] = (gy, y, slope)
        return None, None, None, None, None

    @staticmethod
    def input_gradient(gy: torch.Tensor, y: torch.Tensor | None, slope: torch.Tensor, x_hat: torch.Tensor,
                       norm: tuple[int, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x's gradient through the norm and the activation, for the activation's output gradient ``gy``."""
        y = x_hat if y is None else y
        gy = gy.to(x_hat.dtype).contiguous(memory_format=torch.channels_last_3d)
        fn = _Compiled.norm_activation()
        if fn is not None:
            try:
                n, c = x_hat.shape[:2]
                with torch._C.DisableTorchFunction(), _Compiled.threads():  # traced without the engine's mode
                    gx = fn(gy, y, x_hat, slope, norm[1].view(n, c, 1, 1, 1))
                return gx.contiguous(memory_format=torch.channels_last_3d)
            except Exception as err:  # noqa: BLE001 - any compile failure falls back, once, said in one line
                _Compiled.fail(err)
        g = _slope_gradient(gy, y, float(slope) if slope.numel() == 1 else slope)
        return _norm_input_gradient(g, x_hat, norm)


#: The arguments of ``torch.nn.functional.instance_norm`` and of ``torch.instance_norm`` (ATen's order).
_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
_ATEN_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
                   "cudnn_enabled")


def _norm_eligible(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any, float] | None:
    """(input, weight, bias, eps) when an ``instance_norm`` call can run in :class:`_InstanceNorm`:
    a large float32 channels-last 5-D input on the CPU, statistics of the input itself (no running
    statistics), frozen affine parameters, no autocast; else None."""
    a = _bind(_ATEN_NORM_ARGS if func is torch.instance_norm else _NORM_ARGS, args, kwargs)
    if a is None:
        return None
    x, w, b = a["input"], a["weight"], a["bias"]
    if not (isinstance(x, torch.Tensor) and _plain_cpu(x) and x.dim() == 5 and x.dtype == torch.float32
            and _layout_of(x) == torch.channels_last_3d and x[0].numel() >= _NORM_MIN_ELEMENTS):
        return None
    if a["running_mean"] is not None or a["running_var"] is not None or a["use_input_stats"] is False:
        return None
    for t in (w, b):
        if t is not None and not (_plain_cpu(t) and t.dim() == 1 and t.numel() == x.shape[1] and not t.requires_grad
                                  and t.is_floating_point()):
            return None
    if torch.is_autocast_enabled("cpu"):
        return None
    eps = 1e-5 if a["eps"] is None else a["eps"]
    return (x, w, b, float(eps)) if isinstance(eps, (int, float)) else None


#: Activations a norm's output may go through into :class:`_NormActivation` (``kernels="compiled"``).
_ACTIVATIONS = (torch.prelu, torch.nn.functional.prelu, torch.nn.functional.leaky_relu, torch.nn.functional.leaky_relu_,
                torch.nn.functional.relu, torch.relu, torch.nn.functional.relu_, torch.relu_)


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

    ``calls`` counts the convolutions it routed, ``prelu_calls`` the PReLUs, ``norm_calls`` the
    instance norms it ran channels-last and ``guarded`` those it guarded, for tests and benchmarks.
    """

    def __init__(self, fast: bool = True, guard: bool = True, fuse: bool = False) -> None:
        super().__init__()
        self.fast = fast
        self.guard = guard
        self.fuse = fast and fuse
        self.fused_calls = 0  # activations fused with the instance norm before them (_NormActivation)
        self.calls = 0
        self.prelu_calls = 0
        self.guarded = 0
        self.norm_calls = 0
        #: The memory layout of the last instance norm's output (None: no norm ran yet): a class seed
        #: that meets the model's activations through a residual (MONAI's UNet head) is best built in it.
        self.norm_layout: torch.memory_format | None = None
        self.sites = _Sites()

    @contextmanager
    def seed_channels(self, seed: torch.Tensor, channels: Sequence[int] | None,
                      values: torch.Tensor | None = None) -> Iterator[None]:
        """Inside, a convolution whose output gradient is ``seed`` itself (the tensor passed to
        ``autograd.grad``) takes ``channels`` as its live channels instead of checking them: the
        caller vouches that seed is zero outside them (a superset is exact). None: no hint.

        ``values``: optionally, the seed on those channels, ``seed[:, channels]`` as its own tensor
        (N, len(channels), *S) (the engine's seed builder has it before it writes the seed): the
        narrowed backward takes it instead of gathering the channels out of the seed, a strided pass
        over the whole seed (0.5 ms of a 17 ms VJP at 48^3 on the demo UNet). The caller vouches for
        it too; it is used only with sorted, distinct channels and a matching shape and dtype."""
        ok = channels is not None and seed.dim() > 1 and all(0 <= int(c) < seed.shape[1] for c in channels)
        hint = tuple(sorted({int(c) for c in channels})) if ok and channels is not None else None
        if hint is None or values is None or tuple(int(c) for c in channels) != hint or not (  # type: ignore[union-attr]
                isinstance(values, torch.Tensor) and values.dtype == seed.dtype and values.device == seed.device
                and values.shape == (seed.shape[0], len(hint), *seed.shape[2:])):
            values = None
        self.sites.hint = None if hint is None else (seed, hint, values)
        try:
            yield
        finally:
            self.sites.hint = None

    def _residual(self, args: tuple[Any, ...]) -> torch.Tensor | None:
        """``a + b`` as :class:`_ResidualConv` when one of them is a routed convolution of the other
        that qualifies (see _residual_weight); else None. The same sum: float addition commutes."""
        a, b = args
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.is_grad_enabled()):
            return None
        for y, x in ((a, b), (b, a)):
            node = y.grad_fn
            if (isinstance(node, _Conv3d._backward_cls) and x.requires_grad and node.x_ref() is x  # type: ignore[attr-defined]
                    and _residual_weight(node.conv, x)):
                self.sites.folded += 1
                return _ResidualConv.apply(x, y.detach(), self.sites.residual(node.conv))
        return None

    def _norm_act(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """A PReLU, LeakyReLU or ReLU call as :class:`_NormActivation` when its input is the output of the
        engine's instance norm, a PReLU's weight is frozen, everything is float32, outside autocast, and
        an in-place call's slope is not negative; else None."""
        if func is torch.prelu or func is torch.nn.functional.prelu:
            a = _bind(("input", "weight"), args, kwargs)
            if a is None or not _prelu_eligible(a["input"], a["weight"]) or a["weight"].dtype != torch.float32:
                return None
            y, slope, inplace = a["input"], a["weight"], False
            act = lambda t: torch.prelu(t, slope)  # noqa: E731
        elif func in (torch.nn.functional.leaky_relu, torch.nn.functional.leaky_relu_):
            a = _bind(("input", "negative_slope", "inplace"), args, kwargs)
            if a is None:
                return None
            neg = 0.01 if a["negative_slope"] is None else a["negative_slope"]
            inplace = func is torch.nn.functional.leaky_relu_ or a["inplace"] is True
            if not isinstance(neg, (int, float)) or (inplace and neg < 0):
                return None
            y, slope = a["input"], torch.tensor([float(neg)])
            act = (lambda t: torch._C._nn.leaky_relu_(t, neg)) if inplace else (  # noqa: E731
                lambda t: torch._C._nn.leaky_relu(t, neg))
        elif func in (torch.nn.functional.relu, torch.relu, torch.nn.functional.relu_, torch.relu_):
            a = _bind(("input", "inplace"), args, kwargs)
            if a is None:
                return None
            y, slope = a["input"], torch.zeros(1)
            inplace = func in (torch.nn.functional.relu_, torch.relu_) or a["inplace"] is True
            act = torch.relu_ if inplace else torch.relu
        else:
            return None
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and isinstance(y.grad_fn, _InstanceNorm._backward_cls)):
            return None
        self.fused_calls += 1
        return _NormActivation.apply(y, slope, y.grad_fn, act, inplace)

    def seed_layout(self, out: torch.Tensor) -> torch.memory_format:
        """The layout to build the class seeds of model output ``out`` in. Contiguous when ``out`` comes
        straight from the engine's own convolution (a head, folded with its residual or not): its
        backward reads the seed's live channels only, and a contiguous seed writes and clears a
        channel as one block. Else the norms' layout, which is where the seed meets the model's
        activations through autograd's add (contiguous when no norm ran)."""
        if isinstance(out.grad_fn, (_Conv3d._backward_cls, _ResidualConv._backward_cls)):
            return torch.contiguous_format
        return self.norm_layout or torch.contiguous_format

    def _site(self, w: torch.Tensor, groups: int) -> _Site:
        return (self.sites, (w.data_ptr(), tuple(w.shape))) if groups == 1 else None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.instance_norm or func is torch.instance_norm:
            routed = _norm_eligible(func, args, kwargs) if self.fast else None
            if routed is not None:
                self.norm_calls += 1
                self.norm_layout = torch.channels_last_3d
                return _InstanceNorm.apply(*routed)
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.norm_layout = _layout_of(out)
            if self.guard and isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                self.guarded += 1
                return _GradInLayout.apply(out)
            return out
        if not self.fast:
            return func(*args, **kwargs)
        if func is torch.Tensor.add or func is torch.add:
            fused = self._residual(args) if len(args) == 2 and not kwargs else None
            return fused if fused is not None else func(*args, **kwargs)
        if func is torch.conv3d or func is torch.nn.functional.conv3d:
            a = _bind(_CONV_ARGS, args, kwargs)
            dtype = None if a is None else _eligible(a["input"], a["weight"], a["bias"])
            if a is not None and dtype is not None:
                s, p, d = _triple(a["stride"]), _triple(a["padding"]), _triple(a["dilation"])
                if s is not None and p is not None and d is not None and isinstance(a["groups"], int):
                    self.calls += 1
                    return _Conv3d.apply(a["input"], a["weight"], a["bias"], s, p, d, a["groups"], dtype,
                                         self._site(a["weight"], a["groups"]))
        elif func is torch.conv_transpose3d or func is torch.nn.functional.conv_transpose3d:
            a = _bind(_CONVT_ARGS, args, kwargs)
            dtype = None if a is None else _eligible(a["input"], a["weight"], a["bias"])
            if a is not None and dtype is not None:
                s, p, d = _triple(a["stride"]), _triple(a["padding"]), _triple(a["dilation"])
                op = _triple(a["output_padding"])
                # the backward's convolution returns x's size only when output_padding < stride
                if (s is not None and p is not None and d is not None and op is not None
                        and isinstance(a["groups"], int) and all(o < st for o, st in zip(op, s))):
                    self.calls += 1
                    return _ConvTranspose3d.apply(a["input"], a["weight"], a["bias"], s, p, op, a["groups"], d, dtype,
                                                  self._site(a["weight"], a["groups"]))
        if self.fuse and func in _ACTIVATIONS:
            fused = self._norm_act(func, args, kwargs)
            if fused is not None:
                return fused
        if func is torch.prelu or func is torch.nn.functional.prelu:
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
def engine_kernels(model: torch.nn.Module, on: bool, guard: bool = True,
                   fuse: bool = False) -> Iterator[EngineKernels | None]:
    """Frozen parameters, and :class:`EngineKernels` with its fast kernels when ``on`` (from
    :func:`resolve_kernels`), its compiled fused norm + activation backward when also ``fuse``
    (``kernels='compiled'``) and its instance-norm guard when ``guard`` (the engine sets it whenever
    the model runs channels-last); yields the mode (or None) so callers can read its counters."""
    with frozen_parameters(model):
        if not (on or guard):
            yield None
            return
        with EngineKernels(fast=on, guard=guard, fuse=fuse) as mode:
            yield mode
