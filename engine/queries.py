"""Named SQL queries: ``queries/*.sql`` files with a header saying what they answer.

Each file starts with a comment block::

    -- name: top_anomalies
    -- answers: Which patients have the most anomalous explanations? ...
    --   (continuation lines are indented after the dashes)
    -- params: run_id (string, default latest run), k (integer, default 10)

Parameter types are ``string``, ``integer``, ``float`` and ``boolean``; a parameter without a
default is required, and ``run_id`` may default to ``latest run``. Parameters are bound as
DuckDB named parameters (``$k``), never formatted into the SQL text. The folder is the
package's ``engine/resources/queries/``, or ``$AGG2EXP_QUERIES``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from engine.errors import QueryError
from engine.resources import resource_path

QUERIES_ENV = "AGG2EXP_QUERIES"
TYPES: tuple[str, ...] = ("string", "integer", "float", "boolean")
LATEST_RUN = "latest run"

_HEADER = re.compile(r"^--\s?(?P<key>[a-z_]+):\s*(?P<value>.*)$")
_PARAM = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*\((?P<spec>[^)]*)\)")
_PLACEHOLDER = re.compile(r"\$([A-Za-z_]\w*)")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class QueryParam:
    """One declared parameter: its type, and its default (None with ``required`` when absent)."""

    name: str
    type: str
    default: Any = None
    required: bool = True
    default_text: str | None = None

    def describe(self) -> str:
        if self.required:
            return f"{self.name} ({self.type}, required)"
        return f"{self.name} ({self.type}, default {self.default_text})"


@dataclass(frozen=True)
class NamedQuery:
    """A parsed query file."""

    name: str
    answers: str
    params: tuple[QueryParam, ...]
    sql: str
    path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> QueryParam | None:
        return next((p for p in self.params if p.name == name), None)


def queries_dir() -> Path:
    """The query folder: ``$AGG2EXP_QUERIES``, else the package's ``engine/resources/queries``."""
    env = os.environ.get(QUERIES_ENV)
    if env:
        return Path(env)
    return resource_path("queries")


def coerce(param: QueryParam, raw: Any) -> Any:
    """Convert a raw value (a CLI string or a Python value) to the parameter's declared type."""
    kind = param.type
    try:
        if kind == "string":
            if isinstance(raw, (dict, list, tuple)):
                raise ValueError
            return str(raw)
        if kind == "integer":
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError
                return int(raw)
            return int(str(raw).strip())
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
        if kind == "boolean":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
    except ValueError:
        pass
    raise QueryError(f"parameter {param.name!r} must be {_article(kind)} {kind} (got {raw!r})")


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _parse_param(name: str, spec: str, where: str) -> QueryParam:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or parts[0] not in TYPES:
        raise QueryError(f"{where}: parameter {name!r} needs a type among {', '.join(TYPES)} (got {spec!r})")
    kind = parts[0]
    default_text = None
    for part in parts[1:]:
        if part.startswith("default "):
            default_text = part[len("default "):].strip()
    if default_text is None:
        return QueryParam(name=name, type=kind)
    if default_text == LATEST_RUN:
        return QueryParam(name=name, type=kind, default=LATEST_RUN, required=False, default_text=default_text)
    probe = QueryParam(name=name, type=kind)
    text = default_text.strip("'\"") if kind == "string" else default_text
    return QueryParam(name=name, type=kind, default=coerce(probe, text), required=False, default_text=default_text)


