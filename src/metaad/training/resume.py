"""Resume after a crash: checkpoint generations written atomically, and ``ckpt_path=last`` resolved.

A resumed run continues in its own folder (``hydra.run.dir=<run folder> ckpt_path=last``): the
step count, optimizer, loops and episode stream come from the checkpoint (the training loader is
resumable, see :class:`metaad.data.datamodule.ResumableLoader`) and TensorBoard drops the events
the crashed process wrote after the checkpoint, so the curves continue without a fold.
"""

from __future__ import annotations

import re
import shlex
import signal
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metaad import checkpoint as ckpt
from metaad.errors import CheckpointError, Interrupted

# Config sections that decide what is trained; a resume must not change them.
RUN_DEFINING = ("dataset", "backbone", "model", "seed")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """``last`` is this run folder's ``checkpoints/last.ckpt`` (or, if that one is missing or
    unreadable, the generation before it, with a warning); anything else must be a checkpoint file.
    Leftover ``*.partial`` files of a crashed save are removed."""
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if str(ckpt_path) == "last" else Path(ckpt_path)
    if str(ckpt_path) == "last":
        for leftover in path.parent.glob("*.partial"):
            leftover.unlink()
        path = _readable_generation(path)
    if not path.is_file():
        hint = (
            f"ckpt_path=last resumes the run in the current run folder ({run_dir}); point Hydra at the "
            "crashed run's folder: metaad-train <its overrides> hydra.run.dir=<its folder> ckpt_path=last"
            if str(ckpt_path) == "last"
            else "give the path of a .ckpt file written by metaad-train"
        )
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}. {hint}")
    return path


def _readable_generation(path: Path) -> Path:
    previous = ckpt.previous_of(path)
    if not previous.is_file():
        return path
    try:
        ckpt.load(path)
        return path
    except (CheckpointError, FileNotFoundError) as error:
        warnings.warn(
            f"{path} cannot be resumed from ({error}); resuming from the generation before it, {previous}",
            stacklevel=2,
        )
        return previous


def load_resume_state(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint to resume (plain data, ``weights_only``); refused if trained with another config."""
    checkpoint = ckpt.load(path)
    stored = checkpoint.contents[ckpt.CONFIG]
    now = {key: _plain(cfg.get(key)) for key in RUN_DEFINING}
    changed = _differences({k: stored.get(k) for k in RUN_DEFINING}, now)
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed[:8])
        raise CheckpointError(
            f"ckpt_path={path} was trained with another config ({listed}). Resume with the overrides of "
            "the original run (its .hydra/overrides.yaml); only trainer, callbacks and logger "
            "settings may change."
        )
    return checkpoint.contents


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


# --- stopping on SIGTERM / SIGINT ------------------------------------------------------------------


class SignalStop:
    """SIGTERM and SIGINT (Ctrl+C) while a run is in this block. While training or testing
    (``deferred``, set by :class:`metaad.training.callbacks.StopOnSignal`) the first one is noted and the
    loop stops at the next step's end, with ``last.ckpt`` written there; anywhere else, or at a
    second signal, the run stops at once. Either way :class:`Interrupted` comes out.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            self._saved = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}
        if self.signum is not None and isinstance(error, SystemExit | KeyboardInterrupt):
            # Lightning's own way out after a SIGTERM (SIGTERMException, a SystemExit of status 0)
            raise Interrupted(self.signum) from None
        return False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if self.deferred:
                return
        raise Interrupted(self.signum)


def command_line(app: str, run_dir: Path, *extra: str) -> str:
    """The shell command that reruns this Hydra run of ``app`` in ``run_dir`` with ``extra``
    overrides: the run's own overrides as given, every word quoted for the shell where needed."""
    from hydra.core.hydra_config import HydraConfig

    replaced = ("hydra.run.dir", *(e.split("=", 1)[0] for e in extra))
    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in given if o.lstrip("+~").split("=", 1)[0] not in replaced]
    return shlex.join([app, *kept, f"hydra.run.dir={hydra_value(str(run_dir))}", *extra])


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as is when Hydra reads it back unchanged, else quoted."""
    if re.fullmatch(r"[\w/.@%+\- ]+", text) and text == text.strip():
        return text
    return "'" + text.replace("'", "\\'") + "'"
