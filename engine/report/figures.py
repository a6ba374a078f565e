"""Report figures (matplotlib, Agg backend), after the Agg2Exp paper.

* :func:`slice_overlay` - Fig. 2: three orthogonal slices through a class, attribution as a
  diverging overlay, the predicted mask as a contour;
* :func:`importance_distributions` / :func:`distribution_figure` - Fig. 3: per target class, the
  cohort distribution of the attribution mass in each RoI (box + strip plots, coloured by anatomical
  group), from a frame or from box statistics the store computed;
* :func:`graph_figure` - Fig. 4: the global RoI graph (drawn by ``engine.analytics.graph``);
* :func:`anomaly_ranking` and :func:`patient_panels` - Fig. 5: patients ranked by anomaly score,
  and the most and least anomalous ones on orthogonal slices with their attribution overlays.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`to_png` / :func:`save_png` turn
it into PNG bytes or a file and close it.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # headless everywhere but in a notebook (keep its inline backend)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from engine.labels import GROUP_COLOURS, THORAX_CLASSES, colour_of, group_of  # noqa: E402

# matplotlib >= 3.10 names it ``orientation``; ``vert`` is deprecated there but all older versions have it
_HORIZONTAL: dict[str, Any] = (
    {"orientation": "horizontal"}
    if tuple(int(p) for p in matplotlib.__version__.split(".")[:2] if p.isdigit()) >= (3, 10)
    else {"vert": False}
)
AXIS_NAMES = ("sagittal", "coronal", "axial")  # slices at fixed x, y, z of a RAS volume
DPI = 90


# --------------------------------------------------------------------------- output


def to_png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """PNG bytes of a figure (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike[str], *, dpi: int = DPI) -> Path:
    """Write a figure as PNG (creating folders) and close it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(to_png(fig, dpi=dpi))
    return out


def message_figure(text: str, *, size: tuple[float, float] = (8, 1.2)) -> Figure:
    """A figure that only says something (used where a plot cannot be drawn)."""
    fig = plt.figure(figsize=size)
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return fig


# --------------------------------------------------------------------------- Fig. 2


def _np(x: Any) -> np.ndarray:
    if x is None:
        return None  # type: ignore[return-value]
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _volume3(x: Any, what: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what} must be (X, Y, Z) or (1, X, Y, Z), got shape {a.shape}")
    return a


def target_index(target: str | int, class_names: Sequence[str] | None = None) -> int:
    """The label value of a class name (or an index passed through)."""
    if isinstance(target, (int, np.integer)):
        return int(target)
    names = list(class_names or THORAX_CLASSES)
    if target not in names:
        raise ValueError(f"unknown target class {target!r}; classes are {names}")
    return names.index(target)


def focus_point(prediction: np.ndarray | None, label: int | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Per axis, the slice holding the most voxels of ``label`` (the volume centre if there are none)."""
    centre = tuple(int(s) // 2 for s in shape)
    if prediction is None or label is None:
        return centre  # type: ignore[return-value]
    mask = prediction == label
    if not mask.any():
        return centre  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        out.append(int(np.argmax(mask.sum(axis=other))))
    return tuple(out)  # type: ignore[return-value]


def _slice(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One 2D slice, transposed so that the first remaining RAS axis runs left-right."""
    return np.take(a, index, axis=axis).T


def robust_limit(attribution: np.ndarray | None, q: float = 99.5) -> float:
    """Symmetric colour limit for a diverging map: a high percentile of |attribution|."""
    if attribution is None:
        return 1.0
    vals = np.abs(attribution[np.isfinite(attribution)])
    if vals.size == 0:
        return 1.0
    lim = float(np.percentile(vals, q))
    return lim if lim > 0 else float(vals.max()) or 1.0


def draw_slices(
    axes: Sequence[Any],
    image: Any,
    attribution: Any = None,
    prediction: Any = None,
    label: int | None = None,
    *,
    point: Sequence[int] | None = None,
    vlim: float | None = None,
    alpha: float = 0.65,
    contour_colour: str = "#00ff66",
) -> Any:
    """Draw sagittal, coronal and axial slices on three axes; returns the overlay artist (or None)."""
    img = _volume3(image, "image").astype(np.float32)
    att = None if attribution is None else _volume3(attribution, "attribution").astype(np.float32)
    pred = None if prediction is None else _volume3(prediction, "prediction")
    pt = tuple(point) if point is not None else focus_point(pred, label, img.shape)
    lim = vlim if vlim is not None else robust_limit(att)
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
    mappable = None
    for axis, ax in enumerate(axes):
        ax.imshow(_slice(img, axis, pt[axis]), cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")
        if att is not None:
            a2 = _slice(att, axis, pt[axis])
            shown = np.ma.masked_where(np.abs(a2) < 0.12 * lim, a2)  # hide the faint noise floor
            mappable = ax.imshow(shown, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=alpha, origin="lower",
                                 interpolation="nearest")
        if pred is not None and label is not None:
            m2 = (_slice(pred, axis, pt[axis]) == label).astype(float)
            if m2.any() and not m2.all():
                ax.contour(m2, levels=[0.5], colors=contour_colour, linewidths=0.9, origin="lower")
        ax.set_title(f"{AXIS_NAMES[axis]} {'xyz'[axis]}={pt[axis]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return mappable


def slice_overlay(
    image: Any,
    attribution: Any,
    prediction: Any,
    target: str | int,
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    point: Sequence[int] | None = None,
) -> Figure:
    """Fig. 2: three orthogonal slices through the voxel where ``target``'s predicted mask is largest.

    ``image`` is (X, Y, Z) or (1, X, Y, Z) on the model grid, ``attribution`` the map of ``target``
    (same grid, or None for slices without overlay), ``prediction`` the label map (or None).
    The attribution is drawn with a diverging colour map centred at 0 (red positive, blue negative),
    limits at the 99.5th percentile of |attribution|; the predicted mask of the target is outlined.
    """
    label = target_index(target, class_names) if prediction is not None else None
    name = target if isinstance(target, str) else (list(class_names or THORAX_CLASSES)[int(target)])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), constrained_layout=True)
    mappable = draw_slices(axes, image, attribution, prediction, label, point=point)
    if mappable is not None:
        cb = fig.colorbar(mappable, ax=list(axes), shrink=0.8, pad=0.01)
        cb.set_label("attribution", fontsize=8)
    sub = "" if attribution is not None else " (no attribution overlay)"
    fig.suptitle(title or f"{name}{sub}", fontsize=10)
    return fig


# --------------------------------------------------------------------------- Fig. 3


#: Columns of the box statistics :func:`distribution_figure` draws (``Store.importance_box_stats`` and
#: :func:`box_stats` make them).
BOX_COLUMNS = ("target", "roi", "n", "q1", "med", "q3", "whislo", "whishi", "vmin", "vmax")


def box_stats(importances: pl.DataFrame) -> pl.DataFrame:
    """Box-plot statistics per (target, roi) of a long frame (``target, roi, value``), computed by
    matplotlib's ``cbook.boxplot_stats`` (null values left out): the columns :data:`BOX_COLUMNS`."""
    from matplotlib import cbook

    rows = []
    for (target, roi), part in importances.drop_nulls("value").group_by(["target", "roi"], maintain_order=True):
        values = part["value"].to_numpy()
        (s,) = cbook.boxplot_stats(values)
        rows.append((str(target), str(roi), values.size, *(float(s[k]) for k in ("q1", "med", "q3", "whislo", "whishi")),
                     float(values.min()), float(values.max())))
    schema = dict(zip(BOX_COLUMNS, (pl.String, pl.String, pl.Int64, *[pl.Float64] * 7)))
    return pl.DataFrame(rows, schema=schema, orient="row")


def importance_distributions(
    importances: pl.DataFrame,
    *,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    targets: Sequence[str] | None = None,
    exclude_background_target: bool = True,
    ncols: int = 4,
    max_points: int = 400,
    rois: str | Sequence[str] = "parts",
) -> Figure:
    """Fig. 3 from a long importances frame held in memory (a few patients' :class:`Explanation` rows, a
    small run): :func:`box_stats` of every value, dots of at most ``max_points`` patients (the same ones
    in every panel), drawn by :func:`distribution_figure`. For a stored run the report asks the store
    for both (``Store.importance_box_stats``, ``Store.importance_points``), so no cohort is loaded."""
    df = importances.filter((pl.col("sign") == sign) & (pl.col("stat") == stat))
    if method is not None:
        df = df.filter(pl.col("method") == method)
    ids = df["patient_id"].unique().sort() if "patient_id" in df.columns else None
    points = df
    if ids is not None and ids.len() > max_points:
        chosen = np.random.default_rng(0).choice(ids.to_numpy(), max_points, replace=False)
        points = df.filter(pl.col("patient_id").is_in(chosen.tolist()))
    what = f"sign={sign}, stat={stat}" + (f", method={method}" if method else "")
    return distribution_figure(box_stats(df), points, sign=sign, stat=stat, targets=targets, ncols=ncols,
                               exclude_background_target=exclude_background_target, rois=rois,
                               n_patients=None if ids is None else ids.len(), what=what)


def distribution_figure(
    stats: pl.DataFrame,
    points: pl.DataFrame,
    *,
    sign: str = "abs",
    stat: str = "mass",
    targets: Sequence[str] | None = None,
    exclude_background_target: bool = True,
    ncols: int = 4,
    rois: str | Sequence[str] = "parts",
    n_patients: int | None = None,
    what: str = "",
) -> Figure:
    """Fig. 3: per target class, each RoI's attribution mass over the cohort as a box (``stats``, columns
    :data:`BOX_COLUMNS`) with one dot per patient of ``points`` (``target, roi, value``) on it.

    One panel per target; RoIs of the RoI set ``rois`` (``"parts"``: joined RoIs such as ``lung``
    left out when their parts are there; see :mod:`engine.analytics.rois`) on the y-axis in class
    order, boxes coloured by the RoI's anatomical group. The boxes are of every patient whatever
    ``points`` holds, so a cohort of any size draws in the same time.
    """
    if stats.height == 0:
        return message_figure("no importances" + (f" with {what}" if what else ""))
    present = stats["target"].unique().to_list()
    order = [c for c in THORAX_CLASSES if c in present] + sorted(c for c in present if c not in THORAX_CLASSES)
    if targets is not None:
        order = [t for t in targets if t in present]
    if exclude_background_target:
        order = [t for t in order if t != "background"] or order
    from engine.analytics.rois import choose_rois

    rois = choose_rois(stats["roi"].unique().to_list(), rois)
    boxes = {(r["target"], r["roi"]): r for r in stats.filter(pl.col("roi").is_in(rois)).iter_rows(named=True)}
    dots: dict[tuple[str, str], np.ndarray] = {
        (str(k[0]), str(k[1])): part["value"].drop_nulls().to_numpy()
        for k, part in points.filter(pl.col("roi").is_in(rois)).group_by(["target", "roi"])
    }
    n = len(order)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    height = max(2.2, 0.17 * len(rois) + 0.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, height * nrows), squeeze=False, sharex=True)
    rng = np.random.default_rng(0)
    xmax = max((b["vmax"] for b in boxes.values() if b["vmax"] is not None), default=1.0)
    pos = np.arange(len(rois))
    for i, target in enumerate(order):
        ax = axes[i // ncols][i % ncols]
        shown = [j for j, r in enumerate(rois) if (target, r) in boxes]
        if shown:
            bp = ax.bxp([{**boxes[(target, rois[j])], "fliers": []} for j in shown], positions=pos[shown], widths=0.6,
                        **_HORIZONTAL, patch_artist=True, showfliers=False, manage_ticks=False,
                        medianprops={"color": "black", "linewidth": 0.8},
                        whiskerprops={"linewidth": 0.6}, capprops={"linewidth": 0.6})
            for patch, j in zip(bp["boxes"], shown):
                patch.set_facecolor(colour_of(rois[j]))
                patch.set_alpha(0.55)
                patch.set_linewidth(0.6)
            for j in shown:
                d = dots.get((target, rois[j]))
                if d is not None and d.size:
                    ax.scatter(d, pos[j] + rng.uniform(-0.18, 0.18, d.size), s=4, color=colour_of(rois[j]),
                               edgecolors="black", linewidths=0.2, zorder=3)
        ax.set_yticks(pos)
        ax.set_yticklabels(rois if i % ncols == 0 else [""] * len(rois), fontsize=6)
        for tick, r in zip(ax.get_yticklabels(), rois):
            if r == target:
                tick.set_fontweight("bold")
        ax.set_ylim(len(rois) - 0.5, -0.5)
        ax.set_xlim(0, xmax * 1.05 if xmax > 0 else 1)
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(axis="x", linewidth=0.3, alpha=0.5)
        ax.set_title(target, fontsize=8, color=colour_of(target), fontweight="bold")
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    groups = sorted({group_of(r) for r in rois})
    handles = [Patch(facecolor=GROUP_COLOURS.get(g, GROUP_COLOURS["other"]), alpha=0.7, label=g) for g in groups]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    dotted = points["patient_id"].n_unique() if "patient_id" in points.columns else None
    sample = (f"; dots: {dotted} of {n_patients} patients" if n_patients is not None and dotted is not None
              and dotted < n_patients else "")
    fig.supxlabel(f"share of the explanation's |attribution| in the RoI ({stat}, {sign}){sample}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


# --------------------------------------------------------------------------- Fig. 4


def graph_figure(edges: pl.DataFrame, *, title: str | None = None, seed: int = 0) -> bytes:
    """Fig. 4: PNG bytes of the global RoI graph, drawn by :func:`engine.analytics.graph.plot_graph`."""
    from engine.analytics.graph import plot_graph

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_graph(edges, Path(tmp) / "graph.png", title=title, seed=seed)
        return path.read_bytes()


# --------------------------------------------------------------------------- Fig. 5


def anomaly_ranking(
    scores: pl.DataFrame, *, top_k: int = 3, target: str = "__mean__", labels: Mapping[str, str] | None = None,
) -> Figure:
    """Patients ranked by anomaly score (``target`` rows; the mean over classes by default).

    The ``top_k`` most anomalous bars are red, the ``top_k`` least anomalous blue; ``labels``
    optionally adds a note to a patient's tick label (e.g. a known anomaly). Above :data:`MAX_BARS`
    patients the ranking is a curve of score against rank instead, with the same marks.
    """
    s = scores.filter(pl.col("target") == target).sort("score", descending=True)
    if s.height == 0:
        return message_figure("no anomaly scores for this run")
    ids = s["patient_id"].cast(pl.String).to_list()
    vals = s["score"].to_numpy()
    n = len(ids)
    if n > MAX_BARS:
        return _ranking_curve(ids, vals, top_k=top_k, target=target, labels=labels)
    colours = ["#b0b0b0"] * n
    for i in range(min(top_k, n)):
        colours[i] = "#d62728"
    for i in range(max(n - top_k, min(top_k, n)), n):
        colours[i] = "#1f77b4"
    width = min(16.0, max(6.0, 0.28 * n + 2))
    fig, ax = plt.subplots(figsize=(width, 3.2))
    ax.bar(np.arange(n), vals, color=colours, edgecolor="black", linewidth=0.3)
    tick = [f"{p} {labels[p]}" if labels and labels.get(p) else p for p in ids]
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(tick, rotation=70, ha="right", fontsize=6 if n > 30 else 7)
    lo = float(np.nanmin(vals))
    hi = float(np.nanmax(vals))
    pad = 0.1 * (hi - lo) if hi > lo else 0.05
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("anomaly score\n(higher = more anomalous)", fontsize=8)
    ax.set_title(f"patients ranked by anomaly score ({'mean over classes' if target == '__mean__' else target})",
                 fontsize=9)
    ax.legend(handles=[Patch(color="#d62728", label=f"top {top_k}"), Patch(color="#1f77b4", label=f"bottom {top_k}")],
              fontsize=7, loc="upper right")
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    return fig


#: Above this many patients :func:`anomaly_ranking` draws the ranked scores as a curve, not a bar each.
MAX_BARS = 120


def _ranking_curve(ids: list[str], vals: np.ndarray, *, top_k: int, target: str,
                   labels: Mapping[str, str] | None) -> Figure:
    """A large cohort's ranking: score against rank (log scale from 1,000 patients), the ``top_k`` most
    and least anomalous marked (the most named), and patients with a ``labels`` note as a rug."""
    n = len(ids)
    x = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.plot(x, vals, color="#606060", linewidth=0.9, zorder=2)
    k = min(top_k, n)
    b = min(top_k, n - k)
    ax.scatter(x[:k], vals[:k], s=16, color="#d62728", edgecolors="black", linewidths=0.3, zorder=4,
               label=f"top {top_k}")
    if b:
        ax.scatter(x[n - b:], vals[n - b:], s=16, color="#1f77b4", edgecolors="black", linewidths=0.3, zorder=4,
                   label=f"bottom {top_k}")
    for i in range(k):
        note = f" {labels[ids[i]]}" if labels and labels.get(ids[i]) else ""
        ax.annotate(ids[i] + note, (x[i], vals[i]), xytext=(6, -4 - 9 * i), textcoords="offset points", fontsize=6)
    marked = np.array([i for i, pid in enumerate(ids) if labels and labels.get(pid)], dtype=int)
    if marked.size:
        lo = float(np.nanmin(vals))
        ax.scatter(x[marked], np.full(marked.size, lo), marker="|", s=60, color="#ff7f0e", zorder=3,
                   label=f"{marked.size} patients with a note")
    if n >= 1000:
        ax.set_xscale("log")
    ax.set_xlim(0.8, n * 1.05)
    ax.set_xlabel(f"rank among {n:,} patients (1 = most anomalous)", fontsize=8)
    ax.set_ylabel("anomaly score\n(higher = more anomalous)", fontsize=8)
    ax.set_title(f"patients ranked by anomaly score ({'mean over classes' if target == '__mean__' else target})",
                 fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    return fig


@dataclass
class PatientPanel:
    """One row of the Fig. 5 panel: a patient's volume, maybe a map, and what to write above it."""

    patient_id: str
    title: str
    image: Any = None  # (X, Y, Z) or (1, X, Y, Z); None when the image could not be read
    attribution: Any = None
    prediction: Any = None
    label: int | None = None
    note: str | None = None


def patient_panels(panels: Sequence[PatientPanel], *, title: str | None = None) -> Figure:
    """Fig. 5: one row per patient, three orthogonal slices with the attribution overlay (if any)."""
    if not panels:
        return message_figure("no patients to show")
    fig = plt.figure(figsize=(9.5, 3.1 * len(panels)), layout="constrained")
    subfigs = fig.subfigures(len(panels), 1, squeeze=False)[:, 0]
    for sub, panel in zip(subfigs, panels):
        row = sub.subplots(1, 3)
        if panel.image is None:
            for ax in row:
                ax.axis("off")
            row[1].text(0.5, 0.5, panel.note or "image unavailable", ha="center", va="center", fontsize=8,
                        wrap=True, transform=row[1].transAxes)
        else:
            mappable = draw_slices(row, panel.image, panel.attribution, panel.prediction, panel.label)
            if mappable is not None:
                sub.colorbar(mappable, ax=list(row), shrink=0.75, pad=0.01).ax.tick_params(labelsize=6)
        head = panel.title + (f"\n{panel.note}" if panel.note and panel.image is not None else "")
        sub.suptitle(head, fontsize=8.5, fontweight="bold", x=0.02, ha="left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = [
    "AXIS_NAMES", "BOX_COLUMNS", "MAX_BARS", "PatientPanel", "anomaly_ranking", "box_stats", "distribution_figure", "draw_slices",
    "focus_point", "graph_figure", "importance_distributions", "message_figure", "patient_panels", "robust_limit",
    "save_png", "slice_overlay", "target_index", "to_png",
]
