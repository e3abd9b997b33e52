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
    ``unpaired`` lists the control and label volumes that found no partner and are left out.
    """

    control: tuple[int, ...]
    label: tuple[int, ...]
    unpaired: tuple[int, ...] = ()

    @property
    def n_volumes(self) -> int:
        """Number of ΔM volumes."""
        return len(self.control)

    @property
    def source(self) -> tuple[int, ...]:
        """Index of the volume whose timing (PLD, τ) each ΔM volume takes: its control."""
        return self.control


def _slot_pairs(context: Sequence[str]) -> list[tuple[int, int]]:
    """(control, label) pairs of the series' slots (0, 1), (2, 3), ... that hold one of each.

    Every volume takes a slot, an m0scan included: a Siemens 3D PCASL acquires its M0 in the
    first label slot, so the control beside it is the one without a partner.
    """
    pairs = []
    for first in range(0, len(context) - 1, 2):
        kinds = (context[first], context[first + 1])
        if sorted(kinds) == ["control", "label"]:
            control = first if kinds[0] == "control" else first + 1
            pairs.append((control, 2 * first + 1 - control))
    return pairs


def _adjacent_pairs(context: Sequence[str]) -> list[tuple[int, int]]:
    """(control, label) pairs of neighbouring volumes of opposite type, in acquisition order.

    Walks the control and label volumes once (other types in between are skipped): two
    neighbours of opposite type make a pair; a volume whose next neighbour has its own type
    has no partner.
    """
    volumes = [(i, kind) for i, kind in enumerate(context) if kind in ("control", "label")]
    pairs, i = [], 0
    while i + 1 < len(volumes):
        (first, kind), (second, other) = volumes[i], volumes[i + 1]
        if kind != other:
            pairs.append((first, second) if kind == "control" else (second, first))
            i += 2
        else:
            i += 1
    return pairs


def plan_subtraction(context: Sequence[str]) -> Subtraction:
    """Pair controls with labels from an aslcontext.

    - As many controls as labels: the i-th control is paired with the i-th label, which
      handles control-first, label-first and blocked series (and interleaved noRF/m0scan
      volumes) alike.
    - Unequal numbers (a Siemens 3D PCASL puts its M0 in the first label slot; a series can be
      cut short), the first of these that forms as many pairs as the shorter type allows:
      the acquisition's slots (volumes 0-1, 2-3, ... holding a control and a label; an
      m0scan takes a slot); neighbouring control and label volumes in acquisition order; for
      a blocked series (all controls, then all labels), the i-th control with the i-th label.
      The volumes left without a partner are listed in ``unpaired``.

    ``deltam`` volumes join the series in their acquisition position.
    """
    controls = [i for i, kind in enumerate(context) if kind == "control"]
    labels = [i for i, kind in enumerate(context) if kind == "label"]
    deltams = [i for i, kind in enumerate(context) if kind == "deltam"]
    pairs = list(zip(controls, labels, strict=False))
    if len(controls) != len(labels):
        pairs = next(
            (
                candidate
                for candidate in (_slot_pairs(context), _adjacent_pairs(context))
                if len(candidate) == len(pairs)
            ),
            pairs,
        )
    paired = {i for pair in pairs for i in pair}
    unpaired = tuple(i for i in sorted(controls + labels) if i not in paired)
    entries = [(min(c, lab), c, lab) for c, lab in pairs]
    entries += [(d, d, -1) for d in deltams]
    entries.sort()
    return Subtraction(
        control=tuple(e[1] for e in entries),
        label=tuple(e[2] for e in entries),
        unpaired=unpaired,
    )


def subtract(series: NDArray, plan: Subtraction) -> NDArray[np.float32]:
    """Return the ΔM series (X, Y, Z, N) from a 4D series and a :class:`Subtraction`."""
    control = np.asarray(plan.control)
    label = np.asarray(plan.label)
    paired = label >= 0
    out = np.empty((*series.shape[:3], plan.n_volumes), dtype=np.float32)
    out[..., paired] = series[..., control[paired]] - series[..., label[paired]]
    out[..., ~paired] = series[..., control[~paired]]
    return out


def timeseries_sources(context: Sequence[str]) -> list[tuple[int, ...]]:
    """The source volumes of each volume of the CBF time series, in its order.

    The CBF series holds one volume per ΔM volume of :func:`plan_subtraction` (a pair: its
    control and label; a ``deltam`` volume: itself) and one per ``cbf`` volume, ordered by the
    index of the control (or of the volume itself), as
    :class:`aslprep_lite.interfaces.cbf.ComputeCBF` orders them.

    Returns
    -------
    list of tuple of int
        For each CBF volume, the 0-based indices of the series volumes it was made from.
    """
    plan = plan_subtraction(context)
    entries = [
        (control, (control, label) if label >= 0 else (control,))
        for control, label in zip(plan.control, plan.label, strict=True)
    ]
    entries += [(i, (i,)) for i, kind in enumerate(context) if kind == "cbf"]
    # a stable sort on the first index, as ComputeCBF's argsort(kind="stable")
    return [sources for _, sources in sorted(entries, key=lambda entry: entry[0])]
