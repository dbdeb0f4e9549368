"""Shared fixtures: where the real data lies, and how to skip when it is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real lesion data lives there, beside the checkout)")
    return SHARED_DATA
