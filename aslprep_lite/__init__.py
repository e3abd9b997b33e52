"""aslprep_lite: arterial spin labeling MRI to calibrated cerebral blood flow, as a BIDS-App."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aslprep_lite")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
