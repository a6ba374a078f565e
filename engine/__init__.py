"""agg2exp engine: aggregated attributions for explaining 3D segmentation models across cohorts.

The public API, imported lazily so that ``import engine`` stays light:

- ``explain_volume`` (``engine.attribution``): one volume → prediction, RoI importances, maps.
- ``open_store`` (``engine.store.open``): read-only access to a store, with Polars views.
- ``run_job`` (``engine.runtime``): a job spec over a cohort on Ray, streamed into the store.
- ``JobSpec`` (``engine.jobs``): job specifications.
- ``keep_cpu_heap`` (``engine.runtime.heap``): glibc's malloc set to reuse window-sized buffers, as the
  engine's workers and the ``agg2exp`` command set it (call once at the start of a process that explains
  volumes on CPUs).
"""

from __future__ import annotations

import logging
from typing import Any

# MONAI announces on import, at WARNING, that an optional GPU DICOM decoder is absent; every worker
# process would repeat it. It changes nothing for the engine, so keep it out of users' terminals.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

__version__ = "0.1.0"

_EXPORTS = {
    "explain_volume": ("engine.attribution", "explain_volume"),
    "Explanation": ("engine.attribution", "Explanation"),
    "open_store": ("engine.store", "open"),
    "run_job": ("engine.runtime", "run_job"),
    "JobSpec": ("engine.jobs", "JobSpec"),
    "keep_cpu_heap": ("engine.runtime.heap", "keep_cpu_heap"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
