"""Shared fixtures: paths to the read-only data in ../shared (present in CI, absent on a user's machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FSDD = SHARED / "data" / "fsdd"


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    """The Free Spoken Digit Dataset beside the checkout; skip when it is not there."""
    if not (FSDD / "recordings").is_dir():
        pytest.skip(f"FSDD not found at {FSDD} (CI provides ../shared/data/fsdd; users pass their own path)")
    return FSDD
