"""Reading nipype's crash files: the one-line reason each failed processing step gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: Write errors that mean the disk (or the user's quota, or a file-size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # errno values are ints


def crash_messages(crash_dir: Path) -> dict[str, str]:
    """Map nipype node paths to the one-line reason they failed, from the crash files.

    Parameters
    ----------
    crash_dir : Path
        The directory nipype wrote its text crash files (``crash-*.txt``) into.

    Returns
    -------
    dict[str, str]
        For each crash file, the failed node's path (its ``Node:`` line) mapped to the reason:
        the message of an ``AslprepError``, a full-disk explanation naming the working
        directory, or else the last error line followed by ``(details: <crash file>)``.
    """
    messages = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        header = dict(line.split(":", 1) for line in text.splitlines()[:3] if line.count(":") >= 1)
        node = header.get("Node", "").strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next(
            (line for line in reversed(lines) if "Error" in line.split(":", 1)[0]), lines[-1]
        )
        prefix = "aslprep_lite.errors.AslprepError:"
        full_disk = next((e for e in DISK_FULL if f"[Errno {e}]" in reason), None)
        if reason.startswith(prefix):
            reason = reason[len(prefix) :].strip()
        elif full_disk is not None:
            where = header.get("Working directory", "").strip() or str(crash.parent)
            reason = (
                f"{where}: cannot write ({os.strerror(full_disk)}): free space on that "
                "disk, or give -w (and OUTPUT_DIR) on one with room"
            )
        else:
            reason = f"{reason} (details: {crash})"
        messages[node] = reason
    return messages
