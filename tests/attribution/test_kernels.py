"""The engine's CPU kernels (engine.attribution.kernels): oneDNN convolutions and PReLU's input gradient,
forward and input gradient against PyTorch's own kernels and autograd, the cases that must fall through
untouched, and the engine's maps with either set of kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attribution import SlidingWindow, explain_volume
from engine.attribution.kernels import (
    EngineKernels,
    engine_kernels,
    frozen_parameters,
    onednn_available,
    resolve_kernels,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")

CL = torch.channels_last_3d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reference(fn, x: torch.Tensor, seed: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's kernels and autograd, outside any mode."""
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr, **kw)
    (g,) = torch.autograd.grad(y, xr, seed)
    return y.detach(), g


def _routed(fn, x: torch.Tensor, seed: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
    xr = x.detach().clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = fn(xr, **kw)
    (g,) = torch.autograd.grad(y, xr, seed)
    return y.detach(), g, mode.calls


CONV_CASES = [
    # (c_in, c_out, size, kernel, stride, padding, dilation, groups, bias)
    (1, 8, (12, 10, 9), 3, 1, 1, 1, 1, True),
    (8, 16, (12, 10, 9), 3, 2, 1, 1, 1, True),   # strided, odd sizes: the backward needs output padding
    (16, 16, (7, 6, 5), 3, 1, 1, 1, 1, False),
    (8, 8, (11, 9, 10), 3, 1, 2, 2, 1, True),    # dilated
    (8, 12, (9, 9, 9), 3, 1, 1, 1, 4, True),     # grouped
    (6, 4, (8, 7, 6), 1, 1, 0, 1, 1, True),      # 1x1x1
    (4, 4, (10, 9, 8), (3, 1, 2), (2, 1, 1), (1, 0, 1), 1, 1, True),  # anisotropic
]


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3d_forward_and_input_gradient_equal_pytorch(case, layout):
    c_in, c_out, size, k, stride, padding, dilation, groups, bias = case
    g = torch.Generator().manual_seed(0)
    ks = (k,) * 3 if isinstance(k, int) else k
    w = torch.randn(c_out, c_in // groups, *ks, generator=g).contiguous(memory_format=layout)
    b = torch.randn(c_out, generator=g) if bias else None
    x = torch.randn(1, c_in, *size, generator=g).contiguous(memory_format=layout)
    kw = dict(weight=w, bias=b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    seed = torch.randn(F.conv3d(x, **kw).shape, generator=g)
    y_ref, g_ref = _reference(F.conv3d, x, seed, **kw)
    y, gx, calls = _routed(F.conv3d, x, seed, **kw)
    assert calls == 1
    assert y.shape == y_ref.shape and gx.shape == x.shape
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, g_ref) < 1e-5


CONVT_CASES = [
    # (c_in, c_out, size, kernel, stride, padding, output_padding, dilation, groups, bias)
    (16, 8, (6, 5, 5), 3, 2, 1, 1, 1, 1, True),   # the UNet's up-sampling layer
    (16, 17, (6, 5, 4), 3, 2, 1, 0, 1, 1, False),
    (8, 8, (5, 5, 5), 3, 1, 1, 0, 1, 1, True),
    (8, 4, (5, 6, 5), 2, 2, 0, 0, 1, 2, True),    # grouped, kernel 2
    (4, 4, (5, 5, 5), 3, 2, 2, 1, 2, 1, True),    # dilated
]


@pytest.mark.parametrize("case", CONVT_CASES)
def test_conv_transpose3d_forward_and_input_gradient_equal_pytorch(case):
    c_in, c_out, size, k, stride, padding, out_pad, dilation, groups, bias = case
    g = torch.Generator().manual_seed(1)
    w = torch.randn(c_in, c_out // groups, k, k, k, generator=g).contiguous(memory_format=CL)
    b = torch.randn(c_out, generator=g) if bias else None
    x = torch.randn(1, c_in, *size, generator=g).contiguous(memory_format=CL)
    kw = dict(weight=w, bias=b, stride=stride, padding=padding, output_padding=out_pad, groups=groups,
              dilation=dilation)
    seed = torch.randn(F.conv_transpose3d(x, **kw).shape, generator=g)
    y_ref, g_ref = _reference(F.conv_transpose3d, x, seed, **kw)
    y, gx, calls = _routed(F.conv_transpose3d, x, seed, **kw)
    assert calls == 1
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, g_ref) < 1e-5


def test_modules_and_positional_arguments_are_routed_through_a_whole_network():
    """nn.Conv3d / nn.ConvTranspose3d call F.conv3d positionally; a small encoder-decoder routes every
    convolution, and its input gradient equals autograd's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.InstanceNorm3d(8), torch.nn.PReLU(),
        torch.nn.Conv3d(8, 16, 3, stride=2, padding=1), torch.nn.PReLU(),
        torch.nn.ConvTranspose3d(16, 8, 3, stride=2, padding=1, output_padding=1), torch.nn.PReLU(),
        torch.nn.Conv3d(8, 3, 1),
    ).eval()
    x = torch.randn(1, 1, 10, 12, 8)
    seed = torch.randn(1, 3, 10, 12, 8)
    y_ref, g_ref = _reference(net, x, seed)
    with frozen_parameters(net):
        y, gx, calls = _routed(net, x, seed)
    assert calls == 4
    assert _rel(y, y_ref) < 1e-5 and _rel(gx, g_ref) < 1e-5
    assert all(p.requires_grad for p in net.parameters())  # flags restored


def test_calls_it_cannot_take_fall_through_unchanged():
    w = torch.randn(4, 2, 3, 3, 3)
    x = torch.randn(1, 2, 6, 6, 6)
    with EngineKernels() as mode:
        # weights that require grad: PyTorch computes the weight gradient
        wg = w.clone().requires_grad_(True)
        F.conv3d(x, wg, padding=1).sum().backward()
        assert wg.grad is not None and wg.grad.abs().sum() > 0
        F.conv3d(x.double(), w.double(), padding=1)            # float64
        F.conv3d(x, w, padding="same")                          # string padding
        F.conv2d(x[:, :, 0], w[:, :, 0])                        # 2-D
        with torch.autocast("cpu", dtype=torch.float16):        # fp16 autocast: PyTorch's kernels
            assert F.conv3d(x, w, padding=1).dtype == torch.float16
        F.conv_transpose3d(x, w.transpose(0, 1).contiguous(), stride=1, padding=2, output_padding=0,
                           dilation=3)                          # fine, routed
        F.conv_transpose3d(x, w.transpose(0, 1).contiguous(), stride=1, dilation=2, output_padding=1)  # op >= stride
    assert mode.calls == 1


def test_frozen_parameters_restores_flags_after_an_error():
    net = torch.nn.Conv3d(1, 2, 3)
    net.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), frozen_parameters(net):
        assert not net.weight.requires_grad
        raise RuntimeError("boom")
    assert net.weight.requires_grad and not net.bias.requires_grad


def test_backend_resolution_and_refusals():
    assert resolve_kernels("auto", "cpu") is True
    assert resolve_kernels("engine", "cpu") is True
    assert resolve_kernels("torch", "cpu") is False
    assert resolve_kernels("auto", "cuda") is False  # GPUs keep cuDNN
    with pytest.raises(ValueError, match="CPUs only"):
        resolve_kernels("engine", "cuda")
    with pytest.raises(ValueError, match="kernels must be"):
        resolve_kernels("mkl", "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernels"):
        SlidingWindow(roi_size=(8, 8, 8), kernels="fast")  # type: ignore[arg-type]
    assert SlidingWindow(roi_size=(8, 8, 8)).describe()["kernels"] == "auto"


def test_engine_maps_are_the_same_with_either_backend_and_the_convolutions_are_routed(monkeypatch):
    """Saliency of every class of a MONAI UNet over overlapping windows: the engine's vs PyTorch's kernels."""
    from monai.networks.nets import UNet

    import engine.attribution.kernels as kernels

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2),
                 num_res_units=1).eval()
    image = torch.randn(1, 20, 18, 22)
    names = [f"c{i}" for i in range(4)]
    routed: list[int] = []
    real = kernels.engine_kernels

    def counting(model, on, **kw):
        cm = real(model, on, **kw)

        class Wrap:
            def __enter__(self):
                self.mode = cm.__enter__()
                return self.mode

            def __exit__(self, *exc):
                routed.append((self.mode.calls, self.mode.prelu_calls) if self.mode is not None else (0, 0))
                return cm.__exit__(*exc)
        return Wrap()

    import engine.attribution.sliding as sliding
    monkeypatch.setattr(sliding, "engine_kernels", counting)
    maps = {}
    for backend in ("torch", "engine"):
        window = SlidingWindow(roi_size=(16, 16, 16), overlap=0.5, kernels=backend)
        e = explain_volume(model, image, method="saliency", window=window, class_names=names, return_maps=True)
        maps[backend] = e.maps
    assert sum(c for c, _ in routed) > 0 and sum(p for _, p in routed) > 0  # MONAI's UNet has PReLUs
    assert set(maps["torch"]) == set(maps["engine"])
    for name in maps["torch"]:
        assert _rel(maps["engine"][name], maps["torch"][name]) < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def test_engine_kernels_off_only_freezes():
    net = torch.nn.Conv3d(1, 1, 3)
    with engine_kernels(net, False, guard=False) as mode:
        assert mode is None and not net.weight.requires_grad
    assert net.weight.requires_grad
    with engine_kernels(net, False) as mode:  # the guard alone: PyTorch's kernels
        assert mode is not None and not mode.fast and mode.guard
        net(torch.randn(1, 1, 5, 5, 5))
        assert mode.calls == 0


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("slopes", [1, 6])
def test_prelu_input_gradient_equals_autograd_in_either_layout(layout, slopes):
    """gy arrives channels-last while x is contiguous (and vice versa), as between instance norms and
    convolutions; one slope or one per channel; exactly PyTorch's products."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 7, 6, 5, generator=g)
    x[0, 0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-30])  # at and next to the kink
    x = x.contiguous(memory_format=layout)
    a = torch.rand(slopes, generator=g)
    other = torch.contiguous_format if layout == CL else CL
    seed = torch.randn(x.shape, generator=g).contiguous(memory_format=other)
    y_ref, g_ref = _reference(F.prelu, x, seed, weight=a)
    xr = x.detach().clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.prelu(xr, a)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert mode.prelu_calls == 1
    assert torch.equal(y, y_ref) and torch.equal(gx, g_ref)  # the same products: bitwise equal


def test_prelu_under_bf16_autocast_and_with_a_trainable_weight():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.PReLU()).eval()
    x = torch.randn(1, 1, 6, 6, 6)
    seed = torch.randn(1, 4, 6, 6, 6)
    # a trainable weight: PyTorch's PReLU, whose backward also gives the weight's gradient
    with EngineKernels() as mode:
        out = net(x.requires_grad_(True))
    (out * seed).sum().backward()
    assert mode.prelu_calls == 0 and net[1].weight.grad is not None
    # frozen, under bf16 autocast: taken, and the same as PyTorch's bf16 PReLU
    with frozen_parameters(net):
        xr = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref = net(xr)
        (g_ref,) = torch.autograd.grad(y_ref, xr, seed.to(y_ref.dtype))
        xr = x.detach().clone().requires_grad_(True)
        with EngineKernels() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(xr)
        (gx,) = torch.autograd.grad(y, xr, seed.to(y.dtype))
    assert mode.prelu_calls == 1 and mode.calls == 1  # the bf16 convolution is routed too
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert _rel(gx.float(), g_ref.float()) < 1e-2


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_autocast_convolutions_are_pytorchs_bit_for_bit(transposed):
    """Under CPU bf16 autocast a routed convolution computes what autocast's would: bf16 inputs and
    weights, a bf16 output, and an input gradient in the input's dtype; bitwise the same oneDNN results."""
    torch.manual_seed(4)
    conv = (torch.nn.ConvTranspose3d(16, 8, 3, stride=2, padding=1, output_padding=1) if transposed
            else torch.nn.Conv3d(16, 17, 3, padding=1)).to(memory_format=CL).requires_grad_(False)
    x = torch.randn(1, 16, 12, 10, 10).contiguous(memory_format=CL)
    seed = None
    results = []
    for fast in (False, True):
        xr = x.clone().requires_grad_(True)
        with EngineKernels(fast=fast, guard=False) as mode, torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xr)
        seed = torch.randn(y.shape).to(y.dtype).contiguous(memory_format=CL) if seed is None else seed
        (gx,) = torch.autograd.grad(y, xr, seed)
        results.append((y, gx, mode.calls))
    (y_ref, g_ref, _), (y, gx, calls) = results
    assert calls == 1 and y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    assert torch.equal(y, y_ref) and torch.equal(gx, g_ref)


