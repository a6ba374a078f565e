"""The ``agg2exp`` command line: a thin dispatcher over ``engine.commands``.

Each command lives in its own module under ``engine/commands/`` and exposes
``register(subparsers)``; the module's handler calls the library and formats the result.
User errors (``engine.errors.UserError`` and subclasses) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from engine.errors import UserError

#: Command modules, in the order ``agg2exp --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "run",
    "query",
    "sql_cmd",
    "anomaly",
    "audit",
    "graph",
    "import_csv",
    "cohort",
    "evaluate",
    "report",
    "show",
    "job_schema",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agg2exp",
        description="Aggregated attributions (Agg2Exp) for 3D segmentation models, across cohorts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"engine.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"agg2exp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; what was committed is kept (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
