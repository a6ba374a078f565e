"""``agg2exp sql "SELECT ..."``: ad-hoc read-only SQL against the store."""

from __future__ import annotations

import argparse

from engine.commands.query import add_db_argument, add_output_arguments, write_frame


def handle(args: argparse.Namespace) -> int:
    """Run one read-only statement; statements that would write are refused before they run."""
    from engine import store

    with store.open(args.db) as s:
        df = s.sql(args.statement)
    write_frame(df, fmt=args.format, out=args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "sql", help="run one read-only SQL statement against the store",
        description="Ad-hoc read-only SQL (SELECT, WITH, DESCRIBE, ...); writes are refused.",
    )
    p.add_argument("statement", help='the SQL, e.g. "SELECT run_id, status FROM runs"')
    add_output_arguments(p)
    add_db_argument(p)
    p.set_defaults(handler=handle)
