"""What every metaad app does around its work: Hydra, one clean error message, no empty run folder.

A mistake in the config, the data or a checkpoint stops the app with one block on stderr, the
message that names the file, field or setting, and exit status 1; no traceback (set
``HYDRA_FULL_ERROR=1`` for it). Any other exception is a bug and keeps its traceback. A run that
fails at start-up (before it wrote a checkpoint, metrics or scores) leaves no run folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaad.data.errors import DataError
from metaad.errors import Interrupted, MetaadError

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


def app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@app("train")`` makes ``fn(cfg)`` a Hydra app on ``conf/<config_name>.yaml`` with clean errors."""

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            run_dir = _run_dir()
            fresh = run_dir is not None and _only_logs(run_dir)
            _report_thread_write_faults(config_name, run_dir)
            try:
                return fn(cfg)
            except Interrupted as stop:
                if int(os.environ.get("LOCAL_RANK", "0")) > 0:
                    sys.exit(0)  # a DDP rank stopped with the first rank, which says it, once
                print(f"metaad-{config_name}: {stop}", file=sys.stderr)
                sys.exit(stop.exit_status)
            except Exception as error:
                text = message(error, run_dir)
                if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if fresh and not _holds_results(run_dir):
                    shutil.rmtree(run_dir, ignore_errors=True)
                if text not in _SAID:  # a writer thread may have said it already
                    print(f"metaad-{config_name}: error: {text}", file=sys.stderr)
                print("(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
                sys.exit(1)

        return hydra.main(version_base="1.3", config_path="pkg://metaad.conf", config_name=config_name)(task)

    return decorate


_SAID: set[str] = set()


def _report_thread_write_faults(config_name: str, run_dir: Path | None) -> None:
    """A background writer (TensorBoard's event file thread) that hits a full disk says so in one
    line, as the app's own errors do, instead of a thread's traceback."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        text = message(args.exc_value, run_dir) if args.exc_value is not None else None
        if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return default(args)
        if text not in _SAID:
            print(f"metaad-{config_name}: error: {text}", file=sys.stderr)
            _SAID.add(text)

    threading.excepthook = hook


def _run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def _holds_results(folder: Path) -> bool:
    """Whether a run got as far as writing checkpoints or metrics (then its folder is kept)."""
    return any((folder / name).exists() for name in ("checkpoints", "metrics.json", "scores.csv"))


def _only_logs(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but log files (what Hydra writes before the app starts)."""
    if not folder.is_dir():
        return False
    return all(p.is_file() and p.suffix == ".log" for p in folder.iterdir())


class RunFolderCheck(Callback):
    """Makes the run (or sweep) folder before Hydra does, so that one it cannot make or write in
    is metaad's one-line message (exit 1) instead of a traceback from Hydra's folder or log file
    creation. Folders made here for a refused run are removed again (only those, and only empty)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        folder = Path(str(OmegaConf.select(config, key))).absolute()
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
            if blocking is not None:
                raise NotADirectoryError(0, f"{blocking} is a file, not a folder")
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):  # what Hydra's log file needs next
                pass
        except OSError as error:
            for path in made:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()
            app = OmegaConf.select(config, "hydra.job.config_name") or "app"
            why = error.strerror or str(error)
            print(
                f"metaad-{app}: error: {key}={folder}: cannot make or write in the run folder ({why}); "
                f"give a {key} where you can write",
                file=sys.stderr,
            )
            sys.exit(1)
