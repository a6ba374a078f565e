"""``agg2exp import-csv FILE``: import the reference implementation's CSV as a run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from typing import TYPE_CHECKING

from engine.commands.query import add_db_argument

if TYPE_CHECKING:
    import polars as pl

    from engine import store


def import_reference_csv(
    s: "store.Store", path: str | os.PathLike[str], *, run_id: str | None = None, method: str = "smoothgrad",
    metadata: "pl.DataFrame | None" = None,
) -> str:
    """Parse the reference code's wide CSV and store it as a run of kind 'import'; returns the run id.

    The run id defaults to ``import-<file stem>``; importing the same run id again replaces it.
    """
    from engine.analytics.reference import read_reference_csv

    data = read_reference_csv(path, method=method)
    rid = run_id or f"import-{Path(path).stem}"
    s.import_frames(
        rid, importances=data.importances, predictions=data.predictions, metadata=metadata,
        config={"source": str(Path(path).resolve()), "method": method, "format": "agg2exp-reference-csv"},
        kind="import",
    )
    return rid


def handle(args: argparse.Namespace) -> int:
    """Parse the wide CSV and store it as a run of kind 'import'."""
    from engine import store

    with store.open_writer(args.db) as s:
        run_id = import_reference_csv(s, args.file, run_id=args.run_id, method=args.method)
        counts = s.table_counts(run_id)
    print(f"imported {args.file} as run {run_id}: {counts['patients']} patients, "
          f"{counts['importances']} importance rows, {counts['predictions']} prediction rows")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "import-csv", help="import a reference aggregated-explanations CSV as a run",
        description="Import the reference code's wide CSV (one row per patient) into the store.",
    )
    p.add_argument("file", type=Path, help="the CSV file")
    p.add_argument("--run-id", default=None, help="run id (default import-<file stem>)")
    p.add_argument("--method", default="smoothgrad", help="attribution method of the file (default smoothgrad)")
    add_db_argument(p)
    p.set_defaults(handler=handle)