# ----------------------------------------------------------------------------- narrowed backward


def _one_class_seed(shape, live, g):
    seed = torch.zeros(shape)
    for c in live:
        seed[:, c] = torch.randn(shape[2:], generator=g)
    return seed.contiguous(memory_format=CL)


@pytest.mark.parametrize("live", [[3], [0, 16], []])
def test_a_seed_on_few_channels_takes_the_input_gradient_from_those_alone(live):
    """A class seed reaches a head convolution with one live output channel of K: the routed backward
    runs on the live channels only and its input gradient equals autograd's dense one (in float64, so
    the comparison is exact to rounding); no live channel gives an exact zero gradient."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(17, 17, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 17, 12, 10, 9, generator=g).contiguous(memory_format=CL)
    seed = _one_class_seed((1, 17, 12, 10, 9), live, g)
    xr = x.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.conv3d(xr, w, padding=1), xr, seed.double())
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.conv3d(xr, w.float().contiguous(memory_format=CL), padding=1)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert mode.sites.narrowed == 1 and not mode.sites.dense
    if live:
        assert _rel(gx.double(), g_ref) < 1e-6
    else:
        assert torch.equal(gx, torch.zeros_like(gx))


def _float64_head(g: torch.Generator, kernel, x_layout, size: tuple[int, ...], **kw):
    """A 17 -> 17 convolution's float64 weight, a float32 input in ``x_layout``, and the float64
    forward on it (the input that requires grad, and the output), for the narrowed-gradient tests."""
    ks = (kernel,) * 3 if isinstance(kernel, int) else kernel
    w = torch.randn(17, 17, *ks, generator=g, dtype=torch.float64)
    x = torch.randn(1, 17, *size, generator=g).contiguous(memory_format=x_layout)
    xr = x.double().requires_grad_(True)
    return w, x, xr, F.conv3d(xr, w, **kw)


@pytest.mark.parametrize("x_layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 1, 0, 1), (3, 1, 2, 2), ((3, 1, 5), 1, (1, 0, 2), 1),
                                                            (3, 2, 1, 1), (3, 1, 3, 1)])
def test_a_narrowed_gradient_comes_back_in_the_inputs_layout(x_layout, kernel, stride, padding, dilation):
    """Into a contiguous input (a head after an instance norm), the narrowed input gradient is the
    convolution of the flipped kernel, which returns the input's layout, so that it meets the other
    branches' gradients without a transposing add. Where that identity does not hold (strides, a
    padding wider than the kernel's reach) the transposed convolution runs. Either way the values
    equal float64 autograd's."""
    g = torch.Generator().manual_seed(9)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    w, x, xr, y_ref = _float64_head(g, kernel, x_layout, (12, 10, 9), **kw)
    seed = torch.zeros(y_ref.shape)
    seed[:, 4] = torch.randn(y_ref.shape[2:], generator=g)
    (g_ref,) = torch.autograd.grad(y_ref, xr, seed.double())
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.conv3d(xr, w.float().contiguous(memory_format=CL), **kw)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert mode.sites.narrowed == 1
    assert _rel(gx.double(), g_ref) < 1e-6
    flipped = x_layout == torch.contiguous_format and stride == 1 and padding != 3
    assert gx.is_contiguous() == flipped or x_layout == CL and gx.is_contiguous(memory_format=CL)


