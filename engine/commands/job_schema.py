"""``agg2exp job-schema``: print the JSON Schema of job files (also shipped as ``engine/resources/job.schema.json``)."""

from __future__ import annotations

import argparse
import json


def handle(args: argparse.Namespace) -> int:
    from engine.jobs import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "job-schema", help="print the JSON Schema of job files (for editors that check TOML)",
        description="Print the JSON Schema every job file follows: its tables, their keys, types and defaults. "
                    "Editors with a TOML language server (e.g. Taplo, Even Better TOML) can check job files with it.",
    )
    p.set_defaults(handler=handle)
