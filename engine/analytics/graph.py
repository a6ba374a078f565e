"""Global RoI importance graph (Agg2Exp, Fig. "global explanation graph").

Nodes are classes; a directed edge ``roi -> target`` says that, averaged over the cohort, the
explanation of ``target`` puts much of its mass inside ``roi``. Edge weight = cohort mean of the
mass importance (sign ``abs`` by default). Which edges to keep:

* ``topk``: the ``k`` heaviest RoIs of each target;
* ``cumulative``: per target, its RoIs sorted by weight (descending) are kept while the running
  sum of the weights stays ``<= threshold`` (default 0.35, as the reference R code:
  ``arrange(desc(weight)) %>% mutate(cumweight = cumsum(weight)) %>% filter(cumweight <= 0.35)``);
  weights are used as they are, not renormalised over the remaining RoIs;
* ``quantile``: edges whose weight is above the global ``q`` quantile of all candidate weights
  (the reference's ``weight <= quantile(weight, 0.75)`` deletion).

Only the RoIs of one RoI set are candidates (``rois="parts"`` by default, see
:mod:`engine.analytics.rois`): a joined RoI such as ``lung`` beside its lobes would take their place
in the cumulative rule. A mass is averaged over every patient with the target, an empty RoI
counting 0.

Background (as target and as RoI) is excluded by default, like the reference, and self-edges
(``c -> c``) are kept by default; both exclusions apply before selection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
import polars as pl

from engine.analytics.matrix import SelectionError, choose_method, select_importances
from engine.analytics.rois import RoIChoice, RoISetError, choose_rois, describe
from engine.errors import UserError
from engine.labels import colour_of, group_of
from engine.vocabulary import safe_filename

Rule = Literal["topk", "cumulative", "quantile"]
RULES: tuple[str, ...] = ("topk", "cumulative", "quantile")
BACKGROUND = "background"


class GraphError(UserError, ValueError):
    """A graph that cannot be built as asked (unknown rule, no importances, bad option)."""


def weights_from_sums(
    sums: pl.DataFrame,
    *,
    stat: str = "mass",
    rois: RoIChoice = "parts",
    joined: Mapping[str, Sequence[str]] | None = None,
) -> pl.DataFrame:
    """Cohort weights ``target, roi, weight, n_patients`` from per (target, roi) sums.

    ``sums`` has ``target, roi, total, n_values, n_patients`` (``Store.importance_sums``). A mass
    is averaged over every patient with the target (a patient without a row for a RoI adds 0: an
    empty RoI has no mass); a mean over the patients where it is defined. Only the RoIs of the RoI
    set ``rois`` are kept, so a joined RoI and its parts never compete for the same edges.
    """
    if sums.height == 0:
        return pl.DataFrame(schema={"target": pl.String, "roi": pl.String, "weight": pl.Float64,
                                    "n_patients": pl.Int64})
    try:
        keep = choose_rois(sums["roi"].unique().to_list(), rois, joined=joined)
    except RoISetError as exc:
        raise GraphError(str(exc)) from None
    denominator = pl.col("n_patients") if stat == "mass" else pl.col("n_values")
    return (
        sums.filter(pl.col("roi").is_in(keep))
        .select("target", "roi", (pl.col("total") / denominator).alias("weight"),
                denominator.cast(pl.Int64).alias("n_patients"))
        .sort("target", "roi")
    )


def importance_sums(importances: pl.DataFrame) -> pl.DataFrame:
    """``target, roi, total, n_values, n_patients`` of already selected long rows (as the store's reader)."""
    per_target = importances.group_by("target").agg(pl.col("patient_id").n_unique().alias("n_patients"))
    return (
        importances.group_by("target", "roi")
        .agg(pl.col("value").sum().alias("total"), pl.col("value").count().alias("n_values"))
        .join(per_target, on="target")
    )


def global_matrix(
    importances: pl.DataFrame,
    *,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice = "parts",
    joined: Mapping[str, Sequence[str]] | None = None,
) -> pl.DataFrame:
    """Cohort mean per (target, roi) of the RoI set ``rois``: ``target, roi, weight, n_patients``."""
    if importances.height == 0:
        raise GraphError(f"no importances with sign={sign!r}, stat={stat!r}" + (f", method={method!r}" if method else ""))
    try:
        df, _ = select_importances(importances, method=method, sign=sign, stat=stat)
    except SelectionError as exc:
        raise GraphError(str(exc)) from None
    return weights_from_sums(importance_sums(df), stat=stat, rois=rois, joined=joined)


def select_edges(
    matrix: pl.DataFrame,
    *,
    rule: Rule = "cumulative",
    k: int = 5,
    threshold: float = 0.35,
    quantile: float = 0.75,
    exclude_background: bool = True,
    self_edges: bool = True,
) -> pl.DataFrame:
    """Kept edges ``source (roi), target, weight, rank, cumweight`` from a cohort matrix.

    ``rank`` is the RoI's position among the target's candidates (1 = heaviest) and
    ``cumweight`` the running sum used by the cumulative rule.
    """
    if rule not in RULES:
        raise GraphError(f"unknown edge rule {rule!r}; choose one of {', '.join(RULES)}")
    m = matrix
    if exclude_background:
        m = m.filter((pl.col("target") != BACKGROUND) & (pl.col("roi") != BACKGROUND))
    if not self_edges:
        m = m.filter(pl.col("target") != pl.col("roi"))
    m = m.filter(pl.col("weight").is_not_null())
    ranked = m.sort(["target", "weight", "roi"], descending=[False, True, False]).with_columns(
        pl.col("weight").cum_count().over("target").alias("rank").cast(pl.Int64),
        pl.col("weight").cum_sum().over("target").alias("cumweight"),
    )
    if rule == "topk":
        if k < 1:
            raise GraphError(f"k must be at least 1 (got {k})")
        kept = ranked.filter(pl.col("rank") <= k)
    elif rule == "cumulative":
        if threshold <= 0:
            raise GraphError(f"the cumulative threshold must be positive (got {threshold})")
        kept = ranked.filter(pl.col("cumweight") <= threshold)
    else:
        if not 0 <= quantile < 1:
            raise GraphError(f"the quantile must lie in [0, 1) (got {quantile})")
        cut = float(np.quantile(ranked["weight"].to_numpy(), quantile)) if ranked.height else 0.0
        kept = ranked.filter(pl.col("weight") > cut)
    return kept.select(pl.col("roi").alias("source"), "target", "weight", "rank", "cumweight").sort(
        "target", "rank"
    )


def subgroups(patients: pl.DataFrame, column: str) -> pl.DataFrame:
    """``patient_id, group`` for a metadata column (numbers split at the median, as the audit)."""
    from engine.analytics.audit import group_labels

    return group_labels(patients, column)


def importance_graphs(
    importances: pl.DataFrame,
    *,
    patients: pl.DataFrame | None = None,
    by: str | None = None,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice = "parts",
    joined: Mapping[str, Sequence[str]] | None = None,
    **rule_options: Any,
) -> dict[str, pl.DataFrame]:
    """Edges of the whole cohort (key ``"all"``), or of each subgroup of metadata column ``by``."""
    matrix_options = {"method": method, "sign": sign, "stat": stat, "rois": rois, "joined": joined}
    if by is None:
        return {"all": select_edges(global_matrix(importances, **matrix_options), **rule_options)}
    if patients is None:
        raise GraphError("a subgroup graph needs the patients' metadata")
    labels = subgroups(patients, by)
    imp = importances.with_columns(pl.col("patient_id").cast(pl.String))
    out: dict[str, pl.DataFrame] = {}
    for group in sorted(labels["group"].unique().to_list()):
        ids = labels.filter(pl.col("group") == group)["patient_id"]
        part = imp.filter(pl.col("patient_id").is_in(ids.implode()))
        if part.height:
            out[group] = select_edges(global_matrix(part, **matrix_options), **rule_options)
    return out


def graph_run(
    source: Any,
    *,
    run_id: str,
    by: str | None = None,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice = "parts",
    **rule_options: Any,
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Edges of a stored run's done patients from SQL aggregates, and the parameters to record.

    ``source`` is a Store (``importance_methods``, ``importance_sums``, ``done_metadata``); the
    whole cohort, or each subgroup of metadata column ``by``, is one aggregate query.
    """
    from engine.analytics.anomaly import run_context

    method = choose_method(source.importance_methods(run_id), method, error=GraphError, what="build a graph from")
    _, joined = run_context(source, run_id)
    groups: dict[str, list[str] | None] = {"all": None}
    if by is not None:
        labels = subgroups(source.done_metadata(run_id), by)
        groups = {g: labels.filter(pl.col("group") == g)["patient_id"].to_list()
                  for g in sorted(labels["group"].unique().to_list())}
    out: dict[str, pl.DataFrame] = {}
    for group, ids in groups.items():
        sums = source.importance_sums(run_id, method=method, sign=sign, stat=stat, patient_ids=ids)
        if sums.height == 0:
            if by is None:
                raise GraphError(f"no importances with method={method!r}, sign={sign!r}, stat={stat!r}")
            continue
        out[group] = select_edges(weights_from_sums(sums, stat=stat, rois=rois, joined=joined), **rule_options)
    params = {**rule_options, "run_id": run_id, "by": by, "method": method, "sign": sign, "stat": stat,
              "rois": describe(rois)}
    return out, params


def to_networkx(edges: pl.DataFrame, *, name: str = "agg2exp") -> nx.DiGraph:
    """A directed graph ``roi -> target`` with weight, rank and cumweight on each edge."""
    g = nx.DiGraph(name=name)
    for node in sorted(set(edges["source"].to_list()) | set(edges["target"].to_list())):
        g.add_node(node, group=group_of(node), colour=colour_of(node))
    for row in edges.iter_rows(named=True):
        g.add_edge(row["source"], row["target"], weight=float(row["weight"]), rank=int(row["rank"]),
                   cumweight=float(row["cumweight"]))
    return g


def graph_json(edges: pl.DataFrame, *, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain JSON description: nodes (with group and colour), edges and the selection params."""
    g = to_networkx(edges)
    return {
        "params": params or {},
        "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)],
        "edges": [{"source": u, "target": v, **d} for u, v, d in g.edges(data=True)],
    }


def plot_graph(edges: pl.DataFrame, path: str | os.PathLike[str], *, title: str | None = None, seed: int = 0) -> Path:
    """Draw the graph (nodes coloured by anatomical group, width by weight) to PNG or SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = to_networkx(edges)
    fig, ax = plt.subplots(figsize=(9, 8))
    if g.number_of_nodes():
        pos = nx.spring_layout(g, seed=seed, weight="weight")
        weights = np.array([d["weight"] for _, _, d in g.edges(data=True)]) if g.number_of_edges() else np.zeros(0)
        eps = 0.02
        widths = 2 * (weights + eps) / (weights.max() + eps) if weights.size else []
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=[d["colour"] for _, d in g.nodes(data=True)],
                               node_size=500, edgecolors="black")
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=7)
        nx.draw_networkx_edges(g, pos, ax=ax, width=list(widths), arrowsize=10,
                               connectionstyle="arc3,rad=0.1", node_size=500)
    ax.set_title(title or "Global RoI importance graph")
    ax.axis("off")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return out


def export_graph(
    edges: pl.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    name: str = "graph",
    params: dict[str, Any] | None = None,
    figure_format: str = "png",
    title: str | None = None,
) -> list[Path]:
    """Write ``{name}.json``, ``{name}.graphml`` and ``{name}.{png|svg}``; returns the paths."""
    if figure_format not in ("png", "svg"):
        raise GraphError(f"figure format must be png or svg (got {figure_format!r})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(graph_json(edges, params=params), indent=2))
    graphml_path = out / f"{name}.graphml"
    nx.write_graphml(to_networkx(edges, name=name), graphml_path)
    fig_path = plot_graph(edges, out / f"{name}.{figure_format}", title=title)
    return [json_path, graphml_path, fig_path]


safe_name = safe_filename  # a file-name-safe version of a subgroup label


def count_edges(edges_by_group: dict[str, pl.DataFrame]) -> dict[str, int]:
    """Number of kept edges per subgroup (for summaries)."""
    return {g: e.height for g, e in edges_by_group.items()}


__all__: Sequence[str] = (
    "GraphError", "RULES", "global_matrix", "weights_from_sums", "importance_sums", "graph_run", "select_edges", "importance_graphs", "to_networkx",
    "graph_json", "plot_graph", "export_graph", "safe_name", "count_edges",
)