def test_transposed_convolutions_narrow_too_and_dense_sites_are_checked_once():
    """A transposed convolution's weight indexes gy's channels on its second axis. A site whose
    gradient had all channels live is not checked again in the session (the check costs a pass over
    gy); a NaN in a channel keeps it live."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 17, 3, 3, 3, generator=g).contiguous(memory_format=CL)  # (in, out, k, k, k)
    x = torch.randn(1, 8, 6, 5, 5, generator=g).contiguous(memory_format=CL)
    kw = dict(weight=w, stride=2, padding=1, output_padding=1)
    seed = _one_class_seed((1, 17, 12, 10, 10), [5], g)
    _, g_ref = _reference(F.conv_transpose3d, x, seed, **kw)
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.conv_transpose3d(xr, **kw)
        (gx,) = torch.autograd.grad(y, xr, seed, retain_graph=True)
        assert mode.sites.narrowed == 1 and _rel(gx, g_ref) < 1e-5
        dense = torch.randn(y.shape, generator=g).contiguous(memory_format=CL)
        torch.autograd.grad(y, xr, dense, retain_graph=True)
        assert len(mode.sites.dense) == 1
        (gx,) = torch.autograd.grad(y, xr, seed, retain_graph=True)  # now computed densely: same values
        assert mode.sites.narrowed == 1 and _rel(gx, g_ref) < 1e-5
    with EngineKernels() as mode:
        y = F.conv_transpose3d(xr, **kw)
        nan_seed = seed.clone()
        nan_seed[0, 9, 0, 0, 0] = float("nan")
        (gx,) = torch.autograd.grad(y, xr, nan_seed)
    assert mode.sites.narrowed == 1 and gx.isnan().any()  # channel 9 kept: its NaN propagates


def test_the_demo_unets_head_is_narrowed_and_its_maps_equal_pytorchs():
    """The demo UNet ends in a 17 -> 17 3x3x3 convolution (81% of a VJP's FLOPs): every class VJP runs
    it on one channel, and the maps equal PyTorch's kernels' on the contiguous model."""
    from engine.models import demo_model

    model = demo_model().module.eval()
    image = torch.rand(1, 24, 16, 16)
    classes = ["c%d" % i for i in range(17)]
    maps = {}
    for kernels in ("torch", "engine"):
        window = SlidingWindow(roi_size=(24, 16, 16), kernels=kernels,
                               memory_format="contiguous" if kernels == "torch" else "auto")
        e = explain_volume(model, image, method="saliency", window=window, targets=[1, 5, 16], class_names=classes,
                           return_maps=True)
        maps[kernels] = e.maps
    for name in maps["torch"]:
        assert _rel(maps["engine"][name], maps["torch"][name]) < 1e-5
    x = image[None].contiguous(memory_format=CL).requires_grad_(True)
    with engine_kernels(model.to(memory_format=CL), True) as mode:
        logits = model(x)
        for c in (1, 5, 16):
            seed = torch.zeros_like(logits)
            seed[:, c] = 1.0
            torch.autograd.grad(logits, x, seed, retain_graph=True)
    assert mode.sites.narrowed == 3  # the head, once per class; every other site is dense


def test_a_seed_hint_spares_the_check_and_gives_the_same_bits():
    """The engine tells the kernels which channels its class seed can be nonzero in: a convolution whose
    output gradient is that seed narrows to them without the pass over the seed, and the input
    gradient is bitwise the one found by checking. A gradient that is not the seed tensor itself is
    checked as before; a hint naming a channel the seed does not have is ignored."""
    from unittest import mock

    import engine.attribution.kernels as kernels

    real_select = kernels._select_channels
    g = torch.Generator().manual_seed(8)
    w = torch.randn(17, 17, 3, 3, 3, generator=g).contiguous(memory_format=CL)
    x = torch.randn(1, 17, 12, 10, 9, generator=g).contiguous(memory_format=CL).requires_grad_(True)
    seed = _one_class_seed((1, 17, 12, 10, 9), [4], g)
    checks = []
    real = kernels._live_channels

    def counted(gy):
        checks.append(gy.shape)
        return real(gy)

    with mock.patch.object(kernels, "_live_channels", counted), EngineKernels() as mode:
        y = F.conv3d(x, w, padding=1)
        (checked,) = torch.autograd.grad(y, x, seed, retain_graph=True)
        assert len(checks) == 1 and mode.sites.narrowed == 1
        with mode.seed_channels(seed, (4,)):
            (hinted,) = torch.autograd.grad(y, x, seed, retain_graph=True)
        assert len(checks) == 1 and mode.sites.narrowed == 2  # narrowed again, without a check
        assert mode.sites.hint is None  # only inside the block
        with mode.seed_channels(seed, (4,)):
            torch.autograd.grad(y, x, seed.clone(), retain_graph=True)  # another tensor: checked
        assert len(checks) == 2
        with mode.seed_channels(seed, (4, 17)):  # 17 is not a channel of seed: no hint
            torch.autograd.grad(y, x, seed, retain_graph=True)
        assert len(checks) == 3
        with mode.seed_channels(torch.zeros(3), (0,)):  # a tensor without a channel axis: no hint
            assert mode.sites.hint is None
        # the seed's values on its channel, handed over: not gathered out of the seed, the same bits
        gathers = []
        with mock.patch.object(kernels, "_select_channels", lambda *a: gathers.append(1) or real_select(*a)):
            with mode.seed_channels(seed, (4,), seed[:, [4]].clone()):
                (given,) = torch.autograd.grad(y, x, seed, retain_graph=True)
            assert not gathers and torch.equal(given, checked)
            for wrong in (seed[:, [4, 5]].clone(), seed[:, [4]].double(), seed[:, [4]].clone()[..., :-1]):
                with mode.seed_channels(seed, (4,), wrong):  # not the seed's shape or dtype: ignored
                    assert mode.sites.hint is not None and mode.sites.hint[2] is None
            with mode.seed_channels(seed, (5, 4), seed[:, [5, 4]].clone()):  # unsorted: which is which?
                assert mode.sites.hint[2] is None
    assert torch.equal(hinted, checked)


def test_the_engines_class_seeds_are_zero_outside_the_channels_they_name():
    """The seed builder's ``live_channels(c)`` and ``live_values()`` are what the engine vouches for to
    the kernels: every objective's seed of class c must be zero outside c and equal the values on it,
    including when the scratch buffer held another class's seed before (softmax seeds name none: they
    touch every channel)."""
    from engine.attribution.objectives import OBJECTIVES, ObjectiveSeeds
    from engine.models import demo_model

    model = demo_model().module.eval()
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 1, 30, 24, 24, generator=g)
    geometry = SlidingWindow(roi_size=(24, 16, 16), overlap=0.25).geometry(image.shape[2:])
    pred = torch.randint(0, 17, image.shape[2:], generator=g)
    for kind in OBJECTIVES:
        seeds = ObjectiveSeeds(kind, pred, geometry, model=model)
        fn = seeds.seed_fn(image)
        slices = geometry.slices[:1]
        logits = torch.zeros((1, 17, *geometry.window.roi_size))
        scratch = torch.empty_like(logits).fill_(7.0)  # garbage the first time, as the engine's is
        for c in (3, 11, 3, 0):
            seed = fn(c, slices, logits, out=scratch, scale=0.5)
            live = fn.live_channels(c)
            if kind == "softmax":
                assert live is None
                continue
            assert live == (c,)
            outside = torch.ones(17, dtype=torch.bool)
            outside[list(live)] = False
            assert seed[:, outside].abs().sum() == 0 and seed[:, c].abs().sum() > 0
            values = fn.live_values()  # the seed on its live channel, its own tensor
            assert torch.equal(values, seed[:, [c]]) and values.data_ptr() != seed.data_ptr()


# ----------------------------------------------------------------------------- the instance-norm guard


@pytest.mark.parametrize("affine,running", [(False, False), (True, False), (True, True)])
def test_instance_norm_gets_its_gradient_in_its_own_layout(affine, running):
    """PyTorch's CPU instance_norm backward is wrong for a batch of one when the incoming gradient is
    channels-last (its output is contiguous); under the guard the gradient equals the one autograd
    gives for a contiguous gradient of the same values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 7, 6, 5, generator=g).contiguous(memory_format=CL)
    w, b = (torch.rand(6, generator=g), torch.rand(6, generator=g)) if affine else (None, None)
    # running statistics used in eval (track_running_stats=True): the same bug
    stats = dict(running_mean=torch.randn(6, generator=g), running_var=torch.rand(6, generator=g) + 0.5,
                 use_input_stats=False) if running else {}
    seed = torch.randn(1, 6, 7, 6, 5, generator=g)
    _, g_ref = _reference(F.instance_norm, x, seed, weight=w, bias=b, **stats)  # contiguous seed: right
    xr = x.detach().clone().requires_grad_(True)
    with EngineKernels(fast=False) as mode:
        y = F.instance_norm(xr, weight=w, bias=b, **stats)
    (gx,) = torch.autograd.grad(y, xr, seed.contiguous(memory_format=CL))
    assert mode.guarded == 1
    assert _rel(gx, g_ref) < 1e-6


