"""Workflows of one ASL run: fit (head motion, reference, M0, mask), confounds, CBF, outputs."""
