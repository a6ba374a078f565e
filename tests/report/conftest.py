"""Shared fixtures for the report tests: one small real store per session (see ``_small_store``)."""

from __future__ import annotations

import pytest

from tests.report._small_store import SmallStore, small_store


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SmallStore:
    """A store with one engine run of 4 phantoms (+1 failed), anomaly scores and an audit."""
    return small_store(tmp_path_factory)
