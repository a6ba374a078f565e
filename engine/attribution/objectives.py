"""What is explained for class c (the *objective*): the scalar S_c and its seed ∂S_c/∂Ẑ per window.

``objective`` names the scalar; ``targets`` (elsewhere) names the classes c it is computed for,
so the word cannot be confused with Captum's ``target`` (an output index). All objectives use
M_c, the mask of class c in the clean, unperturbed prediction, held fixed across SmoothGrad
samples, IG steps and feature perturbations (so every pass explains the same structure).

- ``sum`` (default): S_c = Σ_{v∈M_c} Ẑ_c(v), Ẑ the stitched logits.
- ``mean``: S_c / |M_c|, so that large and small structures give maps of comparable scale.
- ``softmax``: S_c = Σ_{v∈M_c} softmax(Ẑ)_c(v) (the gradient flows through the softmax).
- ``probability_weighted`` (alias ``probability-weighted``): the reference code's weighted logit
  sum, S_c = Σ_{v∈M_c} ω_c(v) Ẑ_c(v) with ω_c(v) = sg[p_c(v)] / Σ_{u∈M_c} sg[p_c(u)], p = softmax(Ẑ)
  of the input being differentiated and sg a stop-gradient (the weights are constants). The
  reference normalises per window of its unblended sum; here the weights come from the stitched
  prediction and are normalised over the whole mask, so the seed is exact for the stitched output.
- ``legacy``: the reference code's window gradients of Σ_{v∈M_c∩w} Z_{w,c}(v), simply added
  without blending weights; it is *not* the gradient of the stitched prediction where windows
  overlap, and exists to compare with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from engine.attribution.sliding import SeedFn, WindowGeometry, stitched_forward

Objective = Literal["sum", "mean", "softmax", "probability_weighted", "legacy"]
OBJECTIVES: tuple[str, ...] = ("sum", "mean", "softmax", "probability_weighted", "legacy")
_ALIASES = {"probability-weighted": "probability_weighted"}
_RENAMED = {"probability": "softmax"}
#: Objectives that need the stitched softmax of every differentiated input.
_NEEDS_PROBS = ("softmax", "probability_weighted")


def resolve_objective(name: str) -> Objective:
    """The canonical objective name, or a ValueError that lists the choices."""
    k = _ALIASES.get(name, name)
    if k in _RENAMED:
        raise ValueError(f"objective {name!r} is now called {_RENAMED[k]!r} (the summed softmax); "
                         "'probability_weighted' is the reference code's weighted logit sum")
    if k not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return k  # type: ignore[return-value]


def objective_scores(
    logits: torch.Tensor, masks_from: torch.Tensor, classes: Sequence[int], objective: str = "sum"
) -> torch.Tensor:
    """(K,) values S_c of stitched ``logits`` (C, *S) over the masks M_c = {``masks_from`` == c} (float64).

    ``legacy`` has no single stitched value (it is a sum of window gradients) and is refused.
    """
    kind = resolve_objective(objective)
    if kind == "legacy":
        raise ValueError("the legacy objective is a gradient convention with no stitched value; "
                         "perturbation methods and metrics take 'sum', 'mean', 'softmax' or 'probability_weighted'")
    pred = masks_from.reshape(-1).long()
    n = logits.shape[0]
    probs = torch.softmax(logits.double(), 0) if kind in _NEEDS_PROBS else None
    values = probs if kind == "softmax" else logits.double()
    picked = values.reshape(n, -1).gather(0, pred[None])[0]
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
    if kind == "probability_weighted":
        assert probs is not None
        p = probs.reshape(n, -1).gather(0, pred[None])[0]
        num = torch.bincount(pred, weights=p * picked, minlength=n)
        den = torch.bincount(pred, weights=p, minlength=n)
        return (num / den.clamp_min(torch.finfo(torch.float64).tiny))[idx]
    sums = torch.bincount(pred, weights=picked, minlength=n)[idx]
    if kind == "mean":
        sums = sums / torch.bincount(pred, minlength=n)[idx].clamp_min(1).double()
    return sums


class ObjectiveSeeds:
    """Builds per-window backward seeds of an objective for a fixed prediction and window geometry.

    Call :meth:`seed_fn` once per (perturbed) input; for ``softmax`` and ``probability_weighted``
    it runs a stitched forward of that input first, since the seed depends on its softmax.
    """

    def __init__(
        self,
        objective: str,
        prediction: torch.Tensor,
        geometry: WindowGeometry,
        *,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.kind = resolve_objective(objective)
        self.geometry = geometry
        pred = prediction.long()
        self.prediction = pred
        self.padded_pred = F.pad(pred[None, None].float(), geometry.pad, value=-1.0)[0, 0].long() if any(geometry.pad) else pred
        self.voxels = torch.bincount(pred.flatten(), minlength=1)
        self._model = model
        if self.kind in _NEEDS_PROBS and model is None:
            raise ValueError(f"the {self.kind} objective needs the model for its stitched forward")

    def size(self, c: int) -> int:
        return int(self.voxels[c]) if c < self.voxels.numel() else 0

    def seed_fn(self, x: torch.Tensor | None = None) -> SeedFn:
        """Seed builder for input ``x`` (only needed by the softmax-based objectives)."""
        geometry = self.geometry
        pred = self.padded_pred
        kind = self.kind
        probs: torch.Tensor | None = None
        norm: torch.Tensor | None = None
        if kind in _NEEDS_PROBS:
            if x is None or self._model is None:
                raise ValueError(f"the {kind} objective needs the input of each pass")
            soft = torch.softmax(stitched_forward(self._model, x, geometry.window)[0], 0)
            if kind == "probability_weighted":
                # Σ_{u∈M_c} p_c(u) per class c, from the unpadded stitched prediction
                flat = self.prediction.reshape(-1)
                p = soft.reshape(soft.shape[0], -1).gather(0, flat[None])[0]
                norm = torch.bincount(flat, weights=p.double(), minlength=soft.shape[0])
            probs = F.pad(soft[None], geometry.pad)[0] if any(geometry.pad) else soft

        # Per window batch (the caller passes the same ``slices`` object for every class of a batch):
        # the window labels, the classes present in them and the blend w/Ω are computed once, not per class.
        cache: dict[str, object] = {"key": None}

        def window_state(slices: Sequence[tuple[slice, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if cache["key"] is not slices:
                labels = pred[slices[0]][None] if len(slices) == 1 else torch.stack([pred[s] for s in slices])
                counts = torch.bincount((labels + 1).flatten(), minlength=1)  # +1: padding is −1
                cache.update(key=slices, labels=labels, present=counts[1:] > 0, blend=None)
            return cache["labels"], cache["present"], cache  # type: ignore[return-value]

        # The scratch ``out`` last returned and the one channel it holds (None: unknown or all of them),
        # so that the next class's seed clears that channel, not the whole K-channel buffer.
        written: dict[str, object] = {"out": None, "channel": None}

        def seed(
            c: int, slices: Sequence[tuple[slice, ...]], logits: torch.Tensor, out: torch.Tensor | None = None,
            scale: float = 1.0,
        ) -> torch.Tensor | None:
            """Seed of class ``c`` for these windows, times ``scale``, or None when c has no voxel in them.

            ``out``: optional scratch tensor shaped like ``logits`` that is overwritten and returned,
            so that a caller running one VJP at a time allocates one seed per batch. Passed again,
            it must hold what this builder last returned in it (any content the first time).
            """
            labels, flags, state = window_state(slices)
            if c >= flags.numel() or not bool(flags[c]):
                return None
            masks = labels == c  # (B, *roi)
            if out is None:
                out = torch.zeros_like(logits)
            elif kind != "softmax":  # softmax seeds overwrite every channel
                if written["out"] is out and written["channel"] is not None:
                    out[:, written["channel"]].zero_()  # type: ignore[index]
                else:
                    out.zero_()
            written.update(out=out, channel=None if kind == "softmax" else c, values=None)
            if kind == "legacy":
                values = masks.to(logits.dtype).mul_(scale)  # x 1.0 is exact
            else:
                if state["blend"] is None:
                    state["blend"] = geometry.blend(slices).to(logits.dtype)
                weight = torch.where(masks, state["blend"], 0.0)  # type: ignore[arg-type]
                if scale != 1.0:
                    weight.mul_(scale)
                if kind == "softmax":  # ∂/∂Ẑ_k Σ_{M_c} p_c = M_c p_c (δ_kc − p_k): every channel
                    assert probs is not None
                    p = torch.stack([probs[(slice(None), *s)] for s in slices]).to(logits.dtype)  # (B, C, *roi)
                    pc = p[:, c]
                    grad = -pc[:, None] * p
                    grad[:, c] += pc
                    torch.mul(grad, weight[:, None], out=out)
                    return out
                if kind == "sum":
                    values = weight
                elif kind == "mean":
                    values = weight / max(self.size(c), 1)
                else:  # probability_weighted: ∂/∂Ẑ_c Σ ω_c Ẑ_c = ω_c on M_c (ω constant)
                    assert probs is not None and norm is not None
                    pc = torch.stack([probs[(c, *s)] for s in slices]).to(logits.dtype)  # (B, *roi)
                    values = weight * pc / float(norm[c]) if float(norm[c]) > 0 else torch.zeros_like(weight)
            out[:, c] = values
            written["values"] = values[:, None]
            return out

        def present(c: int, slices: Sequence[tuple[slice, ...]]) -> bool:
            """Whether class ``c`` has a voxel in these windows (its seed is not None)."""
            flags = window_state(slices)[1]
            return c < flags.numel() and bool(flags[c])

        def live_channels(c: int) -> tuple[int, ...] | None:
            """The channels a seed of class ``c`` can be nonzero in: c alone, but every class for softmax."""
            return None if kind == "softmax" else (c,)

        def live_values() -> torch.Tensor | None:
            """The last seed on its live channel, (B, 1, *roi), its own tensor: ``seed[:, [c]]`` without
            the strided gather out of the seed (None for softmax, whose seeds are dense)."""
            return written.get("values")  # type: ignore[return-value]

        seed.present = present  # type: ignore[attr-defined]
        seed.live_channels = live_channels  # type: ignore[attr-defined]
        seed.live_values = live_values  # type: ignore[attr-defined]
        return seed
