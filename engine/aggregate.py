"""Local RoI importances (Agg²Exp): ``mass`` and ``mean`` of an attribution inside each RoI.

For target class c, RoI r and φ ∈ {abs: |a|, pos: max(a, 0), neg: max(−a, 0)}:

    mass(c, r) = Σ_{v∈r} φ(a_c(v)) / Σ_v φ(a_c(v))        (0 when the map has no mass of that sign)
    mean(c, r) = Σ_{v∈r} φ(a_c(v)) / |r|                   (null when the RoI has no voxels)

An empty RoI (a structure the model did not predict in this patient) keeps its row: its mass is a
well-defined 0, only its mean is undefined. Dropping the row instead would make every consumer
guess, and each would guess differently (forests filling 0, the graph averaging over the patients
that have the RoI, the audit leaving those patients out).

Each class's map takes two scatter passes on the device, one per sign (a float64 ``bincount``
of max(a, 0) and of max(−a, 0) over the RoI labels, outside voxels in a bin of their own), never a
loop over voxels or a pass per (class, RoI) pair; |a| = max(a, 0) + max(−a, 0), so the abs sums and
every total come from those bins. Joined RoIs (e.g. ``lung`` = five lobes) are sums of their parts'
sums and counts, so they cost nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl
import torch

SIGN_NAMES: tuple[str, ...] = ("abs", "pos", "neg")
STAT_NAMES: tuple[str, ...] = ("mass", "mean")

IMPORTANCE_COLUMNS: dict[str, pl.DataType] = {
    "target": pl.String(),
    "roi": pl.String(),
    "stat": pl.String(),
    "sign": pl.String(),
    "value": pl.Float64(),
}


@dataclass(frozen=True)
class RoISet:
    """Regions of interest as one label map: voxel value i in [0, R) belongs to ``names[i]``; −1 to none.

    ``joined`` names unions of RoIs (e.g. ``{"lung": ("lung_upper_lobe_left", ...)}``); a joined RoI
    may overlap its parts, so masses over a set with joined RoIs need not sum to 1.
    """

    labels: torch.Tensor
    names: tuple[str, ...]
    joined: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"RoI names must be unique, got {self.names}")
        for name, parts in self.joined.items():
            unknown = [p for p in parts if p not in self.names]
            if unknown:
                raise ValueError(f"joined RoI {name!r} names unknown RoIs {unknown}; known: {list(self.names)}")
            if name in self.names:
                raise ValueError(f"joined RoI {name!r} has the same name as a RoI")


@dataclass(frozen=True)
class RoIStats:
    """Per-class, per-sign sums inside each RoI, whole-map totals, and RoI sizes."""

    sums: torch.Tensor  # (K, 3, R) float64
    totals: torch.Tensor  # (K, 3) float64
    counts: torch.Tensor  # (R,) int64

    @property
    def mass(self) -> torch.Tensor:
        """(K, 3, R): share of each sign's attribution inside each RoI (0 where the total is 0)."""
        tot = self.totals[..., None]
        return torch.where(tot > 0, self.sums / tot.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(self.sums))

    @property
    def mean(self) -> torch.Tensor:
        """(K, 3, R): mean attribution per voxel of each RoI (NaN for an empty RoI)."""
        return self.sums / self.counts.to(self.sums.dtype)


