"""What is explained for class c: the scalar S_c and its seed ∂S_c/∂Ẑ per window.

All targets use M_c, the mask of class c in the clean, unperturbed prediction, held fixed across
SmoothGrad samples and IG steps (so every sample explains the same structure).

- ``sum`` (default): S_c = Σ_{v∈M_c} Ẑ_c(v), Ẑ the stitched logits.
- ``mean``: S_c / |M_c|, so that large and small structures give maps of comparable scale.
- ``probability`` (alias ``probability-weighted``): S_c = Σ_{v∈M_c} softmax(Ẑ)_c(v).
- ``legacy``: the reference code's intent, window gradients of Σ_{v∈M_c∩w} Z_{w,c}(v) simply
  added without blending weights; it is *not* the gradient of the stitched prediction where
  windows overlap, and exists to compare with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from engine.attribution.sliding import SeedFn, WindowGeometry, stitched_forward

TargetKind = Literal["sum", "mean", "probability", "legacy"]
TARGET_KINDS: tuple[str, ...] = ("sum", "mean", "probability", "legacy")
_ALIASES = {"probability-weighted": "probability", "probability_weighted": "probability"}


def resolve_target_kind(kind: str) -> TargetKind:
    k = _ALIASES.get(kind, kind)
    if k not in TARGET_KINDS:
        raise ValueError(f"unknown target {kind!r}; choose one of {', '.join(TARGET_KINDS)} or 'probability-weighted'")
    return k  # type: ignore[return-value]


class TargetSeeds:
    """Builds per-window backward seeds for a fixed prediction and window geometry.

    Call :meth:`seed_fn` once per (perturbed) input; for ``probability`` it runs a stitched
    forward of that input first, since the seed depends on its softmax.
    """

    def __init__(
        self,
        kind: str,
        prediction: torch.Tensor,
        geometry: WindowGeometry,
        *,
        model: torch.nn.Module | None = None,
        blend: str = "constant",
        overlap: float | Sequence[float] = 0.25,
        window_batch: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.kind = resolve_target_kind(kind)
        self.geometry = geometry
        pred = prediction.long()
        self.padded_pred = F.pad(pred[None, None].float(), geometry.pad, value=-1.0)[0, 0].long() if any(geometry.pad) else pred
        self.voxels = torch.bincount(pred.flatten(), minlength=1)
        self._model = model
        self._blend = blend
        self._overlap = overlap
        self._window_batch = window_batch
        self._autocast = autocast_dtype
        if self.kind == "probability" and model is None:
            raise ValueError("the probability target needs the model for its stitched forward")

    def size(self, c: int) -> int:
        return int(self.voxels[c]) if c < self.voxels.numel() else 0

    def seed_fn(self, x: torch.Tensor | None = None) -> SeedFn:
        """Seed builder for input ``x`` (only needed by the probability target)."""
        geometry = self.geometry
        pred = self.padded_pred
        kind = self.kind
        probs: torch.Tensor | None = None
        if kind == "probability":
            if x is None or self._model is None:
                raise ValueError("the probability target needs the input of each pass")
            logits = stitched_forward(
                self._model, x, geometry, blend=self._blend, overlap=self._overlap,  # type: ignore[arg-type]
                window_batch=self._window_batch, autocast_dtype=self._autocast,
            )[0]
            probs = F.pad(torch.softmax(logits, 0)[None], geometry.pad)[0] if any(geometry.pad) else torch.softmax(logits, 0)

        # Per window batch (the caller passes the same ``slices`` object for every class of a batch):
        # the window labels, the classes present in them and the blend w/Ω are computed once, not per class.
        cache: dict[str, object] = {"key": None}

        def window_state(slices: Sequence[tuple[slice, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if cache["key"] is not slices:
                labels = pred[slices[0]][None] if len(slices) == 1 else torch.stack([pred[s] for s in slices])
                counts = torch.bincount((labels + 1).flatten(), minlength=1)  # +1: padding is −1
                cache.update(key=slices, labels=labels, present=counts[1:] > 0, blend=None)
            return cache["labels"], cache["present"], cache  # type: ignore[return-value]

        def seed(
            c: int, slices: Sequence[tuple[slice, ...]], logits: torch.Tensor, out: torch.Tensor | None = None
        ) -> torch.Tensor | None:
            """Seed of class ``c`` for these windows, or None when c has no voxel in them.

            ``out``: optional scratch tensor shaped like ``logits`` (any content) that is overwritten
            and returned, so that a caller running one VJP at a time allocates one seed per batch.
            """
            labels, flags, state = window_state(slices)
            if c >= flags.numel() or not bool(flags[c]):
                return None
            masks = labels == c  # (B, *roi)
            if out is None:
                out = torch.zeros_like(logits)
            elif kind != "probability":
                out.zero_()
            if kind == "legacy":
                out[:, c] = masks.to(logits.dtype)
                return out
            if state["blend"] is None:
                state["blend"] = geometry.blend(slices).to(logits.dtype)
            weight = torch.where(masks, state["blend"], 0.0)  # type: ignore[arg-type]
            if kind == "sum":
                out[:, c] = weight
            elif kind == "mean":
                out[:, c] = weight / max(self.size(c), 1)
            else:  # probability: ∂/∂Ẑ_k Σ_{M_c} p_c = M_c p_c (δ_kc − p_k)
                assert probs is not None
                p = torch.stack([probs[(slice(None), *s)] for s in slices]).to(logits.dtype)  # (B, C, *roi)
                pc = p[:, c]
                grad = -pc[:, None] * p
                grad[:, c] += pc
                torch.mul(grad, weight[:, None], out=out)
            return out

        def present(c: int, slices: Sequence[tuple[slice, ...]]) -> bool:
            """Whether class ``c`` has a voxel in these windows (its seed is not None)."""
            flags = window_state(slices)[1]
            return c < flags.numel() and bool(flags[c])

        seed.present = present  # type: ignore[attr-defined]
        return seed
