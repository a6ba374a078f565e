"""``agg2exp query``: list the named queries, or run one with typed parameters.

Also holds the frame output helpers (table, csv, json, parquet) shared by ``agg2exp sql``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import QueryError
from engine.vocabulary import DEFAULT_DB

if TYPE_CHECKING:
    import polars as pl

FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--db PATH`` option every command takes."""
    parser.add_argument("--db", default=DEFAULT_DB, help=f"store file (default {DEFAULT_DB})")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format`` and ``--out`` for commands that print a frame."""
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")


def write_frame(df: pl.DataFrame, *, fmt: str = "table", out: Path | None = None) -> None:
    """Print or save a frame; nested columns are JSON-encoded for CSV, parquet needs ``--out``."""
    import polars as pl

    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise QueryError("parquet output is binary; give a file with --out FILE.parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(out)
        return
    if fmt == "table":
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            text = str(df) + "\n"
    elif fmt == "csv":
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        flat = df.with_columns([pl.col(c).map_elements(lambda v: str(v), return_dtype=pl.String) for c in nested])
        text = flat.write_csv()
    else:
        text = df.write_json()
        text = text if text.endswith("\n") else text + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def _list(args: argparse.Namespace) -> int:
    from engine import queries

    for q in queries.load_queries().values():
        params = ", ".join(p.describe() for p in q.params) or "none"
        print(q.name)
        print(textwrap.indent(textwrap.fill(q.answers, 88), "    "))
        print(f"    params: {params}")
    return 0


def handle(args: argparse.Namespace) -> int:
    """Run ``agg2exp query``."""
    if args.name == "list":
        return _list(args)
    from engine import queries, store

    params = queries.parse_assignments(args.param)
    with store.open(args.db) as s:
        df = queries.run_query(s, args.name, params)
    write_frame(df, fmt=args.format, out=args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "query", help="run a named SQL query (`agg2exp query list` shows them)",
        description="Run one of the named queries (engine/resources/queries/*.sql) with bound, typed parameters.",
    )
    p.add_argument("name", help="query name, or 'list' to show the queries and their parameters")
    p.add_argument("--param", "-p", action="append", metavar="NAME=VALUE", default=[],
                   help="a query parameter (repeatable), e.g. --param k=10")
    add_output_arguments(p)
    add_db_argument(p)
    p.set_defaults(handler=handle)
