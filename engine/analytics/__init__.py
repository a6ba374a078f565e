"""Cohort analytics on aggregated attributions: anomalies, bias audit, global graph, reference import.

Everything here works on Polars frames and numpy matrices and imports neither DuckDB nor Ray;
``engine.store`` feeds them (its analytics readers filter, pivot and aggregate in DuckDB) and
stores the results. The ``*_run`` functions take a store-like object.
"""

from __future__ import annotations

from engine.analytics.anomaly import RoIAnomalyDetector, score_run
from engine.analytics.audit import audit, audit_column
from engine.analytics.graph import export_graph, global_matrix, graph_run, importance_graphs, select_edges
from engine.analytics.matrix import ImportanceMatrix, select_importances
from engine.analytics.reference import parse_reference_frame, read_reference_csv
from engine.analytics.rois import ROI_SETS, choose_rois

__all__ = [
    "RoIAnomalyDetector",
    "score_run",
    "audit",
    "audit_column",
    "global_matrix",
    "graph_run",
    "ImportanceMatrix",
    "select_importances",
    "ROI_SETS",
    "choose_rois",
    "select_edges",
    "importance_graphs",
    "export_graph",
    "read_reference_csv",
    "parse_reference_frame",
]
