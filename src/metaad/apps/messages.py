"""The one line an expected error becomes on the command line (metaad's own errors, Hydra's and
Lightning's word for a bad setting); None marks a bug, which keeps its traceback."""

from __future__ import annotations

import errno
from pathlib import Path

from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from metaad.data.errors import DataError
from metaad.errors import MetaadError

EXPECTED = (MetaadError, DataError, FileNotFoundError, IsADirectoryError, PermissionError)


def _expected(error: BaseException | None) -> bool:
    """metaad's own errors, and Lightning's word for a trainer setting it cannot use (matched by name,
    so that this module imports no Lightning)."""
    return isinstance(error, EXPECTED) or any(
        kind.__name__ == "MisconfigurationException" for kind in type(error).__mro__
    )


# a full disk, a file size limit (ulimit -f), a quota, a read-only file system: the machine's, not a bug
WRITE_FAULTS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def message(error: BaseException, run_dir: Path | None = None) -> str | None:
    """The user-facing message of an expected error, or None for a bug."""
    if isinstance(error, OSError) and error.errno in WRITE_FAULTS:
        what = error.filename or (f"a file in the run folder {run_dir}" if run_dir else "a file")
        return (
            f"cannot write {what}: {error.strerror} (a full disk, a file size limit such as ulimit -f, "
            "a quota or a read-only file system); free space or give another hydra.run.dir, then rerun"
        )
    if isinstance(error, InstantiationException):
        cause = error.__cause__
        if not (_expected(cause) or isinstance(cause, ValueError | TypeError)):
            return None
        key = next(
            (line.split(":", 1)[1].strip() for line in str(error).splitlines() if "full_key:" in line), ""
        )
        target = str(error).splitlines()[0].removeprefix("Error in call to target ").rstrip(":")
        return f"{key + ': ' if key else ''}{cause} (building {target})"
    if _expected(error) or isinstance(error, OmegaConfBaseException | ConfigCompositionException):
        return str(error)
    return None
