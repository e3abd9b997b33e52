"""The per-participant HTML report and the status record of its runs.

:mod:`~aslprep_lite.reports.status` decides and writes what happened to each run
(``logs/sub-<label>_runs.json``); :mod:`~aslprep_lite.reports.figures` draws the figures
(matplotlib, Agg, deterministic PNGs); :mod:`~aslprep_lite.reports.participant` reads what a
participant-level run left on disk and assembles ``sub-<label>.html``. Everything is read from
the output and input folders, so a report can be written for failed runs too.
"""
