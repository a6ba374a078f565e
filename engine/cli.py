"""The ``agg2exp`` command line: a thin dispatcher over ``engine.commands``.

Each command lives in its own module under ``engine/commands/`` and exposes
``register(subparsers)``; the module's handler calls the library and formats the result.
Command modules import only the standard library and light engine modules at the top: torch,
MONAI, Captum, Ray, DuckDB and Polars are imported inside handlers, so ``agg2exp --help`` and the
parser of every command start in a fraction of a second.

Exit statuses (the same for every command):

* 0: done (every patient, for a run);
* 1: some patients failed, each with its reason;
* 2: the command or job cannot run as written (a ``UserError``, printed on one line);
* 3: a run stopped by itself before finishing (rerunning resumes it);
* 4: an internal error (one line; ``--log-level debug`` logs the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from engine import __version__
from engine.errors import UserError

log = logging.getLogger("engine.cli")

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

EXIT_OK, EXIT_FAILED_PATIENTS, EXIT_USER_ERROR, EXIT_STOPPED, EXIT_CRASH = 0, 1, 2, 3, 4
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agg2exp",
        description="Aggregated attributions (Agg2Exp) for 3D segmentation models, across cohorts.",
        epilog="exit status: 0 done, 1 some patients failed, 2 cannot run as written, "
               "3 run stopped before finishing (rerun to resume), 4 internal error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                        help="log messages at this level and above to stderr (default warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"engine.commands.{name}").register(sub)
    return parser


def configure_logging(level: str) -> None:
    """One stderr handler for the ``engine`` loggers (and warnings of other libraries)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(getattr(logging, level.upper()), logging.WARNING))
    logging.getLogger("engine").setLevel(getattr(logging, level.upper()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        from engine.runtime.heap import keep_cpu_heap

        keep_cpu_heap()  # for the commands that compute in this process (engine.runtime.heap)
        # log lines are written above a progress bar instead of through it
        with logging_redirect_tqdm():
            return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"agg2exp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `agg2exp query list | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted; what was committed is kept (run the same command again to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, traceback in the log
        log.debug("internal error in agg2exp %s", args.command, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if args.log_level == "debug" else "; rerun with --log-level debug for the traceback"
        print(f"agg2exp {args.command}: internal error: {type(exc).__name__}: {first}{hint} "
              "(please report it)", file=sys.stderr)
        return EXIT_CRASH


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