def _float64_maps(model, image, shape):
    import copy

    window = SlidingWindow(roi_size=shape, memory_format="contiguous", kernels="torch")
    e = explain_volume(copy.deepcopy(model).double(), image.double(), method="saliency", window=window,
                       class_names=[f"c{i}" for i in range(3)], return_maps=True)
    return e.maps


@pytest.mark.parametrize("arch", ["dynunet", "unet_gelu"])
@pytest.mark.parametrize("kernels", ["engine", "torch"])
def test_channels_last_maps_equal_float64_on_models_that_hit_the_instance_norm_bug(arch, kernels):
    """Smooth activations (no ReLU kinks), so fp32 must be within rounding of float64. Without the
    guard these channels-last runs were off by relative errors above 1 (BENCHMARKS.md)."""
    from monai.networks.nets import DynUNet, UNet

    torch.manual_seed(0)
    if arch == "dynunet":  # UnetResBlock: norm, then an in-place residual add
        model = DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                        res_block=True, act_name="gelu").eval()
    else:  # MONAI's UNet with GELU instead of PReLU
        model = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, act="gelu").eval()
    shape = (32, 32, 32)  # large enough for PyTorch's own kernels to run some layers channels-last too
    image = torch.rand(1, *shape)
    ref = _float64_maps(model, image, shape)
    window = SlidingWindow(roi_size=shape, memory_format="channels_last", kernels=kernels)
    e = explain_volume(model, image, method="saliency", window=window, class_names=[f"c{i}" for i in range(3)],
                       return_maps=True)
    for name, m in e.maps.items():
        assert _rel(m.double(), ref[name]) < 1e-4, name


