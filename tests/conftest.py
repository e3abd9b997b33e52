"""Shared fixtures: synthetic BIDS datasets written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# nipype must never try the network from the tests.
os.environ.setdefault("NIPYPE_NO_ET", "1")

#: asl001-asl005 (CC0), vendored: always available.
BIDS_EXAMPLES = Path(__file__).resolve().parent / "data" / "bids-examples-asl"
#: The team's full collection beside the checkout, with 2d_mb_pcasl (no license stated).
SHARED_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "bids-examples-asl"


@pytest.fixture(scope="session")
def bids_examples() -> Path:
    """The bids-examples ASL metadata datasets asl001-asl005 (tests/data)."""
    return BIDS_EXAMPLES


@pytest.fixture(scope="session")
def hcp_aging_example() -> Path:
    """bids-examples' 2d_mb_pcasl from ../shared (skipped when absent)."""
    path = SHARED_EXAMPLES / "2d_mb_pcasl"
    if not path.is_dir():
        pytest.skip("../shared/bids-examples-asl is not available in this checkout")
    return path
