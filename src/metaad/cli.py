"""What every metaad app does around its work: Hydra, one clean error message, no empty run folder.

A mistake in the config, the data or a checkpoint stops the app with one block on stderr, the
message that names the file, field or setting, and exit status 1; no traceback (set
``HYDRA_FULL_ERROR=1`` for it). Any other exception is a bug and keeps its traceback. A run that
fails at start-up (before it wrote a checkpoint, metrics or scores) leaves no run folder behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from metaad.data.errors import DataError
from metaad.errors import MetaadError
from metaad.sweeps import record_refusal

EXPECTED = (MetaadError, DataError, FileNotFoundError, IsADirectoryError, PermissionError)


def _expected(error: BaseException | None) -> bool:
    """metaad's own errors, and Lightning's word for a trainer setting it cannot use (matched by name,
    so that this module imports no Lightning)."""
    return isinstance(error, EXPECTED) or any(
        kind.__name__ == "MisconfigurationException" for kind in type(error).__mro__
    )


def message(error: BaseException) -> str | None:
    """The user-facing message of an expected error, or None for a bug."""
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
            try:
                return fn(cfg)
            except Exception as error:
                text = message(error)
                if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if fresh and not _holds_results(run_dir):
                    shutil.rmtree(run_dir, ignore_errors=True)
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
