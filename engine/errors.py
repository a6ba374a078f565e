"""Exceptions that carry a message for the user: what is wrong and what to do."""

from __future__ import annotations


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
