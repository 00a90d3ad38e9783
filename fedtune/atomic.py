"""The one atomic file writer: every file fedtune writes is swapped in whole, or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Have `write` fill a temp file beside `path`, then swap it in; on failure `path` is untouched."""
    # Same folder, so os.replace is a rename within one filesystem (atomic); the leading dot keeps
    # the temp file out of casual listings if the process is killed before cleanup.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        # Flushed to disk before the rename, or a power cut could leave the new name on empty data.
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
