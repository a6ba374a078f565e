"""Cohort analytics on aggregated attributions: anomalies, bias audit, global graph, reference import.

Everything here works on Polars frames and imports neither DuckDB nor Ray; ``engine.store``
feeds the frames and stores the results.
"""

from __future__ import annotations

from engine.analytics.anomaly import RoIAnomalyDetector, score_run
from engine.analytics.audit import audit, audit_column
from engine.analytics.graph import export_graph, global_matrix, importance_graphs, select_edges
from engine.analytics.reference import parse_reference_frame, read_reference_csv

__all__ = [
    "RoIAnomalyDetector",
    "score_run",
    "audit",
    "audit_column",
    "global_matrix",
    "select_edges",
    "importance_graphs",
    "export_graph",
    "read_reference_csv",
    "parse_reference_frame",
]
