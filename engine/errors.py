"""Exceptions that carry a message for the user: what is wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with status 2."""


class JobSpecError(UserError, ValueError):
    """A job specification that cannot be run as written."""


class VolumeError(UserError, ValueError):
    """A volume, label map or RoI mask that cannot be read or does not fit its patient."""


class ModelError(UserError, ValueError):
    """A model that cannot be loaded or does not produce what the job expects."""


class QueryError(UserError, ValueError):
    """A named query, its parameters or an ad-hoc SQL statement that cannot be run."""


def check_keys(section: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Refuse keys a table does not know, naming the closest known key for each typo.

    ``section`` names the table as the user wrote it, e.g. ``"[preprocess]"``.
    """
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    close = [f"{m[0]!r} for {k!r}" for k in unknown if (m := difflib.get_close_matches(k, known, 1))]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise JobSpecError(f"{section} has unknown key(s) {unknown}{hint}; allowed keys are {known}")
