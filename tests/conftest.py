"""Shared fixtures: synthetic BIDS datasets written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# nipype must never try the network from the tests.
os.environ.setdefault("NIPYPE_NO_ET", "1")

SHARED_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "bids-examples-asl"


@pytest.fixture(scope="session")
def bids_examples() -> Path:
    """The bids-examples ASL metadata collection in ../shared (skipped when absent)."""
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip("../shared/bids-examples-asl is not available in this checkout")
    return SHARED_EXAMPLES
