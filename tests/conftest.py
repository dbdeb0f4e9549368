"""Shared fixtures: where the real data lies, and how to skip when it is absent."""

from pathlib import Path

import pytest

__all__ = ["shared_data"]

_REPO = Path(__file__).resolve().parents[1]
_SHARED_DATA = (_REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip with a reason when absent."""
    if not _SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real lesion data lives there, beside the checkout)")
    return _SHARED_DATA
