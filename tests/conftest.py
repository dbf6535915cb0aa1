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


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny models are faster (and identical) without OpenMP barriers,
    especially when the cores are shared; torchrun also gives each worker one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
