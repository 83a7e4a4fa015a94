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

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from metaad.apps.messages import message
from metaad.apps.sweeps import record_refusal


def app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@app("train")`` makes ``fn(cfg)`` a Hydra app on ``conf/<config_name>.yaml`` with clean errors."""

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            run_dir = _run_dir()
            before = _entries_before(run_dir) if run_dir is not None else UNKNOWN
            try:
                _check_config_files(cfg)
                return fn(cfg)
            except Exception as error:
                text = message(error)
                if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if run_dir is not None:
                    _remove_what_this_run_created(run_dir, before)
                record_refusal(text)
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
    """Records, before Hydra creates them, whether the run folder (or the sweep folder and its job
    folders) existed and what they held, so a failed start can remove exactly what it created."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _record([_pin(config.hydra.run, "dir")])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _pin(config.hydra.sweep, "dir")
        children = [p for p in sweep.iterdir() if p.is_dir()] if sweep.is_dir() else []
        _record([sweep, *children])


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


def _remove_what_this_run_created(run_dir: Path, before: list[str] | None | str) -> None:
    if before == UNKNOWN or not run_dir.is_dir() or _holds_results(run_dir):
        return
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():  # a folder that existed: only the logs this run added
        if entry.name not in before and entry.is_file() and entry.suffix == ".log":
            entry.unlink(missing_ok=True)
