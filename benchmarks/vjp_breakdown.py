"""Where a class VJP's time goes, node by node, in float32 and in bf16 autocast (CPU; issue 16).

The engine's bf16 runs were 1.3x its float32 runs on the demo UNet (BENCHMARKS.md) where the issue
asks for 1.8x. This script shows why, with the engine's own kernels on the demo UNet, channels-last,
one window (``--roi``, the demo's 48 x 40 x 40 by default), one thread: the forward and one class
VJP (class 1, the engine's seed and channel hint), each timed as a median over ``--repeats``, and
then the same VJP with a hook before and after every autograd node, so that each node's time is
its own (its kernels and its Python). Nodes are grouped by role (convolution, transposed
convolution, instance norm, activation: ``ROLES``, so that float32's and bf16's differently routed
nodes pair up) and output-gradient shape. Per group it prints the float32 and bf16 milliseconds and their ratio; then the share of the bf16 VJP
in nodes where bf16 gains less than 1.25x, the time outside the nodes (the autograd engine's
accumulation of gradients that meet, and the hooks), and the window's ratio for ``--classes``
class VJPs after one forward: ``(forward + classes x VJP)`` in float32 over the same in bf16, next
to the bf16 / float32 ratio of a large matrix multiply in this process (what the hardware gives), and
a bound: that ratio if bf16's VJP cost only its convolutions (every other node and the time between
nodes free).

    python benchmarks/vjp_breakdown.py --json vjp_breakdown.json --plot vjp_breakdown.png

``--plot`` draws the per-node table as bars (float32 beside bf16, the longest first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import write_json  # noqa: E402  (benchmarks/, the script's own folder)
from attribution_speed import class_seed, matmul_rate  # noqa: E402

from engine.attribution.kernels import engine_kernels  # noqa: E402
from engine.attribution.sliding import _in_layout  # noqa: E402
from engine.models import DEMO_ROI_SIZE, demo_model  # noqa: E402
from engine.runtime.heap import keep_cpu_heap  # noqa: E402

#: bf16 "gains little" in a node below this ratio (float32 time over bf16 time).
LITTLE_GAIN = 1.25

#: What a node does, so that float32 and bf16 rows pair up where the engine routes them differently
#: (float32 folds the head's residual into ``_ResidualConv`` and runs the norms in its own kernel;
#: bf16 keeps autograd's add, whose sum is taken between nodes, and PyTorch's norms under the guard).
ROLES = {"_Conv3dBackward": "conv3d", "_ResidualConvBackward": "conv3d", "_ConvTranspose3dBackward": "conv_transpose3d",
         "_InstanceNormBackward": "instance_norm", "NativeBatchNormBackward0": "instance_norm",
         "_GradInLayoutBackward": "instance_norm",
         "_NormActivationBackward": "activation",
         "_PReLUBackward": "activation", "AddBackward0": "add"}
CONVOLUTIONS = ("conv3d", "conv_transpose3d")


def _hooked(out: torch.Tensor, times: dict[tuple[str, tuple[int, ...]], list[float]]) -> None:
    """A hook before and after every node of ``out``'s graph: each node's time lands in ``times``, by
    role (``ROLES``) and the shape of its (first) output gradient."""
    started: dict[int, float] = {}
    seen: set[int] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = ROLES.get(type(node).__name__, type(node).__name__)

        def before(grad_outputs: Any, key: int = id(node)) -> None:
            started[key] = time.perf_counter()

        def after(grad_inputs: Any, grad_outputs: Any, key: int = id(node), name: str = name) -> None:
            # the first output gradient's shape (an instance norm fused with its activation gets none:
            # its input gradient's, which is the same)
            g = next((t for t in (*grad_outputs, *grad_inputs) if isinstance(t, torch.Tensor)), None)
            shape = tuple(g.shape) if g is not None else ()
            times[(name, shape)].append(time.perf_counter() - started[key])

        node.register_prehook(before)
        node.register_hook(after)
        stack.extend(nxt for nxt, _ in node.next_functions)


def breakdown(model: torch.nn.Module, roi: tuple[int, ...], dtype: torch.dtype | None, repeats: int,
              fuse: bool) -> dict[str, Any]:
    """Forward and class-VJP medians (plain, then hooked per node) in ``dtype`` (None: float32)."""
    x = _in_layout(torch.rand((1, 1, *roi)), torch.channels_last_3d).requires_grad_(True)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext
    nodes: dict[tuple[str, tuple[int, ...]], list[float]] = defaultdict(list)
    fwd, plain, hooked = [], [], []
    with engine_kernels(model, True, guard=True, fuse=fuse) as mode:
        for i in range(2 * repeats + 2):  # two untimed, then plain and hooked in turn
            t0 = time.perf_counter()
            with ctx():
                out = model(x)
            t1 = time.perf_counter()
            seed = class_seed(out, mode)
            values = seed[:, 1:2].contiguous()
            hook = i >= 2 and i % 2 == 1
            if hook:
                _hooked(out, nodes)
            t2 = time.perf_counter()
            with mode.seed_channels(seed, (1,), values):
                torch.autograd.grad(out, x, seed)
            t3 = time.perf_counter()
            if i >= 2:
                (hooked if hook else plain).append(t3 - t2)
                fwd.append(t1 - t0)
    per = {f"{name} {'x'.join(map(str, shape))}": statistics.median(_per_vjp(ts, repeats)) for (name, shape), ts
           in nodes.items()}
    return {"forward_s": statistics.median(fwd), "vjp_s": statistics.median(plain),
            "vjp_hooked_s": statistics.median(hooked), "nodes_s": per}


def _per_vjp(ts: list[float], repeats: int) -> list[float]:
    """A group's times as its total per VJP (a group may hold several nodes of one VJP)."""
    k = max(1, len(ts) // repeats)
    return [sum(ts[i:i + k]) for i in range(0, k * repeats, k)]


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], title: str, path: Path) -> None:
    """The node rows of at least 0.05 ms as horizontal bars, float32 beside bf16, saved at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if max(r["fp32_ms"], r["bf16_ms"]) >= 0.05][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.6))
    y = range(len(shown))
    ax.barh([i + 0.2 for i in y], [r["fp32_ms"] for r in shown], height=0.4, label="float32")
    ax.barh([i - 0.2 for i in y], [r["bf16_ms"] for r in shown], height=0.4, label="bf16 autocast")
    ax.set_yticks(list(y), [r["node"] for r in shown], fontsize=8)
    ax.set_xlabel("ms per class VJP (hooked)")
    ax.set_title(f"{title}\nbf16 / fp32: class VJP {summary['vjp_speedup']:.2f}x, window "
                 f"{summary['window_speedup']:.2f}x, convolutions-only bound "
                 f"{summary['window_speedup_bound_convolutions_only']:.2f}x, matmul {summary['matmul_speedup']:.2f}x",
                 fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--roi", type=int, nargs=3, default=list(DEMO_ROI_SIZE))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--classes", type=int, default=17, help="class VJPs per window forward (the demo's 17)")
    ap.add_argument("--kernels", choices=("engine", "compiled"), default="engine")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="also draw the node table as bars (PNG)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.classes < 1 or min(args.roi) < 16:
        ap.error("--repeats and --classes must be at least 1 and every --roi side at least 16")
    heap = keep_cpu_heap()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = demo_model().module.eval().to(memory_format=torch.channels_last_3d)
    roi = tuple(args.roi)
    fuse = args.kernels == "compiled"
    runs = {"fp32": breakdown(model, roi, None, args.repeats, fuse),
            "bf16": breakdown(model, roi, torch.bfloat16, args.repeats, fuse)}
    mm32, mm16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    f32, b16 = runs["fp32"], runs["bf16"]
    names = sorted(set(f32["nodes_s"]) | set(b16["nodes_s"]),
                   key=lambda k: -(f32["nodes_s"].get(k, 0.0) + b16["nodes_s"].get(k, 0.0)))
    rows = [{"node": k, "fp32_ms": 1e3 * f32["nodes_s"].get(k, 0.0), "bf16_ms": 1e3 * b16["nodes_s"].get(k, 0.0)}
            for k in names]
    for r in rows:
        r["ratio"] = r["fp32_ms"] / r["bf16_ms"] if r["bf16_ms"] > 0 else None
    print(f"One class VJP of the demo UNet at a {' x '.join(map(str, roi))} window, kernels={args.kernels}, "
          f"{args.threads} thread(s), channels-last; median of {args.repeats} (ms per VJP, hooked):")
    print(f"{'node role (output gradient)':48s} {'fp32':>8s} {'bf16':>8s} {'fp32/bf16':>9s}")
    for r in rows:
        if max(r["fp32_ms"], r["bf16_ms"]) >= 0.05:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            print(f"{r['node'][:48]:48s} {r['fp32_ms']:8.3f} {r['bf16_ms']:8.3f} {ratio:>9s}")
    summary: dict[str, Any] = {}
    for tag, run in runs.items():
        inside = sum(run["nodes_s"].values())
        summary[tag] = {"nodes_ms": 1e3 * inside, "outside_nodes_ms": 1e3 * (run["vjp_hooked_s"] - inside),
                        "vjp_ms": 1e3 * run["vjp_s"], "vjp_hooked_ms": 1e3 * run["vjp_hooked_s"],
                        "forward_ms": 1e3 * run["forward_s"],
                        "window_ms": 1e3 * (run["forward_s"] + args.classes * run["vjp_s"])}
    little = sum(r["bf16_ms"] for r in rows if r["fp32_ms"] > 0 and r["ratio"] is not None and r["ratio"] < LITTLE_GAIN)
    summary["bf16_share_in_little_gain_nodes"] = little / summary["bf16"]["nodes_ms"]
    summary["vjp_speedup"] = summary["fp32"]["vjp_ms"] / summary["bf16"]["vjp_ms"]
    summary["forward_speedup"] = summary["fp32"]["forward_ms"] / summary["bf16"]["forward_ms"]
    summary["window_speedup"] = summary["fp32"]["window_ms"] / summary["bf16"]["window_ms"]
    summary["matmul_speedup"] = mm16 / mm32
    # A bound: bf16's window if only its convolutions cost anything in a VJP (every norm, activation and
    # the time between nodes free), against the float32 window as measured
    conv_ms = sum(r["bf16_ms"] for r in rows if r["node"].split()[0] in CONVOLUTIONS)
    summary["bf16_convolutions_ms"] = conv_ms
    summary["window_speedup_bound_convolutions_only"] = summary["fp32"]["window_ms"] / (
        summary["bf16"]["forward_ms"] + args.classes * conv_ms)
    for tag in runs:
        s = summary[tag]
        print(f"{tag}: forward {s['forward_ms']:.2f} ms; class VJP {s['vjp_ms']:.2f} ms plain, "
              f"{s['vjp_hooked_ms']:.2f} hooked = {s['nodes_ms']:.2f} in nodes + {s['outside_nodes_ms']:.2f} outside")
    print(f"bf16 over fp32: forward {summary['forward_speedup']:.2f}x, class VJP {summary['vjp_speedup']:.2f}x, "
          f"window (forward + {args.classes} VJPs) {summary['window_speedup']:.2f}x (goal 1.8); a large matmul "
          f"{summary['matmul_speedup']:.2f}x ({mm32 / 1e9:.0f} / {mm16 / 1e9:.0f} GFLOP/s)")
    print(f"{100 * summary['bf16_share_in_little_gain_nodes']:.0f}% of the bf16 VJP's node time is in nodes where "
          f"bf16 gains less than {LITTLE_GAIN}x; its convolutions alone take {conv_ms:.2f} ms, so even with every "
          f"other node and the time between nodes free the window would be "
          f"{summary['window_speedup_bound_convolutions_only']:.2f}x")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (shared machine); CPU heap: "
          f"{heap.reason}")
    if args.plot is not None:
        plot(rows, summary, f"One class VJP of the demo UNet, {' x '.join(map(str, roi))} window, kernels="
             f"{args.kernels}, {args.threads} thread(s)", args.plot)
    write_json(args.json, {"roi": list(roi), "kernels": args.kernels, "threads": args.threads,
                           "repeats": args.repeats, "classes": args.classes, "rows": rows, "summary": summary,
                           "runs": runs, "matmul_fp32_flop_s": mm32, "matmul_bf16_flop_s": mm16,
                           "load_average_before": load_before, "load_average_after": load_after,
                           "cpu_heap": heap.reason, "torch": torch.__version__, "machine": platform.processor()
                           or platform.machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
