"""Live reads of a store that a run is writing: read-only SQL served by the writing process.

DuckDB lets one process hold a database file for writing, and other processes cannot open it
meanwhile. Instead of copying the file, the writer answers read-only queries from its own
database over Arrow Flight: each query runs on its own cursor (a new connection to the same
database), so DuckDB's MVCC gives it a consistent snapshot of every committed patient, and the
writer pays nothing between queries. Readers find the endpoint through ``<db>.live`` next to the
file (mode 0600: host, port, token, pid), which the writer removes when it closes.

What may run is decided by DuckDB's own parser, not by patterns: exactly one ``SELECT``
statement (``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``FROM``, ``VALUES`` and ``WITH`` parse as one),
or ``EXPLAIN`` of one, or a read-only ``PRAGMA``; table functions only from an allow-list that
reads no files. Every connection of the store is also opened with ``enable_external_access =
false``, so DuckDB itself refuses any file access that a statement might still reach.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from engine.errors import UserError

DEFAULT_HOST = "127.0.0.1"

#: Table functions that read only the database's own state.
SAFE_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "json_each", "json_tree", "summary",
    "pragma_table_info", "pragma_show", "pragma_database_size", "pragma_storage_info", "pragma_version",
    "pragma_metadata_info", "pragma_platform",
})
#: ``PRAGMA`` statements that only read.
SAFE_PRAGMAS = frozenset({
    "table_info", "show", "show_tables", "show_tables_expanded", "show_databases", "database_size",
    "storage_info", "version", "database_list", "collations", "functions", "platform", "metadata_info",
})


class LiveError(UserError):
    """The live endpoint cannot be reached or refused a query; the message says why."""


def live_path(db: str | os.PathLike[str]) -> Path:
    """The endpoint file of a store: ``<db>.live`` next to it."""
    p = Path(db)
    return p.with_name(p.name + ".live")


# --------------------------------------------------------------------------- read-only guard


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _check_select(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse table functions that could read files, and file paths used as tables."""
    text = con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0]
    tree = json.loads(text)
    if tree.get("error"):
        raise LiveError(f"cannot read this statement: {tree.get('error_message', 'unknown parser error')}")
    for node in _walk(tree.get("statements", [])):
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            fn = (node.get("function") or {}).get("function_name", "")
            if fn.lower() not in SAFE_TABLE_FUNCTIONS and not fn.lower().startswith("duckdb_"):
                raise LiveError(f"the table function {fn}() is refused here: only the store's own tables can be "
                                "read (file readers such as read_csv, read_parquet and glob are not allowed)")
        elif kind == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            if re.search(r"[./\\:]", name):
                raise LiveError(f"{name!r} looks like a file; only the store's own tables can be read")


_PARSER_LOCK = threading.RLock()
_PARSER: list[duckdb.DuckDBPyConnection] = []


def _parser() -> duckdb.DuckDBPyConnection:
    """An in-memory connection kept for parsing (opening one costs far more than a parse)."""
    if not _PARSER:
        _PARSER.append(duckdb.connect(config={"enable_external_access": False}))
    return _PARSER[0]


