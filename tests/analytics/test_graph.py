"""Global RoI importance graph: a hand-computed 3x3 case and the shared CSV."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import polars as pl
import pytest

from engine.analytics.graph import (
    GraphError,
    export_graph,
    global_matrix,
    importance_graphs,
    select_edges,
)
from engine.analytics.reference import read_reference_csv
from engine.labels import colour_of
from tests.analytics._store import reference_csv

# cohort means (target -> roi -> weight); background takes the rest of each row
WEIGHTS = {
    "heart": {"heart": 0.30, "aorta": 0.04, "trachea": 0.02, "background": 0.64},
    "aorta": {"heart": 0.10, "aorta": 0.20, "trachea": 0.10, "background": 0.60},
    "trachea": {"heart": 0.05, "aorta": 0.15, "trachea": 0.33, "background": 0.47},
}


def _hand_importances() -> pl.DataFrame:
    rows = []
    for target, per_roi in WEIGHTS.items():
        for roi, w in per_roi.items():
            for pid, delta in (("p1", 0.01), ("p2", -0.01)):
                rows.append((pid, "m", target, roi, "mass", "abs", w + delta))
                rows.append((pid, "m", target, roi, "mass", "pos", 0.0))
    return pl.DataFrame(rows, schema=["patient_id", "method", "target", "roi", "stat", "sign", "value"],
                        orient="row")


def _edges(df: pl.DataFrame) -> set[tuple[str, str]]:
    return set(zip(df["source"].to_list(), df["target"].to_list()))


def test_global_matrix_is_the_cohort_mean() -> None:
    m = global_matrix(_hand_importances())
    assert m.height == 12
    row = m.filter((pl.col("target") == "trachea") & (pl.col("roi") == "aorta")).row(0, named=True)
    assert row["weight"] == pytest.approx(0.15) and row["n_patients"] == 2


def test_hand_computed_rules() -> None:
    m = global_matrix(_hand_importances())
    # cumulative 0.35: heart keeps heart (0.30) and aorta (0.34), not trachea (0.36);
    # aorta keeps aorta (0.20) and heart (0.30; tie with trachea broken by name), not trachea (0.40);
    # trachea keeps only itself (0.33, then 0.48)
    cum = select_edges(m, rule="cumulative", threshold=0.35)
    assert _edges(cum) == {("heart", "heart"), ("aorta", "heart"), ("aorta", "aorta"), ("heart", "aorta"),
                           ("trachea", "trachea")}
    assert cum.filter(pl.col("target") == "heart")["cumweight"].to_list() == pytest.approx([0.30, 0.34])
    # without self-edges every target keeps both other classes (sums 0.06, 0.20, 0.20)
    assert select_edges(m, rule="cumulative", self_edges=False).height == 6
    # top-1: each class's heaviest RoI is itself
    assert _edges(select_edges(m, rule="topk", k=1)) == {("heart", "heart"), ("aorta", "aorta"),
                                                          ("trachea", "trachea")}
    # quantile 0.75 of the 9 weights is 0.20 (numpy linear); strictly above: 0.30 and 0.33
    q = float(np.quantile([0.30, 0.04, 0.02, 0.10, 0.20, 0.10, 0.05, 0.15, 0.33], 0.75))
    assert q == pytest.approx(0.20)
    assert _edges(select_edges(m, rule="quantile", quantile=0.75)) == {("heart", "heart"), ("trachea", "trachea")}
    # keeping background: background carries > 0.35 alone, so the cumulative rule keeps nothing,
    # and the top-1 RoI of every class is background
    assert select_edges(m, rule="cumulative", exclude_background=False).height == 0
    top = select_edges(m, rule="topk", k=1, exclude_background=False)
    assert set(top["source"]) == {"background"}


def test_bad_options() -> None:
    m = global_matrix(_hand_importances())
    with pytest.raises(GraphError, match="unknown edge rule"):
        select_edges(m, rule="median")  # type: ignore[arg-type]
    with pytest.raises(GraphError, match="no importances"):
        global_matrix(_hand_importances(), sign="neg")


def test_export_json_graphml_and_figures(tmp_path: Path) -> None:
    edges = select_edges(global_matrix(_hand_importances()), rule="cumulative")
    paths = export_graph(edges, tmp_path, name="g", params={"rule": "cumulative"})
    assert [p.name for p in paths] == ["g.json", "g.graphml", "g.png"]
    doc = json.loads((tmp_path / "g.json").read_text())
    assert len(doc["edges"]) == 5 and doc["params"] == {"rule": "cumulative"}
    assert {n["id"]: n["colour"] for n in doc["nodes"]}["heart"] == colour_of("heart")
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.is_directed() and g.number_of_edges() == 5
    assert g.edges["aorta", "heart"]["weight"] == pytest.approx(0.04)
    assert (tmp_path / "g.png").stat().st_size > 1000
    svg = export_graph(edges, tmp_path, name="g2", figure_format="svg")[2]
    assert svg.read_text().lstrip().startswith("<?xml")


def test_subgroup_graphs() -> None:
    imp = _hand_importances()
    patients = pl.DataFrame({"patient_id": ["p1", "p2"], "sex": ["F", "M"]})
    graphs = importance_graphs(imp, patients=patients, by="sex", rule="topk", k=2)
    assert set(graphs) == {"F", "M"}
    f = graphs["F"]
    assert f.filter((pl.col("target") == "heart") & (pl.col("source") == "heart"))["weight"].item() == pytest.approx(0.31)


def test_shared_csv_cumulative_035_keeps_240_of_256_foreground_edges() -> None:
    imp = read_reference_csv(reference_csv()).importances
    m = global_matrix(imp)
    fg = m.filter((pl.col("target") != "background") & (pl.col("roi") != "background"))
    assert fg.height == 256
    edges = select_edges(m, rule="cumulative", threshold=0.35)
    assert edges.height == 240
    assert set(edges["target"]) <= set(fg["target"]) and "background" not in set(edges["source"])
    # the reading that gives 240 is the plain one (as the reference R code): raw cohort-mean masses
    # (fractions of the whole volume's attribution, background included), kept while the running
    # sum is <= 0.35. The alternatives give other counts:
    first_exceed = renormalised = 0
    for _, part in fg.group_by("target"):
        w = np.sort(part["weight"].to_numpy())[::-1]
        first_exceed += min(int((np.cumsum(w) <= 0.35).sum()) + 1, w.size)  # keep the crossing RoI too
        renormalised += int((np.cumsum(w / w.sum()) <= 0.35).sum())  # masses renormalised over foreground
    assert (first_exceed, renormalised) == (243, 17)
