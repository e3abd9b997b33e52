"""BIDS input and output: discovery, validation, derivatives naming.

- :mod:`.files`: readers of sidecars, ``aslcontext.tsv`` and NIfTI headers;
- :mod:`.discovery`: a subject's ASL runs, M0 scans and T1w images (pybids);
- :mod:`.validation`: one ASL run's metadata checked into an :class:`.asl_run.AslRun`;
- :mod:`.derivatives`: the one specification of the files a run writes;
- :mod:`.summary`: the ``--dry-run`` plan of a run.
"""
