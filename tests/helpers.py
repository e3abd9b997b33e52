"""Small helpers shared by the test modules."""

from __future__ import annotations

import json
from pathlib import Path


def edit_sidecar(path: Path, **changes) -> None:
    """Set fields of a JSON sidecar; a value of None removes the field."""
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
