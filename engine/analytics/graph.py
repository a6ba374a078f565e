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

Background (as target and as RoI) is excluded by default, like the reference, and self-edges
(``c -> c``) are kept by default; both exclusions apply before selection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
import polars as pl

from engine.errors import UserError
from engine.labels import colour_of, group_of
from engine.vocabulary import safe_filename

Rule = Literal["topk", "cumulative", "quantile"]
RULES: tuple[str, ...] = ("topk", "cumulative", "quantile")
BACKGROUND = "background"


class GraphError(UserError, ValueError):
    """A graph that cannot be built as asked (unknown rule, no importances, bad option)."""


def global_matrix(
    importances: pl.DataFrame,
    *,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
) -> pl.DataFrame:
    """Cohort mean per (target, roi): ``target, roi, weight, n_patients`` (nulls ignored)."""
    df = importances.filter((pl.col("sign") == sign) & (pl.col("stat") == stat))
    if method is not None:
        df = df.filter(pl.col("method") == method)
    elif df.height and df["method"].n_unique() > 1:
        raise GraphError(
            f"the importances hold several methods {sorted(df['method'].unique().to_list())}; choose one with --method"
        )
    if df.height == 0:
        raise GraphError(f"no importances with sign={sign!r}, stat={stat!r}" + (f", method={method!r}" if method else ""))
    return (
        df.group_by("target", "roi")
        .agg(pl.col("value").mean().alias("weight"), pl.col("value").count().alias("n_patients"))
        .sort("target", "roi")
    )


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
    **rule_options: Any,
) -> dict[str, pl.DataFrame]:
    """Edges of the whole cohort (key ``"all"``), or of each subgroup of metadata column ``by``."""
    if by is None:
        return {"all": select_edges(global_matrix(importances, method=method, sign=sign, stat=stat), **rule_options)}
    if patients is None:
        raise GraphError("a subgroup graph needs the patients' metadata")
    labels = subgroups(patients, by)
    imp = importances.with_columns(pl.col("patient_id").cast(pl.String))
    out: dict[str, pl.DataFrame] = {}
    for group in sorted(labels["group"].unique().to_list()):
        ids = labels.filter(pl.col("group") == group)["patient_id"]
        part = imp.filter(pl.col("patient_id").is_in(ids.implode()))
        if part.height:
            out[group] = select_edges(global_matrix(part, method=method, sign=sign, stat=stat), **rule_options)
    return out


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
    "GraphError", "RULES", "global_matrix", "select_edges", "importance_graphs", "to_networkx",
    "graph_json", "plot_graph", "export_graph", "safe_name", "count_edges",
)
