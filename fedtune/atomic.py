"""The one atomic file writer: every file fedtune writes is swapped in whole, or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace_atomically(path: Path, write: Callable[[Path], object], *, mode: int | None = None,
                       exclusive: bool = False) -> Path:
    """Have `write` fill a temp file beside `path`, then swap it in; on failure `path` is untouched.

    `mode`: the file's exact permission bits (0o600 for a private key); its temp file is owner-only
    from its creation on, so no other user can open it while it is written. Without it, the usual
    umask applies (or what `write` itself sets: safetensors' save_file makes 0600 files).
    `exclusive`: never replace an existing `path` (FileExistsError), as for a key that must not be lost.
    """
    # Same folder, so the swap is a rename within one filesystem (atomic); the leading dot keeps
    # the temp file out of casual listings if the process is killed before cleanup.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # O_EXCL: a name planted in the folder (a symlink to elsewhere) is never written through.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600))
        write(tmp)
        # Flushed to disk before the rename, or a power cut could leave the new name on empty data.
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # exact bits, whatever the umask or `write` did
        if exclusive:
            os.link(tmp, path)  # unlike a rename, fails if `path` exists
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: Path, data: bytes, *, mode: int | None = None, exclusive: bool = False) -> Path:
    """`path` holds exactly `data`, or (on any failure) what it held before."""
    return replace_atomically(path, lambda tmp: tmp.write_bytes(data), mode=mode, exclusive=exclusive)


def write_text_atomically(path: Path, text: str | Callable[[IO[str]], object], *, mode: int | None = None) -> Path:
    """`path` holds `text` (or what the callable writes to the open file), UTF-8, line endings as given."""

    def fill(tmp: Path) -> None:
        # newline="": the csv module writes its own line endings; nothing else is translated either.
        with open(tmp, "w", encoding="utf-8", newline="") as file:
            if isinstance(text, str):
                file.write(text)
            else:
                text(file)

    return replace_atomically(path, fill, mode=mode)
