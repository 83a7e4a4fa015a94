"""Writing files so that no reader ever sees half of one, and telling whether the process behind a
lock or a half-built folder is still running: what every layer that writes needs, once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` beside ``path``, flushed to disk, then renamed onto it: a kill, a full disk
    or a file-size limit leaves ``path`` as it was (or absent) and no temporary behind. The
    ``OSError`` is the caller's to name (which file, in which role)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
