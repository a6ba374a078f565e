"""Segmentation quality per class: Dice and IoU from one confusion count (a bincount)."""

from __future__ import annotations

import torch


def dice_iou(prediction: torch.Tensor, label: torch.Tensor, n_classes: int) -> tuple[list[float | None], list[float | None]]:
    """Per-class Dice and IoU of two label maps; ``None`` for a class absent from both.

    Labels outside ``[0, n_classes)`` in the ground truth (e.g. structures the model does not
    segment) count as background.
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    p = prediction.reshape(-1).long()
    g = label.reshape(-1).long().to(p.device)
    g = torch.where((g >= 0) & (g < n_classes), g, torch.zeros_like(g))
    confusion = torch.bincount(p * n_classes + g, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    inter = confusion.diagonal().double()
    pred_n = confusion.sum(1).double()
    true_n = confusion.sum(0).double()
    dice: list[float | None] = []
    iou: list[float | None] = []
    for c in range(n_classes):
        denom = float(pred_n[c] + true_n[c])
        if denom == 0:
            dice.append(None)
            iou.append(None)
        else:
            dice.append(float(2 * inter[c] / denom))
            iou.append(float(inter[c] / (denom - inter[c])))
    return dice, iou
