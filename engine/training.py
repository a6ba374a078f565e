"""Training the shipped demo model on phantoms (the command that reproduces its weights).

``python -m engine.training --out engine/assets/demo_unet.pt`` trains ``models.DEMO_ARCH`` on
normal phantoms of every site (no planted anomalies, so anomalies stay out of distribution),
with MONAI's DiceCE loss, and writes the state dict plus a JSON of held-out Dice per class.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def scale_hu(image: np.ndarray) -> np.ndarray:
    """The default preprocessing's intensity window: −1024…1024 HU clipped and scaled to [0, 1]."""
    from monai.transforms import ScaleIntensityRange

    return np.asarray(ScaleIntensityRange(a_min=-1024, a_max=1024, b_min=0.0, b_max=1.0, clip=True)(image))


def _batches(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from engine import phantoms

    images, labels = [], []
    for image, label in phantoms.iter_training_pairs(seed=seed, n=n, anomaly_fraction=0.0):
        images.append(scale_hu(image)[None])
        labels.append(label[None].astype(np.int64))
    return torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(labels))


def held_out_dice(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int) -> list[float]:
    """Mean Dice per class over held-out phantoms (MONAI's DiceMetric, background included)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    model.eval()
    with torch.no_grad():
        for i in range(images.shape[0]):
            pred = model(images[i : i + 1]).argmax(1, keepdim=True)
            metric(one_hot(pred, n_classes), one_hot(labels[i : i + 1], n_classes))
    return [float(v) for v in metric.aggregate().tolist()]


def train_demo(
    *, out: Path, steps: int = 600, batch: int = 4, n_train: int = 192, n_val: int = 24, lr: float = 3e-3,
    seed: int = 0, threads: int = 2, log_every: int = 50,
) -> dict[str, Any]:
    """Train the demo UNet and save it; returns the held-out Dice report."""
    from monai.losses import DiceCELoss

    from engine import models
    from engine.labels import THORAX_CLASSES

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    x_train, y_train = _batches(seed + 1, n_train)
    x_val, y_val = _batches(seed + 1000, n_val)
    model = models.demo_model(weights=None).module
    model.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        xb, yb = x_train[idx], y_train[idx]
        # Flip-free augmentation: intensity jitter only, so left and right stay meaningful.
        xb = xb * (1 + 0.05 * torch.randn(batch, 1, 1, 1, 1, generator=g)) + 0.02 * torch.randn(batch, 1, 1, 1, 1, generator=g)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    dice = held_out_dice(model, x_val, y_val, len(THORAX_CLASSES))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    report = {
        "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in models.DEMO_ARCH.items()},
        "steps": steps, "batch": batch, "n_train": n_train, "n_val": n_val, "lr": lr, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "held_out_dice": dict(zip(THORAX_CLASSES, [round(d, 4) for d in dice])),
        "mean_foreground_dice": round(float(np.mean(dice[1:])), 4),
        "command": f"python -m engine.training --out {out} --steps {steps} --seed {seed}",
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    from engine import models

    p = argparse.ArgumentParser(description="Train the demo UNet on phantoms.")
    p.add_argument("--out", type=Path, default=models.DEMO_WEIGHTS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    report = train_demo(out=args.out, steps=args.steps, batch=args.batch, seed=args.seed, threads=args.threads)
    print(json.dumps(report["held_out_dice"], indent=1))
    print("mean foreground Dice", report["mean_foreground_dice"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
