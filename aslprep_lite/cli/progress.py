"""Progress lines of a participant-level run: one line per stage and run as it completes.

nipype calls the plugin's ``status_callback`` with each node and ``"start"``, ``"end"`` or
``"exception"`` (cached nodes report ``"end"`` too). :class:`Progress` groups the graph's nodes
by run and stage, and when the last node of a stage ends it logs the stage and the time elapsed.
Once a run (or participant's anatomy) is complete and others remain, the line also gives the
time left, estimated as the mean time per completed item times the items left: node counts are
no guide, since one registration node outlasts ten quantification nodes. The lines go through
the ``aslprep_lite`` logger at INFO, so ``-q`` silences them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

LOGGER = logging.getLogger("aslprep_lite")

#: What each stage of a run (``workflows.asl.base.STAGES``) and the anatomy is called in a line.
STAGE_NAMES = {
    "anat_wf": "anatomy",
    "hmc_wf": "head motion",
    "coreg_wf": "coregistration",
    "m0_wf": "M0",
    "cbf_wf": "CBF",
    "confounds_wf": "confounds",
    "qc_wf": "quality control",
    "spaces_wf": "output spaces",
    "outputs_wf": "derivatives",
}


def stage_of(node_name: str, run_labels: Mapping[str, str]) -> tuple[str, str] | None:
    """``(run or participant label, stage)`` of a node's dotted name, or None.

    Parameters
    ----------
    node_name
        The node's full dotted name (``aslprep_lite_wf.sub_01_wf.asl_…_wf.cbf_wf.quantify``).
    run_labels
        Workflow name of each run and participant (``asl_…``, ``sub_01_wf``) → its label.
    """
    parts = node_name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("asl_") and part in run_labels:
            inner = parts[i + 1 : -1]
            return run_labels[part], inner[0] if inner else "load"
        if part == "anat_wf" and i > 0 and parts[i - 1] in run_labels:
            return run_labels[parts[i - 1]], "anat_wf"
    return None


class Progress:
    """nipype ``status_callback`` logging a line each time a stage of a run is complete.

    Parameters
    ----------
    node_names
        Every node of the graph, by full dotted name.
    run_labels
        Workflow name of each run and participant → the label the lines use.
    clock
        Seconds, monotonic (a parameter so that tests can drive it).
    """

    def __init__(
        self,
        node_names: Iterable[str],
        run_labels: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._labels = dict(run_labels)
        self._clock = clock
        self._start = clock()
        self._left: dict[tuple[str, str], set[str]] = {}
        for name in node_names:
            key = stage_of(name, self._labels)
            if key is not None:
                self._left.setdefault(key, set()).add(name)
        self._items = {label for label, _ in self._left}
        self._complete: set[str] = set()

    def __call__(self, node, status: str) -> None:
        """Record ``node``'s ``status``; log a line when it completes (or fails) a stage."""
        name = node.fullname
        key = stage_of(name, self._labels)
        if key is None or name not in self._left.get(key, ()):
            return  # a MapNode's sub-node, or a node outside the runs
        label, stage = key
        what = STAGE_NAMES.get(stage, stage)
        elapsed = self._clock() - self._start
        if status == "exception":
            LOGGER.info("[%s] %s: %s failed", _clock_text(elapsed), label, what)
            return
        if status != "end":
            return
        self._left[key].discard(name)
        if self._left[key]:
            return
        estimate = ""
        if not any(left for (item, _), left in self._left.items() if item == label):
            self._complete.add(label)
            remaining = len(self._items) - len(self._complete)
            if remaining:
                per_item = elapsed / len(self._complete)
                estimate = f"; {remaining} to go, about {_clock_text(per_item * remaining)} left"
        LOGGER.info("[%s] %s: %s done%s", _clock_text(elapsed), label, what, estimate)


def _clock_text(seconds: float) -> str:
    """``"42 s"`` or ``"3 min 05 s"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"