def parse_query(text: str, *, path: Path | None = None) -> NamedQuery:
    """Parse a query file's header and check that declared and used parameters agree."""
    where = str(path) if path else "query"
    header: dict[str, str] = {}
    last: str | None = None
    body_start = 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            body_start = i + 1
            continue
        if not stripped.startswith("--"):
            body_start = i
            break
        m = _HEADER.match(stripped)
        if m:
            last = m["key"]
            header[last] = m["value"].strip()
        elif last is not None:
            header[last] = (header[last] + " " + stripped.lstrip("-").strip()).strip()
        body_start = i + 1
    else:
        body_start = len(lines)
    for key in ("name", "answers"):
        if not header.get(key):
            raise QueryError(f"{where}: the header needs a '-- {key}:' line")
    params: list[QueryParam] = []
    params_text = header.get("params", "").strip()
    if params_text and params_text.lower() not in ("none", "-"):
        for m in _PARAM.finditer(params_text):
            params.append(_parse_param(m["name"], m["spec"], where))
        if not params:
            raise QueryError(f"{where}: cannot read '-- params: {params_text}'; write e.g. 'k (integer, default 10)'")
    sql = "\n".join(lines[body_start:]).strip().rstrip(";").strip()
    if not sql:
        raise QueryError(f"{where}: the file has a header but no SQL")
    # strip comments and string literals before looking for placeholders
    code = re.sub(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S)
    used = set(_PLACEHOLDER.findall(code))
    declared = {p.name for p in params}
    if used - declared:
        raise QueryError(f"{where}: the SQL uses undeclared parameters {sorted(used - declared)}; declare them in '-- params:'")
    if declared - used:
        raise QueryError(f"{where}: declared parameters {sorted(declared - used)} are not used in the SQL")
    extra = {k: v for k, v in header.items() if k not in ("name", "answers", "params")}
    return NamedQuery(name=header["name"], answers=header["answers"], params=tuple(params), sql=sql, path=path,
                      extra=extra)


def load_queries(directory: str | os.PathLike[str] | None = None) -> dict[str, NamedQuery]:
    """All queries of the folder, by name (file order)."""
    folder = Path(directory) if directory is not None else queries_dir()
    if not folder.is_dir():
        raise QueryError(f"no query folder at {folder}; set {QUERIES_ENV} to the folder holding the .sql files")
    out: dict[str, NamedQuery] = {}
    for path in sorted(folder.glob("*.sql")):
        q = parse_query(path.read_text(), path=path)
        if q.name in out:
            raise QueryError(f"query name {q.name!r} is used by both {out[q.name].path} and {path}")
        out[q.name] = q
    return out


def get_query(name: str, directory: str | os.PathLike[str] | None = None) -> NamedQuery:
    """One query by name; the error lists the known names."""
    queries = load_queries(directory)
    if name not in queries:
        raise QueryError(f"unknown query {name!r}; known queries: {', '.join(sorted(queries)) or 'none'} "
                         "(see `agg2exp query list`)")
    return queries[name]


def bind_params(
    query: NamedQuery, given: Mapping[str, Any] | None = None, *, latest_run: Callable[[], str] | None = None
) -> dict[str, Any]:
    """Validate and coerce parameters: unknown names, missing required ones and bad types fail."""
    given = dict(given or {})
    unknown = sorted(set(given) - {p.name for p in query.params})
    if unknown:
        known = ", ".join(p.describe() for p in query.params) or "none"
        raise QueryError(f"query {query.name!r} has no parameter(s) {unknown}; its parameters: {known}")
    out: dict[str, Any] = {}
    for p in query.params:
        if p.name in given and given[p.name] is not None:
            out[p.name] = coerce(p, given[p.name])
        elif p.required:
            raise QueryError(f"query {query.name!r} needs parameter {p.name!r} ({p.type}); pass --param {p.name}=VALUE")
        elif p.default == LATEST_RUN:
            if latest_run is None:
                raise QueryError(f"parameter {p.name!r} defaults to the latest run, but no store was given")
            out[p.name] = latest_run()
        else:
            out[p.name] = p.default
    return out


def parse_assignments(items: Iterable[str] | None) -> dict[str, str]:
    """``["k=10", "column=sex"]`` -> ``{"k": "10", "column": "sex"}`` (for ``--param``)."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QueryError(f"--param needs NAME=VALUE (got {item!r})")
        out[key.strip()] = value
    return out


def run_query(
    store: Any, name: str, params: Mapping[str, Any] | None = None, *,
    directory: str | os.PathLike[str] | None = None,
) -> pl.DataFrame:
    """Run a named query against a store with validated, bound parameters.

    ``run_id`` (when declared) must name an existing run; it defaults to the latest one.
    """
    query = get_query(name, directory)
    bound = bind_params(query, params, latest_run=store.latest_run)
    if "run_id" in bound:
        store.require_run(bound["run_id"])
    return store.run_named_query(query.sql, bound)