def test_the_guard_works_under_vmap_batched_vjps():
    """vjp="batched" takes the VJPs under vmap, through the guard's backward: same maps as the loop."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, act="gelu").eval()
    image = torch.rand(1, 24, 24, 24)
    maps = {}
    for vjp in ("loop", "batched"):
        window = SlidingWindow(roi_size=(24, 24, 24), vjp=vjp, memory_format="channels_last")
        maps[vjp] = explain_volume(model, image, method="saliency", window=window, class_names=["a", "b", "c"],
                                   return_maps=True).maps
    for name in maps["loop"]:
        assert _rel(maps["batched"][name], maps["loop"][name]) < 1e-4


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size,im2col", [((24, 20, 20), True), ((48, 48, 48), False)])
def test_few_channel_input_gradients_take_the_kernel_the_rule_names_and_equal_autograd(autocast, size, im2col,
                                                                                        monkeypatch):
    """The input gradient into an image's channel comes from PyTorch's im2col kernel when the output
    gradient is small (the demo's first layers), from oneDNN's when it is large; float32 either way
    (also under bf16 autocast), equal to autograd's, and the same bits on every run."""
    import engine.attribution.kernels as kernels

    calls: list[str] = []
    real = torch.ops.aten.slow_conv_transpose3d

    class Ops:  # counts the im2col calls; everything else is torch.ops.aten's
        def __getattr__(self, name):
            if name == "slow_conv_transpose3d":
                return lambda *a, **k: (calls.append(name), real(*a, **k))[1]
            return getattr(torch.ops.aten, name)

    g = torch.Generator().manual_seed(7)
    conv = torch.nn.Conv3d(1, 8, 3, stride=2, padding=1).to(memory_format=CL).requires_grad_(False)
    x = torch.randn(1, 1, *(2 * n for n in size), generator=g).contiguous(memory_format=CL)
    xr = x.clone().requires_grad_(True)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    with ctx():
        y_ref = conv(xr)
    seed = torch.randn(y_ref.shape, generator=g).to(y_ref.dtype)
    (g_ref,) = torch.autograd.grad(y_ref, xr, seed)
    monkeypatch.setattr(kernels.torch.ops, "aten", Ops(), raising=False)
    runs = []
    for _ in range(2):
        with EngineKernels():
            with ctx():
                y = conv(xr)
            runs.append(torch.autograd.grad(y, xr, seed)[0])
    monkeypatch.undo()
    assert calls == (["slow_conv_transpose3d"] * 2 if im2col else [])
    assert runs[0].dtype == torch.float32 and torch.equal(runs[0], runs[1])
    assert _rel(runs[0], g_ref) < (1e-2 if autocast else 1e-5)


# ----------------------------------------------------------------------------- the channels-last instance norm


def _norm_input(n: int, c: int, size: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, *size, generator=g) * 3 + 1.5).contiguous(memory_format=CL)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n,c,size", [(1, 17, (24, 20, 20)), (2, 3, (41, 43, 37)), (1, 2, (64, 40, 32)),
                                      (2, 17, (64, 48, 48))])  # the last: both sums in one pass (_column_sums)
@pytest.mark.parametrize("seed_layout", [CL, torch.contiguous_format])
def test_channels_last_instance_norm_is_pytorchs_forward_and_the_float64_gradient(affine, n, c, size, seed_layout):
    """Large channels-last norms run in the engine's kernel: the forward is PyTorch's, bit for bit, and
    channels-last; the input gradient matches float64 autograd (prime sizes: rows of one channel group)."""
    x = _norm_input(n, c, size)
    g = torch.Generator().manual_seed(6)
    w, b = (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)) if affine else (None, None)
    seed = torch.randn(x.shape, generator=g).contiguous(memory_format=seed_layout)
    y_ref = F.instance_norm(x, weight=w, bias=b)
    xd = x.double().contiguous().requires_grad_(True)
    yd = F.instance_norm(xd, weight=None if w is None else w.double(), bias=None if b is None else b.double())
    (g64,) = torch.autograd.grad(yd, xd, seed.double().contiguous())  # contiguous: PyTorch's bug (above)
    xr = x.detach().clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.instance_norm(xr, weight=w, bias=b)
    assert mode.norm_calls == 1 and mode.guarded == 0 and mode.norm_layout == CL
    assert y.is_contiguous(memory_format=CL) and torch.equal(y.detach(), y_ref)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert gx.is_contiguous(memory_format=CL)
    assert _rel(gx.double(), g64) < 1e-5
    # the module form (InstanceNorm3d with frozen affine parameters) takes the same route
    norm = torch.nn.InstanceNorm3d(c, affine=affine)
    if affine:
        norm.weight.data.copy_(w)
        norm.bias.data.copy_(b)
    with engine_kernels(norm, True) as mode:
        assert torch.equal(norm(xr).detach(), y_ref)
    assert mode.norm_calls == 1


@pytest.mark.parametrize("rows,cols", [(640, 2040), (4096, 1088), (2560, 1020), (4099, 600), (7, 3)])
def test_the_norm_backwards_column_sums_are_the_float64_sums(rows, cols):
    """The norm's backward takes both its per-column sums (of g and of g * x_hat) of a large tensor in one
    pass, through batch norm's backward reduction on blocks of rows: they are as close to the float64
    sums as PyTorch's cascaded ``sum``, which small tensors and row counts with no block size (a prime)
    take, and a non-finite value reaches its column's sums only."""
    from engine.attribution.kernels import _ONE_PASS_MIN, _column_sums, _row_block

    one_pass = rows * cols >= _ONE_PASS_MIN and _row_block(rows) > 0
    assert one_pass == ((rows, cols) in ((4096, 1088), (2560, 1020)))

    gen = torch.Generator().manual_seed(rows)
    g = torch.randn(rows, cols, generator=gen) + 1.0  # most of a channel's gradient is one value, as a seed's
    x = torch.randn(rows, cols, generator=gen)
    sums = _column_sums(g, x)
    ref = torch.stack((g.double().sum(0), (g.double() * x.double()).sum(0)))
    assert sums.shape == (2, cols) and sums.dtype == torch.float32
    cascaded = torch.stack((g.sum(0), (g * x).sum(0))).double()
    for i in (0, 1):
        assert _rel(sums[i].double(), ref[i]) < max(1e-6, 3 * _rel(cascaded[i], ref[i]))
    g[rows // 2, 1] = float("nan")
    bad = _column_sums(g, x)
    assert bad[:, 1].isnan().all() and bad[:, [0, *range(2, cols)]].isfinite().all()


def test_instance_norms_the_engine_kernel_does_not_take_keep_pytorchs():
    """Contiguous or small inputs, running statistics, trainable weights, autocast, float64 and the
    kernels switched off all run PyTorch's instance norm (under the guard where it applies)."""
    big = _norm_input(1, 8, (24, 20, 20))
    small = _norm_input(1, 8, (12, 10, 10))
    stats = dict(running_mean=torch.zeros(8), running_var=torch.ones(8), use_input_stats=False)
    cases = [
        (big.contiguous(), {}, {}),
        (small, {}, {}),
        (big, stats, {}),
        (big, dict(weight=torch.ones(8, requires_grad=True)), {}),
        (big.double(), {}, {}),
        (big, {}, {"autocast": True}),
        (big, {}, {"fast": False}),
    ]
    for x, kw, how in cases:
        xr = x.detach().clone().requires_grad_(True)
        with EngineKernels(fast=how.get("fast", True)) as mode, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=how.get("autocast", False)):
            y = F.instance_norm(xr, **kw)
        assert mode.norm_calls == 0, (tuple(x.shape), x.dtype, kw, how)
        ref = F.instance_norm(x, **{k: v.detach() if torch.is_tensor(v) else v for k, v in kw.items()})
        assert torch.equal(y.detach(), ref.to(y.dtype))
        assert mode.norm_layout == torch.contiguous_format


def test_aten_instance_norm_binds_its_own_argument_order():
    """``torch.instance_norm`` takes (input, weight, bias, running_mean, running_var, ...): a weight
    passed positionally there is a weight, not a running mean."""
    x = _norm_input(1, 4, (32, 24, 24))
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    ref = torch.instance_norm(x, w, b, None, None, True, 0.1, 1e-5, False)
    with EngineKernels() as mode:
        y = torch.instance_norm(x, w, b, None, None, True, 0.1, 1e-5, False)
    assert mode.norm_calls == 1 and torch.equal(y, ref)


