"""Typed settings sections: the one way a job-spec table becomes a checked, frozen object.

Every table of a job file (``[cohort]``, ``[model]``, ``[preprocess]``, ``[attribution]``, ``[rois]``,
``[runtime]``, ``[anomaly]``, ``[evaluate]``) is a class decorated with :func:`section`: a frozen,
keyword-only pydantic dataclass in strict mode with unknown keys forbidden. Strict means a value of
the wrong type is refused rather than coerced (``seed = "abc"``, ``sigma = "0.1"``, ``in_flight = 2.5``,
``targets = "aorta"``, ``enabled = "false"``), except that integers are accepted where a float is
expected and TOML arrays where a tuple is expected. Whatever goes wrong is raised as one
:class:`~engine.errors.JobSpecError` line naming the table and the key, e.g.
``[attribution] sigma: must be a number, got '0.1'``; unknown keys keep the did-you-mean hint of
:func:`~engine.errors.check_keys`.

The owner of each section keeps its class (volumes own ``PreprocessSpec``, models own ``ModelSpec``,
...); ``engine.jobs.JobSpec`` composes them. A field is added in the usual dataclass style
(``name: type = default``) and is typed, checked and published in the JSON Schema with no more code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict, ValidationError
from pydantic_core import ArgsKwargs

from engine.errors import JobSpecError, UserError, check_keys

T = TypeVar("T")

#: Strict types, no unknown keys; arbitrary types for fields such as tensors never come from TOML.
SECTION_CONFIG = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)

_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "dict_type": "must be a table",
    "mapping_type": "must be a table",
    "none_required": "must be absent",
    "int_from_float": "must be an integer",
    "literal_error": "has an unknown value",
}


def section(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: a strict pydantic dataclass for the job-spec table ``[name]``."""

    def wrap(cls: type[T]) -> type[T]:
        out = pydantic.dataclasses.dataclass(frozen=True, kw_only=True, config=SECTION_CONFIG)(cls)
        init = out.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs = {k: _tuples(v) for k, v in kwargs.items()}
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise describe(name, exc) from None

        out.__init__ = __init__  # type: ignore[misc]
        out.__section__ = name  # type: ignore[attr-defined]
        return out

    return wrap


def _tuples(value: Any) -> Any:
    """TOML arrays (lists) as tuples, recursively, so that strict tuple fields accept them."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def parse(cls: type[T], data: Mapping[str, Any] | None, *, name: str | None = None) -> T:
    """The section ``cls`` from a TOML table: unknown keys (with did-you-mean) first, then types."""
    data = dict(data or {})
    label = name or getattr(cls, "__section__", cls.__name__)
    check_keys(f"[{label}]", data, field_names(cls))
    return cls(**data)


def describe(name: str, exc: ValidationError) -> UserError:
    """One line for all of a section's validation errors, each as ``[name] key: what``."""
    by_key: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if err["type"] == "value_error" and isinstance(cause, UserError):
            return cause  # a check the section itself wrote, already one line
        if err["type"] == "value_error" and str(cause).startswith(f"[{name}]"):
            return JobSpecError(str(cause))
        loc = [str(x) for x in err["loc"]]
        key = loc[0] if loc else ""
        if err["type"] == "value_error":
            msg = str(cause) if cause is not None else err["msg"]
        elif err["type"] == "unexpected_keyword_argument":
            msg = "is not a known key"
        elif err["type"].startswith("missing"):
            msg = "is required"
        else:
            msg = _MESSAGES.get(err["type"], err["msg"].replace("Input should be", "must be"))
        if len(loc) > 1 and loc[1].isdigit():
            msg = f"item {int(loc[1]) + 1} {msg}"
        if msg not in by_key.setdefault(key, []):
            by_key[key].append(msg)
        if key and key not in got and not isinstance(err.get("input"), ArgsKwargs):
            got[key] = err.get("input")
    parts = []
    for key, msgs in by_key.items():
        where = f"[{name}] {key}:" if key else f"[{name}]"
        value = f", got {got[key]!r}" if key in got else ""
        parts.append(f"{where} {' or '.join(msgs)}{value}")
    return JobSpecError("; ".join(parts))


def json_schema(cls: type) -> dict[str, Any]:
    """JSON Schema of one section (as a TOML table)."""
    return pydantic.TypeAdapter(cls).json_schema()


def to_table(obj: Any, *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A section as a TOML table: tuples as lists, mapping keys as strings, ``None`` left out.

    ``parse(type(obj), to_table(obj)) == obj`` for every section (tested as a round trip).
    """
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name in drop or v is None:
            continue
        out[f.name] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_table(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


__all__ = ["SECTION_CONFIG", "describe", "field_names", "json_schema", "parse", "section", "to_table"]
