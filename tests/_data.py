"""Locating the shared test data (never copied into the repository).

The data lives next to the repository, in ``<repo>/../shared/data``; set
``AGG2EXP_SHARED_DATA`` to use another folder.  Tests that need it skip with a reason
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared data folder (may not exist)."""
    env = os.environ.get("AGG2EXP_SHARED_DATA")
    return (Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data").resolve()


def totalseg_dir() -> Path:
    """``<shared data>/totalsegmentator``, or skip the test when it is missing."""
    d = shared_data() / "totalsegmentator"
    if not (d / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {d} (set AGG2EXP_SHARED_DATA to the folder holding totalsegmentator/)")
    return d