class _NormResidualHead(torch.nn.Module):
    """conv -> instance norm, then ``conv(prelu(h)) + h``: the seed meets the norm's channels-last
    output through autograd's add (no fold: the added tensor is not the convolution's input)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(12)
        self.a = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(8)
        self.act = torch.nn.PReLU()
        self.b = torch.nn.Conv3d(8, 8, 3, padding=1)
        with torch.no_grad():
            for p in (self.a.weight, self.b.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.a(x))
        return self.b(self.act(h)) + h


@pytest.mark.parametrize("arch", ["demo_unet", "norm_residual"])
def test_the_engine_builds_class_seeds_in_the_layout_the_kernels_read_them_in(monkeypatch, arch):
    """Where the model's output comes straight from the engine's convolution (the demo UNet's head,
    ``conv(h) + h`` folded into one backward) its kernels read the seed's live channel only, so the
    seeds are contiguous: a class's channel is one block to write and clear. Where the seed meets a
    channels-last norm's output through an add, they are channels-last, so that add needs no
    transposing copy. With PyTorch's kernels they stay contiguous (its norms return contiguous
    tensors). The maps agree either way. With each seed the engine hands the kernels the seed on its
    live channel as its own tensor, and it is exactly that."""
    from engine.models import demo_model

    seen: list[torch.memory_format] = []
    original = EngineKernels.seed_channels

    def spy(self, seed, channels, values=None):
        seen.append(CL if seed.is_contiguous(memory_format=CL) and not seed.is_contiguous() else torch.contiguous_format)
        assert values is not None and torch.equal(values, seed[:, list(channels)])
        return original(self, seed, channels, values)

    monkeypatch.setattr(EngineKernels, "seed_channels", spy)
    if arch == "demo_unet":
        model, image, roi, n = demo_model().module.eval(), torch.rand(1, 24, 16, 16), (24, 16, 16), 17
    else:
        model, image, roi, n = _NormResidualHead().eval(), torch.rand(1, 21, 20, 20), (21, 20, 20), 8
    classes = ["c%d" % i for i in range(n)]
    expected = {"engine": torch.contiguous_format if arch == "demo_unet" else CL, "torch": torch.contiguous_format}
    maps = {}
    for kernels in ("engine", "torch"):
        seen.clear()
        window = SlidingWindow(roi_size=roi, kernels=kernels)
        maps[kernels] = explain_volume(model, image, method="saliency", window=window, targets=[2, 7],
                                       class_names=classes, return_maps=True).maps
        assert seen and set(seen) == {expected[kernels]}, kernels
    for name in maps["torch"]:
        assert _rel(maps["engine"][name], maps["torch"][name]) < 1e-5


# ----------------------------------------------------------------------------- dead voxels


@pytest.mark.parametrize("x_layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 1, 0, 1), (3, 1, 2, 2),
                                                            ((3, 1, 5), 1, (1, 0, 2), 1), (3, 2, 1, 1)])
@pytest.mark.parametrize("where", ["inside", "low corner", "high corner", "one voxel"])
def test_a_narrowed_gradient_on_few_voxels_is_taken_on_their_box(x_layout, kernel, stride, padding, dilation, where):
    """A class seed is zero outside its class's voxels: the input gradient is the transposed convolution
    of the box around them, written into zeros, clipped where the box's reach leaves the input; equal
    to float64 autograd's and in the input's layout."""
    g = torch.Generator().manual_seed(11)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    w, x, xr, y_ref = _float64_head(g, kernel, x_layout, (14, 12, 11), **kw)
    size = y_ref.shape[2:]
    box = {"inside": [(1, 3), (2, 4), (1, 2)], "low corner": [(0, 2), (0, 1), (0, 2)],
           "high corner": [(n - 3, n - 1) for n in size], "one voxel": [(2, 2), (1, 1), (1, 1)]}[where]
    seed = torch.zeros(y_ref.shape)
    region = (0, 4, *(slice(lo, hi + 1) for lo, hi in box))
    seed[region] = torch.randn(seed[region].shape, generator=g)
    (g_ref,) = torch.autograd.grad(y_ref, xr, seed.double())
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.conv3d(xr, w.float().contiguous(memory_format=CL), **kw)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert mode.sites.narrowed == 1 and mode.sites.boxed == 1
    assert _rel(gx.double(), g_ref) < 1e-6
    assert gx.is_contiguous(memory_format=x_layout)


def test_a_box_over_most_voxels_runs_dense_and_an_empty_live_channel_gives_zeros():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(17, 17, 3, 3, 3, generator=g).contiguous(memory_format=CL)
    x = torch.randn(1, 17, 12, 10, 9, generator=g).contiguous(memory_format=CL)
    wide = torch.zeros(1, 17, 12, 10, 9)
    wide[0, 2, 1:11, 1:9, 1:8] = torch.randn(10, 8, 7, generator=g)  # the box holds 52% of the voxels
    _, g_ref = _reference(F.conv3d, x, wide, weight=w, padding=1)
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = F.conv3d(xr, w, padding=1)
        (gx,) = torch.autograd.grad(y, xr, wide, retain_graph=True)
        assert mode.sites.narrowed == 1 and mode.sites.boxed == 0 and _rel(gx, g_ref) < 1e-5
        empty = torch.zeros(y.shape)
        with mode.seed_channels(empty, (2,)):  # the hint names a channel that holds no nonzero voxel
            (gx,) = torch.autograd.grad(y, xr, empty)
    assert torch.equal(gx, torch.zeros_like(gx)) and gx.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("affine", [False, True])
def test_a_channels_last_norm_whose_output_the_model_modifies_in_place(affine):
    """MONAI's UnetResBlock (DynUNet, Swin UNETR's decoder) adds its residual into the norm's output in
    place: the engine's norm must not have saved that tensor, and the gradient is autograd's."""
    g = torch.Generator().manual_seed(13)
    x = _norm_input(1, 8, (24, 20, 20))
    r = torch.randn(x.shape, generator=g).contiguous(memory_format=CL)
    w, b = (torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)) if affine else (None, None)
    seed = torch.randn(x.shape, generator=g).contiguous(memory_format=CL)

    def block(t: torch.Tensor) -> torch.Tensor:
        y = F.instance_norm(t, weight=w, bias=b)
        y += r * t  # in place, and through t again
        return F.leaky_relu(y, 0.01)

    xd = x.double().contiguous().requires_grad_(True)
    w64, b64 = (None, None) if w is None else (w.double(), b.double())
    yd = F.leaky_relu(F.instance_norm(xd, weight=w64, bias=b64) + r.double() * xd, 0.01)
    (g64,) = torch.autograd.grad(yd, xd, seed.double().contiguous())
    xr = x.detach().clone().requires_grad_(True)
    with EngineKernels() as mode:
        y = block(xr)
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert mode.norm_calls == 1
    assert _rel(gx.double(), g64) < 1e-5


def _residual_seed(shape, kind, g):
    """A seed for a residual head's output: one live channel over the window, one live channel on a
    corner box (the dead-voxel path), or every channel live."""
    seed = torch.zeros(shape)
    if kind == "channel":
        seed[:, 4] = torch.randn(shape[2:], generator=g)
    elif kind == "box":
        seed[:, 4, :3, 1:4, -2:] = torch.randn(3, 3, 2, generator=g)
    else:
        seed = torch.randn(shape, generator=g)
    return seed.contiguous(memory_format=CL)


@pytest.mark.parametrize("kind", ["channel", "box", "dense"])
@pytest.mark.parametrize("x_layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("kernel,padding,dilation", [(3, 1, 1), (3, 2, 2), ((3, 1, 5), (1, 0, 2), 1), (1, 0, 1)])
@pytest.mark.parametrize("shortcut_first", [False, True])
def test_a_residual_heads_identity_is_folded_into_its_convolutions_backward(kind, x_layout, kernel, padding, dilation,
                                                                          shortcut_first):
    """``conv(h) + h`` (MONAI's ResidualUnit with an identity shortcut: the demo UNet's head) takes its
    input gradient as one transposed convolution by the kernel plus the identity at its centre tap,
    instead of that and a full-resolution add. The forward is the same add, bit for bit; the input
    gradient equals float64 autograd's for narrowed, boxed and dense seeds, either operand order."""
    g = torch.Generator().manual_seed(21)
    kw = dict(padding=padding, dilation=dilation)
    w, x, xr, y_ref = _float64_head(g, kernel, x_layout, (12, 10, 9), **kw)
    y_ref = xr + y_ref if shortcut_first else y_ref + xr
    seed = _residual_seed(y_ref.shape, kind, g)
    (g_ref,) = torch.autograd.grad(y_ref, xr, seed.double())
    wf = w.float().contiguous(memory_format=CL)
    xr = x.clone().requires_grad_(True)
    with EngineKernels() as mode:
        conv = F.conv3d(xr, wf, **kw)
        y = xr + conv if shortcut_first else conv + xr
    assert mode.sites.folded == 1
    assert torch.equal(y.detach(), conv.detach() + x)  # the forward is the same add
    (gx,) = torch.autograd.grad(y, xr, seed)
    assert _rel(gx.double(), g_ref) < 1e-6
    if kind != "dense":
        assert mode.sites.narrowed == 1
    if kind == "box":
        assert mode.sites.boxed == 1
    assert torch.equal(wf, w.float())  # the model's weight is untouched; the folded one is a copy
    (wr,) = mode.sites.residuals.values()
    assert torch.equal(wr, wf + _centre_identity(wf))


