"""What every metaad app does around its work: Hydra, one clean error message, no empty run folder.

A mistake in the config, the data or a checkpoint stops the app with one block on stderr, the
message that names the file, field or setting, and exit status 1; no traceback (set
``HYDRA_FULL_ERROR=1`` for it). Any other exception is a bug and keeps its traceback.

A run that fails at start-up (before it wrote a checkpoint, metrics or scores) removes only what it
created: its run folder if the folder did not exist before Hydra started (recorded by
:class:`RecordRunFolders`, a Hydra callback, before Hydra makes the folder), else only the log files
it added to a folder that existed. Where it cannot tell, it removes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from metaad.apps.messages import message
from metaad.apps.sweeps import record_refusal
from metaad.errors import Interrupted


def app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@app("train")`` makes ``fn(cfg)`` a Hydra app on ``conf/<config_name>.yaml`` with clean errors."""

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            run_dir = _run_dir()
            before = _entries_before(run_dir) if run_dir is not None else UNKNOWN
            _report_thread_write_faults(config_name, run_dir)
            try:
                _check_config_files(cfg)
                result = fn(cfg)
                if run_dir is not None:
                    _remove_if_unused(run_dir, before)
                return result
            except Interrupted as stop:
                if int(os.environ.get("LOCAL_RANK", "0")) > 0:
                    sys.exit(0)  # a DDP rank stopped with the first rank, which says it, once
                print(f"metaad-{config_name}: {stop}", file=sys.stderr)
                sys.exit(stop.exit_status)
            except Exception as error:
                text = message(error, run_dir)
                if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if run_dir is not None:
                    _remove_what_this_run_created(run_dir, before)
                record_refusal(text)
                if text not in _SAID:  # a writer thread may have said it already
                    print(f"metaad-{config_name}: error: {text}", file=sys.stderr)
                print("(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
                sys.exit(1)

        hydra_main = hydra.main(version_base="1.3", config_path="pkg://metaad.conf", config_name=config_name)

        @functools.wraps(fn)
        def main() -> Any:
            check_override_syntax(config_name, sys.argv[1:])
            return hydra_main(task)()

        return main

    return decorate


def check_override_syntax(config_name: str, argv: list[str]) -> None:
    """An override Hydra cannot parse (``dataset.k_shot=5,``) is one line naming it, before Hydra starts."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args, _ = get_args_parser().parse_known_args(argv)
    for text in args.overrides or []:
        try:
            OverridesParser.create().parse_overrides([text])
        except OverrideParseException as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            key, _, value = text.partition("=")
            empty = "," in value and "" in [part.strip() for part in value.split(",")]
            why = (
                f"a sweep value is empty (a comma with nothing on one side); list values as {key}=a,b"
                if empty
                else f"{str(error).splitlines()[0]} (quote a value with special characters: {key}='...')"
            )
            text = f"the override {text!r} cannot be read: {why}"
            print(f"metaad-{config_name}: error: {text}", file=sys.stderr)
            sys.exit(1)


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


def _check_config_files(cfg: DictConfig) -> None:
    """A config composed from files outside metaad's package (``--config-dir``, e.g. a run folder's
    stored ``.hydra/config.yaml``) builds only the targets metaad's own configs name."""
    from hydra.core.hydra_config import HydraConfig

    from metaad.checkpoint import check_targets
    from metaad.errors import ConfigError

    if not HydraConfig.initialized():
        return
    files = [s.path for s in HydraConfig.get().runtime.config_sources if s.schema == "file"]
    if files:
        app_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        plain = OmegaConf.to_container(app_cfg, resolve=True)
        check_targets(plain, f"the config read from {', '.join(files)}", ConfigError, resolved=True)


def _run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def _holds_results(folder: Path) -> bool:
    """Whether a run got as far as writing checkpoints or metrics (then its folder is kept)."""
    return any((folder / name).exists() for name in ("checkpoints", "metrics.json", "scores.csv"))


# --- what existed before the run: recorded before Hydra makes the run folder ----------------------
RECORD = "METAAD_RUN_FOLDERS_BEFORE"  # environment: inherited by a sweep's job processes
UNKNOWN = "unknown"


class RecordRunFolders(Callback):
    """Before Hydra makes the run folder (or the sweep folder): records whether it existed and what
    it held, so a failed start can remove exactly what it created, then makes it and checks it can
    write there, so a folder it cannot make or write in is one line (exit 1) instead of a traceback
    from Hydra's folder or log file creation (folders made for a refused run are removed again)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _pin(config.hydra.run, "dir")
        _record([folder])
        _check_writable(config, folder, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _pin(config.hydra.sweep, "dir")
        children = [p for p in sweep.iterdir() if p.is_dir()] if sweep.is_dir() else []
        _record([sweep, *children])
        _check_writable(config, sweep, "hydra.sweep.dir")


def _check_writable(config: DictConfig, folder: Path, key: str) -> None:
    folder = folder.absolute()
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


def _pin(node: DictConfig, key: str) -> Path:
    """Resolve ``node[key]`` once (``${now:...}`` would give another second later) and keep it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # ${hydra:...} in the path resolves through it (run_job sets it too)
        HydraConfig.instance().set_config(node._get_root())
    value = str(node[key])
    with read_write(node):
        node[key] = value
    return Path(value)


def _record(folders: list[Path]) -> None:
    os.environ[RECORD] = json.dumps(
        {str(f.absolute()): sorted(p.name for p in f.iterdir()) if f.is_dir() else None for f in folders}
    )


def _entries_before(run_dir: Path) -> list[str] | None | str:
    """The names ``run_dir`` held before the run (None: it did not exist; UNKNOWN: not recorded)."""
    try:
        record = json.loads(os.environ.get(RECORD, "{}"))
    except ValueError:
        return UNKNOWN
    key, parent = str(run_dir.absolute()), str(run_dir.absolute().parent)
    if key in record:
        return record[key]
    if parent in record:  # a sweep's job folder: absent from the sweep folder's listing -> new
        listing = record[parent]
        return None if listing is None or run_dir.name not in listing else UNKNOWN
    return UNKNOWN


def _remove_if_unused(run_dir: Path, before: list[str] | None | str) -> None:
    """A run folder this run made and left holding nothing but empty log files (``metaad-score
    output=scores.csv`` writes its table elsewhere) is removed, so every run does not leave one."""
    if before is not None or not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(e.is_file() and e.suffix == ".log" and e.stat().st_size == 0 for e in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def _remove_what_this_run_created(run_dir: Path, before: list[str] | None | str) -> None:
    if before == UNKNOWN or not run_dir.is_dir() or _holds_results(run_dir):
        return
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():  # a folder that existed: only the logs this run added
        if entry.name not in before and entry.is_file() and entry.suffix == ".log":
            entry.unlink(missing_ok=True)
