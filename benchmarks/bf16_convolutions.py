"""Where a bf16 convolution's time goes on the CPU: oneDNN's kernels against the autocast path.

For the 3x3x3 convolutions of the demo UNet at its 48-voxel windows (channels-last, batch one, one
thread), it times in one run:

- oneDNN's bf16 forward and input gradient called directly on bf16 tensors
  (``torch.ops.mkldnn._convolution_pointwise`` / ``_convolution_transpose_pointwise``, the kernels
  the engine uses for fp32),
- PyTorch's own bf16 input gradient (``aten.convolution_backward``), and
- what the engine's bf16 runs pay: ``conv3d`` under ``torch.autocast`` on fp32 tensors, forward and
  input gradient through autograd.

It prints each layer's autocast time over the direct kernels' (forward + input gradient), and
checks that the two input gradients agree. The question it answers: can the engine's kernels
(``engine.attribution.kernels``, fp32 only) make bf16 faster the way they make fp32 faster?

    python benchmarks/bf16_convolutions.py --json bf16_conv.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: (input channels, output channels, window edge): the demo UNet's full-resolution and a deeper layer
LAYERS = ((17, 17, 48), (16, 17, 48), (32, 16, 48), (64, 32, 24))


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(cin: int, cout: int, edge: int, repeats: int) -> dict[str, Any]:
    cl = torch.channels_last_3d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, edge, edge, edge, generator=gen).to(memory_format=cl)
    w = 0.1 * torch.randn(cout, cin, 3, 3, 3, generator=gen)
    gy = torch.randn(1, cout, edge, edge, edge, generator=gen).to(memory_format=cl)
    xb, wb, gyb = x.to(torch.bfloat16), w.to(torch.bfloat16), gy.to(torch.bfloat16)
    one, pad, zero = [1, 1, 1], [1, 1, 1], [0, 0, 0]

    def direct_forward() -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(xb, wb, None, pad, one, one, 1, "none", [], None)

    def direct_input_gradient() -> torch.Tensor:
        return torch.ops.mkldnn._convolution_transpose_pointwise(gyb, wb, None, pad, zero, one, one, 1, "none", [],
                                                                 None)

    def torch_input_gradient() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(gyb, xb, wb, None, one, pad, one, False, zero, 1,
                                                   [True, False, False])[0]

    xr = x.clone().requires_grad_(True)

    def autocast_forward_and_input_gradient() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.conv3d(xr, w, padding=1)
        (g,) = torch.autograd.grad(y, xr, gy.to(y.dtype))
        return g

    ref, got = torch_input_gradient().float(), direct_input_gradient().float()
    out = {
        "layer": f"{cin}->{cout} at {edge}^3",
        "direct_forward_ms": _median_ms(direct_forward, repeats),
        "direct_input_gradient_ms": _median_ms(direct_input_gradient, repeats),
        "torch_input_gradient_ms": _median_ms(torch_input_gradient, repeats),
        "autocast_forward_and_input_gradient_ms": _median_ms(autocast_forward_and_input_gradient, repeats),
        "input_gradients_max_rel_diff": float((ref - got).abs().max() / ref.abs().max()),
    }
    direct = out["direct_forward_ms"] + out["direct_input_gradient_ms"]
    out["autocast_over_direct"] = out["autocast_forward_and_input_gradient_ms"] / direct
    out["autocast_overhead_ms"] = out["autocast_forward_and_input_gradient_ms"] - direct
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(cin, cout, edge, args.repeats) for cin, cout, edge in LAYERS]
    print(f"{'layer':18s} {'fwd':>6s} {'grad':>6s} {'torch grad':>10s} {'autocast f+g':>12s} {'ratio':>6s} {'diff':>8s}")
    for r in rows:
        print(f"{r['layer']:18s} {r['direct_forward_ms']:6.1f} {r['direct_input_gradient_ms']:6.1f} "
              f"{r['torch_input_gradient_ms']:10.1f} {r['autocast_forward_and_input_gradient_ms']:12.1f} "
              f"{r['autocast_over_direct']:6.2f} {r['input_gradients_max_rel_diff']:8.1e}")
    result = {"layers": rows, "threads": args.threads, "torch": torch.__version__, "machine": platform.processor(),
              "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
