"""Files shipped inside the package (read with :mod:`importlib.resources`, so they travel with the wheel).

* ``queries/*.sql``: the named queries of ``agg2exp query`` (:mod:`engine.queries`);
* ``jobs/*.toml``: example jobs: ``demo.toml`` (what ``agg2exp demo`` runs), ``evaluate_demo.toml``
  and ``swin_unetr_thorax.toml`` (the paper's configuration);
* ``job.schema.json``: the JSON Schema of job files (``agg2exp job-schema``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. ``resource_path("jobs", "demo.toml")``.

    The package is installed as files (a wheel, or in place), so the resource is a real path.
    """
    return Path(str(files(__name__).joinpath(*parts)))


def job_file(name: str) -> Path:
    """A shipped example job by file name, e.g. ``job_file("demo.toml")``."""
    return resource_path("jobs", name)


__all__ = ["job_file", "resource_path"]
