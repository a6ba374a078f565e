"""Reports of a run: figures after the Agg2Exp paper, a self-contained HTML report, NIfTI export.

* ``engine.report.figures`` - Fig. 2 slice overlays, Fig. 3 importance distributions, Fig. 4 graph,
  Fig. 5 anomaly ranking and patient panels (matplotlib, Agg);
* ``engine.report.html.write_report`` - one HTML file per run, images embedded;
* ``engine.report.nifti.export_explanation`` - maps and prediction on the CT grid for 3D Slicer / ITK-SNAP;
* ``engine.report.maps`` - recompute a stored run's maps for a few patients with its configuration.

Submodules are imported lazily so that ``engine.pipeline`` can import the NIfTI export without
pulling matplotlib in.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report", "export_explanation", "slice_overlay"]


def __getattr__(name: str) -> Any:
    if name == "write_report":
        from engine.report.html import write_report

        return write_report
    if name == "export_explanation":
        from engine.report.nifti import export_explanation

        return export_explanation
    if name == "slice_overlay":
        from engine.report.figures import slice_overlay

        return slice_overlay
    raise AttributeError(f"module 'engine.report' has no attribute {name!r}")