def roi_statistics(maps: torch.Tensor, roi_labels: torch.Tensor, n_rois: int) -> RoIStats:
    """Sums of φ(maps) per (class, sign, RoI), whole-map totals and RoI voxel counts.

    ``maps`` is (K, *S) (attributions already summed over input channels); ``roi_labels`` is (*S)
    with values in [0, n_rois) or −1 for voxels outside every RoI.

    Per class, two float64 ``bincount`` passes over the labels shifted by one (bin 0 collects the
    voxels outside every RoI, so nothing is gathered first): one of max(a, 0), one of max(−a, 0).
    The abs sums are their sum (each voxel adds to one of them), and the totals are the sums of
    all bins. A NaN in a map makes all three signs of its RoI and the totals NaN, as it should.
    """
    if maps.shape[1:] != roi_labels.shape:
        raise ValueError(f"maps {tuple(maps.shape[1:])} and RoI labels {tuple(roi_labels.shape)} differ in shape")
    k = maps.shape[0]
    bins = roi_labels.reshape(-1).long() + 1  # 0: outside every RoI; r + 1: RoI r
    if bins.numel():
        lo, hi = torch.aminmax(bins)
        if int(lo) < 0 or int(hi) > n_rois:
            raise ValueError(f"RoI labels must lie in [-1, {n_rois}) for {n_rois} RoI names, got values in "
                             f"[{int(lo) - 1}, {int(hi) - 1}]; give one name per label")
    n = n_rois + 1
    sums = torch.empty((k, 3, n_rois), dtype=torch.float64, device=maps.device)
    totals = torch.empty((k, 3), dtype=torch.float64, device=maps.device)
    flat = maps.reshape(k, -1)
    for c in range(k):
        a = flat[c].double()
        pos = torch.bincount(bins, weights=a.clamp_min(0), minlength=n)
        neg = torch.bincount(bins, weights=a.neg().clamp_min_(0), minlength=n)  # a may be the caller's
        signs = torch.stack([pos + neg, pos, neg])  # (3 signs, 1 + R bins)
        totals[c] = signs.sum(dim=1)
        sums[c] = signs[:, 1:]
    counts = torch.bincount(bins, minlength=n)[1:]
    return RoIStats(sums=sums, totals=totals, counts=counts)


def join_stats(stats: RoIStats, names: Sequence[str], joined: Mapping[str, Sequence[str]]) -> tuple[RoIStats, tuple[str, ...]]:
    """Append joined RoIs as sums of their parts."""
    if not joined:
        return stats, tuple(names)
    index = {n: i for i, n in enumerate(names)}
    extra_sums, extra_counts = [], []
    for parts in joined.values():
        ids = torch.tensor([index[p] for p in parts], device=stats.sums.device)
        extra_sums.append(stats.sums[..., ids].sum(-1))
        extra_counts.append(stats.counts[ids].sum())
    sums = torch.cat([stats.sums, torch.stack(extra_sums, -1)], -1)
    counts = torch.cat([stats.counts, torch.stack(extra_counts)])
    return RoIStats(sums=sums, totals=stats.totals, counts=counts), (*names, *joined)


def importance_frame(
    stats: RoIStats,
    target_names: Sequence[str],
    roi_names: Sequence[str],
) -> pl.DataFrame:
    """The long format (target, roi, stat, sign, value) for every class, RoI, stat and sign.

    A RoI with no voxels has mass 0 and a null mean.
    """
    k, _, r = stats.sums.shape
    if len(target_names) != k or len(roi_names) != r:
        raise ValueError("target/RoI names do not match the statistics' shape")
    mass = stats.mass.cpu()
    mean = stats.mean.cpu()
    values = torch.stack([mass, mean], dim=1)  # (K, 2 stats, 3 signs, R)
    targets = [t for t in target_names for _ in range(2 * 3 * r)]
    stats_col = [s for _ in range(k) for s in STAT_NAMES for _ in range(3 * r)]
    signs_col = [g for _ in range(k * 2) for g in SIGN_NAMES for _ in range(r)]
    rois = list(roi_names) * (k * 2 * 3)
    return pl.DataFrame(
        {"target": targets, "roi": rois, "stat": stats_col, "sign": signs_col, "value": values.reshape(-1).tolist()},
        schema=IMPORTANCE_COLUMNS,
    ).with_columns(pl.col("value").fill_nan(None))


def aggregate(
    maps: torch.Tensor,
    rois: RoISet,
    target_names: Sequence[str],
) -> pl.DataFrame:
    """RoI importances of per-class maps (K, *S) in the long format."""
    stats = roi_statistics(maps, rois.labels.to(maps.device), len(rois.names))
    stats, names = join_stats(stats, rois.names, rois.joined)
    return importance_frame(stats, target_names, names)
