"""``agg2exp cohort scan DIR [--out manifest.csv]``: find the CT volumes of a cohort folder.

Prints what was found (one line per patient) and what was skipped and why, and optionally
writes a manifest (CSV or Parquet, by suffix) that ``agg2exp run`` accepts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.errors import JobSpecError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cohort`` and its sub-commands to the CLI."""
    parser = subparsers.add_parser("cohort", help="inspect cohort folders and build manifests",
                                   description="Inspect a cohort folder and build a manifest.")
    sub = parser.add_subparsers(dest="cohort_command", metavar="SUBCOMMAND", required=True)
    scan = sub.add_parser("scan", help="find NIfTI files and DICOM series under DIR",
                          description="Find NIfTI volumes and DICOM CT series under DIR; report what was "
                                      "skipped and why; optionally write a manifest.")
    scan.add_argument("dir", metavar="DIR", help="folder holding the scans (searched recursively)")
    scan.add_argument("--out", metavar="MANIFEST", help="write the manifest here (.csv or .parquet); paths are "
                                                        "written relative to the manifest's folder when inside it")
    scan.set_defaults(handler=_scan)


def _relative_to(value: str | None, folder: Path) -> str | None:
    if value is None:
        return None
    p = Path(value)
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return str(p)


def _scan(args: argparse.Namespace) -> int:
    import polars as pl

    from engine.cohorts import scan_cohort

    manifest, skipped = scan_cohort(args.dir)
    print(f"found {manifest.height} volume(s) in {Path(args.dir).resolve()}")
    for row in manifest.iter_rows(named=True):
        extra = f"  label {row['label_path']}" if row["label_path"] else ""
        series = f"  series {row['series_uid']}" if row["series_uid"] else ""
        print(f"  {row['patient_id']}  [{row['format']}]  {row['image_path']}{series}{extra}")
    if skipped:
        print(f"skipped {len(skipped)}:")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    if args.out:
        out = Path(args.out).expanduser()
        if out.suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise JobSpecError(f"--out {out}: give a .csv or .parquet file name")
        if manifest.height == 0:
            raise JobSpecError(f"no volumes found under {args.dir}; nothing written to {out}")
        folder = out.resolve().parent
        written = manifest.with_columns(
            *[pl.col(c).map_elements(lambda v, f=folder: _relative_to(v, f), return_dtype=pl.String)
              for c in ("image_path", "label_path")]
        )
        os.makedirs(folder, exist_ok=True)
        if out.suffix.lower() == ".csv":
            written.write_csv(out)
        else:
            written.write_parquet(out)
        print(f"manifest written to {out} ({manifest.height} row(s))")
    return 0 if manifest.height else 1
