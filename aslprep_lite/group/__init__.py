"""The group level: QC table with outlier flags, group CBF maps and ``group.html``.

:mod:`~aslprep_lite.group.inputs` finds and reads the participant level's outputs,
:mod:`~aslprep_lite.group.table` scores the runs (statistics in
:mod:`aslprep_lite.quant.group`), :mod:`~aslprep_lite.group.maps` averages the template
maps, :mod:`~aslprep_lite.group.figures` and :mod:`~aslprep_lite.group.report` draw the page
and :mod:`~aslprep_lite.group.run` writes everything at once.
"""

from aslprep_lite.group.run import run_group

__all__ = ["run_group"]