def check_read_only(query: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise :class:`LiveError` (one line) unless ``query`` is one statement that only reads.

    ``con`` parses table references (``json_serialize_sql``); a kept in-memory connection is used
    when none is given.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise LiveError(f"cannot parse the SQL: {str(exc).strip().splitlines()[0]}") from None
    if len(statements) != 1:
        raise LiveError(f"give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type
    if con is None:
        with _PARSER_LOCK:
            return check_read_only(query, _parser())
    if kind == duckdb.StatementType.SELECT:
        _check_select(con, query)
        return
    if kind == duckdb.StatementType.EXPLAIN:
        inner = re.sub(r"^\s*explain\s+(analyze\s+)?", "", query, flags=re.I)
        if inner != query:
            check_read_only(inner, con)
            return
    if kind == duckdb.StatementType.PRAGMA:
        m = re.match(r"\s*pragma\s+([a-z_]+)", query, flags=re.I)
        if m and m.group(1).lower() in SAFE_PRAGMAS:
            return
        raise LiveError("only read-only PRAGMAs (table_info, show_tables, database_size, ...) are allowed here; "
                        "settings cannot be changed")
    name = str(kind).rsplit(".", 1)[-1]
    raise LiveError(f"only read-only SQL is allowed here (got a {name} statement); the store is written by runs "
                    "and analytics commands")


# --------------------------------------------------------------------------- parameters on the wire


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    return value


def _encode(query: str, params: Sequence[Any] | Mapping[str, Any] | None) -> bytes:
    return json.dumps({"sql": query, "params": _jsonable(params) if params else None}).encode()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- server


class _TokenCheck(flight.ServerMiddlewareFactory):
    """Answers nothing without ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}"

    def start_call(self, info: Any, headers: Mapping[str, list[Any]]) -> None:
        given = [v.decode() if isinstance(v, bytes) else str(v) for v in headers.get("authorization", [])]
        if not any(hmac.compare_digest(v, self._expected) for v in given):
            raise flight.FlightUnauthenticatedError("a valid token is required")
        return None


class LiveServer(flight.FlightServerBase):
    """Serves read-only SQL from a writer's connection; one cursor (one snapshot) per query."""

    def __init__(self, con: duckdb.DuckDBPyConnection, db: str | os.PathLike[str], *,
                 host: str = DEFAULT_HOST, batch_rows: int = 65_536) -> None:
        self.token = secrets.token_urlsafe(32)
        super().__init__(location=f"grpc+tcp://{host}:0", middleware={"token": _TokenCheck(self.token)})
        self.host = host
        self._con = con
        self._lock = threading.Lock()  # cursor() on the writer connection is not thread-safe
        self._batch_rows = batch_rows
        self.file = live_path(db)
        self._publish()

    def _publish(self) -> None:
        info = {"host": self.host, "port": self.port, "token": self.token, "pid": os.getpid()}
        tmp = self.file.with_name(self.file.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, self.file)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        try:
            request = json.loads(ticket.ticket)
            query, params = str(request["sql"]), request.get("params")
        except (ValueError, KeyError, TypeError):
            raise flight.FlightServerError("refused: malformed request") from None
        with self._lock:
            cur = self._con.cursor()
        try:
            check_read_only(query, cur)
            reader = cur.sql(query, params=params or None).to_arrow_reader(self._batch_rows)
        except LiveError as exc:
            cur.close()
            raise flight.FlightServerError(f"refused: {exc}") from None
        except duckdb.Error as exc:
            cur.close()
            raise flight.FlightServerError(f"failed: {_first_line(exc)}") from None

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from reader
            finally:
                reader.close()
                cur.close()

        return flight.GeneratorStream(reader.schema, batches())

    def close(self) -> None:
        """Stop answering and remove the endpoint file (only if it is still ours)."""
        try:
            info = json.loads(self.file.read_text())
            if info.get("token") == self.token:
                self.file.unlink()
        except (OSError, ValueError):
            pass
        self.shutdown()


# --------------------------------------------------------------------------- client


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveClient:
    """Queries the process that holds ``db`` through its endpoint file."""

    def __init__(self, db: str | os.PathLike[str]) -> None:
        self.db = Path(db)
        path = live_path(db)
        try:
            info = json.loads(path.read_text())
            host, port, token, pid = str(info["host"]), int(info["port"]), str(info["token"]), int(info["pid"])
        except FileNotFoundError:
            raise LiveError(f"{self.db} is locked by another process that serves no live reads (an older engine, or "
                            "DuckDB opened by hand); wait for it to finish, then read the file directly") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise LiveError(f"{path} is unreadable; it is written by the process writing {self.db} — wait for "
                            "that process, or delete the file if no run is writing") from None
        if not _pid_alive(pid):
            raise LiveError(f"{path} is stale (process {pid} is gone) yet {self.db} is locked by another process; "
                            "wait for that process to finish, then read the file directly")
        self.pid = pid
        self._client = flight.FlightClient(f"grpc+tcp://{host}:{port}")
        self._options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())],
                                                 timeout=600.0)

    def query(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        return self.reader(query, params).read_all()

    def reader(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.RecordBatchReader:
        try:
            return self._client.do_get(flight.Ticket(_encode(query, params)), self._options).to_reader()
        except flight.FlightUnavailableError:
            raise LiveError(f"the process writing {self.db} (pid {self.pid}) does not answer on its live endpoint; "
                            "it may have just finished — try again") from None
        except flight.FlightError as exc:
            msg = _first_line(exc)
            for prefix in ("refused: ", "failed: "):
                if msg.startswith(prefix):
                    msg = msg[len(prefix):] if prefix == "refused: " else f"the query failed: {msg[len(prefix):]}"
            raise LiveError(msg.split(". gRPC client debug context")[0].split(". Detail:")[0]) from None

    def close(self) -> None:
        self._client.close()
