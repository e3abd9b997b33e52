"""Numbers computed inside the nipype interfaces (beyond the quant/ equations they call)."""

from __future__ import annotations

import numpy as np

from aslprep_lite.interfaces.m0 import _included_m0


def test_included_m0_volumes_with_different_trs():
    """Each m0scan volume is brought to the longest TR's saturation before averaging."""
    m0 = np.full((2, 2, 2), 1000.0)
    recovered_at_2s = 1.0 - np.exp(-2.0 / 1.607)  # grey-matter T1 at 3 T: 0.71203
    series = np.stack([m0 * recovered_at_2s, m0, np.zeros_like(m0)], axis=3)
    plan = {
        "context": ["m0scan", "m0scan", "control"],
        "repetition_time": [2.0, 8.0, 4.0],
        "field_strength": 3.0,
    }
    mean, trs = _included_m0(series, plan)
    assert trs == [2.0, 8.0]
    # TR 8 s is fully relaxed (>= 5 s): both volumes become 1000, not (712 + 1000) / 2
    np.testing.assert_allclose(mean, 1000.0, rtol=1e-12)
    # equal TRs: a plain mean, left for the shared correction of that TR
    plan["repetition_time"] = [4.0, 4.0, 4.0]
    mean, _ = _included_m0(np.stack([m0, m0 * 0.5, m0], axis=3), plan)
    np.testing.assert_allclose(mean, 750.0)