def _centre_identity(w: torch.Tensor) -> torch.Tensor:
    eye = torch.zeros_like(w)
    for c in range(w.shape[0]):
        eye[(c, c, *(k // 2 for k in w.shape[2:]))] = 1.0
    return eye


def test_adds_that_are_not_an_identity_residual_keep_autograds_add():
    """The fold applies only to ``conv(x) + x`` itself: a convolution added to another tensor, a scaled
    add, a strided or channel-changing convolution, float64 or bf16 autocast keep autograd's add; and
    where the convolution's output is used elsewhere as well its gradient still flows there."""
    g = torch.Generator().manual_seed(22)
    w = torch.randn(8, 8, 3, 3, 3, generator=g)
    x = torch.randn(1, 8, 9, 8, 7, generator=g).contiguous(memory_format=CL)
    other = torch.randn_like(x)

    def grads(fn, dtype=torch.float32, autocast=False):
        xr = x.to(dtype).requires_grad_(True)
        outs = {}
        for mode_on in (False, True):
            xi = xr.detach().clone().requires_grad_(True)
            with EngineKernels() if mode_on else torch.enable_grad() as mode, \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = fn(xi, w.to(dtype))
            seed = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
            (gx,) = torch.autograd.grad(y, xi, seed)
            outs[mode_on] = (gx, mode.sites.folded if mode_on else None)
        return outs

    cases = {
        "another tensor": lambda t, w: F.conv3d(t, w, padding=1) + other,
        "scaled": lambda t, w: torch.add(F.conv3d(t, w, padding=1), t, alpha=2.0),
        "a copy of the input": lambda t, w: F.conv3d(t, w, padding=1) + t * 1.0,
        "the output used twice": lambda t, w: (lambda c: c + t + c.sin())(F.conv3d(t, w, padding=1)),
    }
    for name, fn in cases.items():
        out = grads(fn)
        assert out[True][1] == (1 if name == "the output used twice" else 0), name
        assert _rel(out[True][0], out[False][0]) < 1e-5, name
    out = grads(cases["the output used twice"], dtype=torch.float64)
    assert out[True][1] == 0 and _rel(out[True][0], out[False][0]) < 1e-12
    out = grads(lambda t, w: F.conv3d(t, w, padding=1) + t, autocast=True)
    assert out[True][1] == 0


# ----------------------------------------------------------------------------- compiled norm + activation


def _norm_act_block(c: int, affine: bool, act: str, other_use: bool = False) -> torch.nn.Module:
    """conv -> instance norm -> activation -> conv (MONAI's Convolution block, nnU-Net's with an in-place
    LeakyReLU), frozen; with ``other_use`` the norm's output is also added to the block's output (a
    second path through it). ``act``: ``prelu`` (one slope), ``prelu8`` (one per channel),
    ``leaky_inplace`` or ``relu``."""
    g = torch.Generator().manual_seed(31)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv3d(2, c, 3, padding=1)
            self.norm = torch.nn.InstanceNorm3d(c, affine=affine)
            self.act = {"prelu": lambda: torch.nn.PReLU(1, init=0.2), "prelu8": lambda: torch.nn.PReLU(c),
                        "leaky_inplace": lambda: torch.nn.LeakyReLU(0.01, inplace=True),
                        "relu": lambda: torch.nn.ReLU()}[act]()
            self.b = torch.nn.Conv3d(c, c, 3, padding=1)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if act.startswith("prelu"):
                    self.act.weight.copy_(torch.rand(self.act.weight.shape, generator=g) * 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.a(x))
            z = self.act(y)
            assert (z is y) == (act == "leaky_inplace")  # an in-place activation stays in place
            out = self.b(z)
            return out + y.sin() if other_use and act != "leaky_inplace" else out

    return Block().eval()


@pytest.mark.parametrize("affine,act,other_use", [(False, "prelu", False), (True, "prelu8", False),
                                                  (False, "prelu", True), (True, "leaky_inplace", False),
                                                  (False, "relu", True)])
def test_the_compiled_norm_activation_backward_equals_float64(affine, act, other_use):
    """``kernels='compiled'``: a PReLU, LeakyReLU (in place, as nnU-Net's) or ReLU after the engine's
    channels-last instance norm takes the input gradient of both in one ``torch.compile``d kernel. The
    maps equal float64 autograd's (affine or not, one slope or one per channel), and a second use of
    the norm's output still gets its gradient through the norm's own node."""
    from engine.attribution import kernels

    model = _norm_act_block(8, affine, act, other_use)
    x = torch.randn(1, 2, 21, 20, 20, generator=torch.Generator().manual_seed(4))  # 8 x 8400 >= 2^16 per sample
    seed = torch.randn(1, 8, 21, 20, 20, generator=torch.Generator().manual_seed(5))
    xr = x.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(copy_double(model)(xr), xr, seed.double())
    model.to(memory_format=CL)
    xc = x.contiguous(memory_format=CL).requires_grad_(True)
    with engine_kernels(model, True, guard=True, fuse=True) as mode:
        out = model(xc)
        (gx,) = torch.autograd.grad(out, xc, seed.contiguous(memory_format=CL))
    assert mode.norm_calls == 1 and mode.fused_calls == 1
    assert kernels._Compiled.failed is None  # compiled, not the eager fallback
    assert _rel(gx.double(), ref) < 1e-5


def copy_double(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).double()


def test_a_failed_compile_says_so_once_and_falls_back_to_the_eager_kernels(monkeypatch, caplog):
    """Without a working ``torch.compile`` (no C++ compiler, say) the fused backward logs one line
    naming the cure, runs the engine's eager kernels, and does not try again in the process."""
    from engine.attribution import kernels

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler found\ndetails")

    monkeypatch.setattr(kernels._Compiled, "fn", broken)
    monkeypatch.setattr(kernels._Compiled, "failed", None)
    model = _norm_act_block(8, False, "prelu")
    x = torch.randn(1, 2, 21, 20, 20, generator=torch.Generator().manual_seed(4))
    seed = torch.randn(1, 8, 21, 20, 20, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=CL)
    grads = {}
    for fuse in (True, True, False):
        model.to(memory_format=CL)
        xc = x.contiguous(memory_format=CL).requires_grad_(True)
        with engine_kernels(model, True, guard=True, fuse=fuse) as mode, caplog.at_level("WARNING"):
            (g,) = torch.autograd.grad(model(xc), xc, seed)
        grads.setdefault(fuse, []).append(g)
    assert len(calls) == 1  # tried once
    warned = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler found" in warned[0] and "details" not in warned[0]
    assert "kernels='engine'" in warned[0]
    # the fallback is the eager kernels' arithmetic, bit for bit
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][0])


def test_which_runs_fuse_the_norm_and_activation():
    """``compiled`` always, ``auto`` from 2^19-voxel windows, ``engine`` and ``torch`` never; inside the
    kernels only a float32 activation of the engine's own norm output fuses (not under autocast, not
    after PyTorch's norm, not an in-place LeakyReLU with a negative slope, which flips signs)."""
    from engine.attribution.kernels import FUSE_MIN_VOXELS, resolve_fused

    assert resolve_fused("compiled", (8, 8, 8)) and not resolve_fused("engine", (128,) * 3)
    assert not resolve_fused("torch", (128,) * 3)
    assert resolve_fused("auto", (96, 96, 96)) and resolve_fused("auto", (128, 64, 64)) and FUSE_MIN_VOXELS == 1 << 19
    assert not resolve_fused("auto", (64, 64, 64)) and not resolve_fused("auto", (48, 40, 40))  # the demo's
    model = _norm_act_block(8, False, "prelu").to(memory_format=CL)
    small = torch.randn(1, 2, 12, 12, 12).contiguous(memory_format=CL).requires_grad_(True)  # PyTorch's norm
    big = torch.randn(1, 2, 21, 20, 20).contiguous(memory_format=CL).requires_grad_(True)
    with engine_kernels(model, True, guard=True, fuse=True) as mode:
        model(small)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(big)
        with torch.no_grad():
            model(big)
    assert mode.fused_calls == 0
    with engine_kernels(model, True, guard=True, fuse=False) as mode:
        model(big)
    assert mode.fused_calls == 0 and mode.norm_calls == 1
    flipping = _norm_act_block(8, False, "leaky_inplace").to(memory_format=CL)
    flipping.act.negative_slope = -0.5
    with engine_kernels(flipping, True, guard=True, fuse=True) as mode:
        flipping(big)
    assert mode.fused_calls == 0 and mode.norm_calls == 1


def test_a_one_channel_window_gets_channels_last_strides():
    """A one-channel image is "contiguous" in channels-last too, so ``contiguous(memory_format=...)``
    keeps its strides and the first convolution returns a contiguous output; the engine gives its
    windows channels-last strides, so the model runs channels-last from its first layer."""
    from engine.attribution.sliding import _in_layout

    x = torch.rand(1, 1, 21, 20, 20)
    assert x.contiguous(memory_format=CL).stride() == x.stride()  # PyTorch keeps them
    y = _in_layout(x, CL)
    assert y.stride() == (8400, 1, 400, 20, 1) and torch.equal(y, x)
    assert _in_layout(x, torch.contiguous_format) is x
    model = _NormResidualHead().eval().to(memory_format=CL)
    with engine_kernels(model, True) as mode:
        model(y.requires_grad_(True))
    assert mode.norm_calls == 1  # the first norm saw a channels-last input


def test_the_fused_backward_serves_every_pass_over_one_graph():
    """The engine takes one VJP per class from one forward (``retain_graph``): each pass's activation
    gradient reaches its own norm backward (they are keyed by the pass), so every class's map equals
    float64 autograd's, in any order and repeated."""
    model = _norm_act_block(8, True, "prelu8")
    x = torch.randn(1, 2, 21, 20, 20, generator=torch.Generator().manual_seed(6))
    seeds = []
    for c in (1, 5, 1):
        seed = torch.zeros(1, 8, 21, 20, 20)
        seed[:, c] = torch.rand(21, 20, 20, generator=torch.Generator().manual_seed(c))
        seeds.append(seed)
    xr = x.double().requires_grad_(True)
    ref_model = copy_double(model)
    out_ref = ref_model(xr)
    refs = [torch.autograd.grad(out_ref, xr, s.double(), retain_graph=True)[0] for s in seeds]
    model.to(memory_format=CL)
    xc = x.contiguous(memory_format=CL).requires_grad_(True)
    with engine_kernels(model, True, guard=True, fuse=True) as mode:
        out = model(xc)
        grads = [torch.autograd.grad(out, xc, s.contiguous(memory_format=CL), retain_graph=True)[0] for s in seeds]
    assert mode.fused_calls == 1
    for g, ref in zip(grads, refs):
        assert _rel(g.double(), ref) < 1e-5
    assert torch.equal(grads[0], grads[2])
    todo, norms = [out.grad_fn], []
    while todo:  # the graph's nodes, to find the norm's
        node = todo.pop()
        if node is not None:
            norms += [node] if type(node).__name__ == "_InstanceNormBackward" else []
            todo += [n for n, _ in node.next_functions]
    assert len(norms) == 1 and norms[0].stash == {}  # nothing left behind


def test_inductor_compiles_in_no_more_processes_than_the_process_has_threads():
    """A node's single-threaded actors would each start one compile process per core."""
    import torch._inductor.config as inductor

    from engine.attribution.kernels import _Compiled

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with _Compiled.threads():
            assert inductor.compile_threads == 1
    finally:
        torch.set_num_threads(threads)
    before = inductor.compile_threads
    with _Compiled.threads():
        assert 1 <= inductor.compile_threads <= max(1, min(before, threads))
    assert inductor.compile_threads == before  # restored
