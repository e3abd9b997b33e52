"""Label-control subtraction.

ΔM = control − label (the BIDS convention: "the deltaM = control − label subtraction should
result in a perfusion-weighted image with a positive sign"). Pairs come from the aslcontext,
in either order; ``noRF`` and ``n/a`` volumes are never used; ``deltam`` volumes are passed
through; ``cbf`` volumes are handled by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Volume types a BIDS aslcontext.tsv may hold.
VOLUME_TYPES = ("control", "label", "m0scan", "deltam", "cbf", "noRF", "n/a")


@dataclass(frozen=True)
class Subtraction:
    """Which source volumes make each ΔM volume, in acquisition order.

    ``control[i]`` and ``label[i]`` are the indices of the pair that makes ΔM volume ``i``, or
    both equal to the index of a ``deltam`` volume passed through (``label[i] == -1``).
    """

    control: tuple[int, ...]
    label: tuple[int, ...]

    @property
    def n_volumes(self) -> int:
        """Number of ΔM volumes."""
        return len(self.control)

    @property
    def source(self) -> tuple[int, ...]:
        """Index of the volume whose timing (PLD, τ) each ΔM volume takes: its control."""
        return self.control


def plan_subtraction(context: Sequence[str]) -> Subtraction:
    """Pair controls with labels from an aslcontext.

    The i-th control is paired with the i-th label, which handles control-first and
    label-first series (and interleaved noRF/m0scan volumes) alike. ``deltam`` volumes join the
    series in their acquisition position.

    Raises
    ------
    ValueError
        Unequal numbers of controls and labels.
    """
    controls = [i for i, kind in enumerate(context) if kind == "control"]
    labels = [i for i, kind in enumerate(context) if kind == "label"]
    deltams = [i for i, kind in enumerate(context) if kind == "deltam"]
    if len(controls) != len(labels):
        raise ValueError(
            f"{len(controls)} control and {len(labels)} label volumes: they must pair up"
        )
    entries = [(min(c, lab), c, lab) for c, lab in zip(controls, labels, strict=True)]
    entries += [(d, d, -1) for d in deltams]
    entries.sort()
    return Subtraction(control=tuple(e[1] for e in entries), label=tuple(e[2] for e in entries))


def subtract(series: NDArray, plan: Subtraction) -> NDArray[np.float32]:
    """Return the ΔM series (X, Y, Z, N) from a 4D series and a :class:`Subtraction`."""
    control = np.asarray(plan.control)
    label = np.asarray(plan.label)
    paired = label >= 0
    out = np.empty((*series.shape[:3], plan.n_volumes), dtype=np.float32)
    out[..., paired] = series[..., control[paired]] - series[..., label[paired]]
    out[..., ~paired] = series[..., control[~paired]]
    return out
