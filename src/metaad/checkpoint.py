"""The one owner of metaad's checkpoint format: what a checkpoint holds besides Lightning's state,
how it is written (generations, atomically) and read (tensors and plain data only), and the gate
that keeps a file from running code.

``torch.load(weights_only=True)`` only makes unpickling safe; the stored config is then handed to
``hydra.utils.instantiate``, which would build whatever ``_target_`` it names. So nothing read from
a file is built unless every ``_target_`` in it, at any depth, is one metaad itself writes: those of
its own configs (``conf/``, shipped in the package, the optimizers of ``conf/optimizer`` included).
The check runs on the whole config before anything is built; a stored config holds no
interpolations either (metaad stores it resolved), so none can produce a target later.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from metaad.errors import CheckpointError, ConfigError, RunFolderError

# What metaad stores of a run's config: what rebuilds and evaluates the model, nothing of the
# trainer, callbacks or loggers (those are the evaluating run's own).
STORED_SECTIONS = (
    "names",
    "seed",
    "dataset",
    "backbone",
    "model",
    "baselines",
    "threshold",
    "baseline_threshold",
    "ci_over",
)
# Where in a stored config each kind of component may be named: a target is allowed only in its own
# section (a logger is not a model), and only if metaad's configs name it.
SECTION_MODULES = {
    "dataset": ("metaad.data.",),
    "backbone": ("metaad.detectors.backbones.", "metaad.detectors.extractors."),
    "model": ("metaad.detectors.", "torch.optim."),  # model.optimizer: conf/optimizer
    "baselines": ("metaad.detectors.",),
    "threshold": ("metaad.evaluation.thresholds.",),
    "baseline_threshold": ("metaad.evaluation.thresholds.",),
    "names": (),
    "seed": (),
    "ci_over": (),
}

CONFIG, SAMPLE_SHAPE, PREPROCESSING, DATA, THRESHOLD, TASKS = (
    "metaad_config",
    "metaad_sample_shape",
    "metaad_preprocessing",
    "metaad_data",
    "metaad_threshold",
    "metaad_tasks",
)


@functools.cache
def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` in metaad's own config tree (the optimizers are ``conf/optimizer``).

    A learner, backbone or source added as one file plus one config in ``conf/`` is allowed by
    that config; nothing a user's file names is.
    """
    found: set[str] = set()

    def visit(folder: Any) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                visit(entry)
            elif entry.name.endswith(".yaml"):
                found.update(target for _, target in _targets(yaml.safe_load(entry.read_text()) or {}))

    visit(resources.files("metaad.conf"))
    return frozenset(t for t in found if isinstance(t, str))


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` of every ``_target_`` under ``node``, at any depth (lists, ``_args_`` too)."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key or "<top>", node["_target_"]
        for name, value in node.items():
            yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def _interpolations(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _interpolations(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _interpolations(value, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield key


def check_targets(
    config: Any, origin: str, error: type[Exception] = CheckpointError, resolved: bool = False
) -> None:
    """Refuse ``config`` (plain data) if it names a target metaad never writes, or (unless it was
    ``resolved`` just now) holds an interpolation; ``origin`` (a file, ``the config``) starts the message."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    allowed = allowed_targets()
    for key, target in _targets(config):
        section = key.split(".", 1)[0].split("[", 1)[0]
        fits = isinstance(target, str) and target.startswith(SECTION_MODULES.get(section, ("",)))
        if not fits or target not in allowed:
            raise error(
                f"{origin}: {key}._target_ names {target!r}, which metaad never writes there; metaad "
                "builds only its own components (the _target_s of its conf/ folder, each in its own "
                "section), so this config is refused and nothing in it was built"
            )
    for key in [] if resolved else _interpolations(config):
        raise error(
            f"{origin}: {key} holds an interpolation (${{...}}); metaad stores configs resolved, so this "
            "was not written by metaad and is refused"
        )


def stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of a run's resolved config a checkpoint keeps (:data:`STORED_SECTIONS`), as plain
    data; refused at start-up if it names a target a checkpoint may not (it could not be loaded)."""
    # each section resolved where it stands, so interpolations into other sections (paths) resolve
    plain = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in STORED_SECTIONS
        if key in cfg
    }
    check_targets(plain, "the config", ConfigError)
    return plain


def build_learner(cfg: DictConfig, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    """The learner of ``cfg.model`` on a backbone sized for ``sample_shape``, without the optimizer
    (training's, not the learner's)."""
    learner = OmegaConf.masked_copy(cfg.model, [key for key in cfg.model if key != "optimizer"])
    parameters = inspect.signature(get_class(cfg.model._target_)).parameters
    if "backbone" not in parameters:  # a learner on the raw inputs (covariance prior, patch adapter)
        sized = {"sample_shape": list(sample_shape)} if "sample_shape" in parameters else {}
        return instantiate(learner, **sized)
    return instantiate(learner, backbone=instantiate(cfg.backbone, sample_shape=list(sample_shape)))


def build_extractor(cfg: DictConfig) -> torch.nn.Module | None:
    """The frozen feature extractor ``cfg.backbone`` names (a module with ``identity()``, e.g.
    ``backbone=efficientnet_lite0``), or None when the backbone is a trained one (conv4, mlp ...).
    With an extractor, the data are its patch features, computed once (``metaad.data.features``)."""
    backbone = cfg.get("backbone")
    if not backbone or "_target_" not in backbone:
        return None
    if not callable(getattr(get_class(backbone._target_), "identity", None)):
        return None
    return instantiate(backbone)


@dataclass(frozen=True)
class Checkpoint:
    """A metaad checkpoint as read: the checked config and the plain data beside the weights."""

    path: Path
    config: DictConfig
    contents: dict[str, Any]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if SAMPLE_SHAPE not in self.contents:
            raise CheckpointError(
                f"ckpt_path: {self.path} does not record the sample shape its model takes (written by an "
                "older metaad-train); retrain to score with it"
            )
        return tuple(self.contents[SAMPLE_SHAPE])

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        return self.contents.get(PREPROCESSING)

    @property
    def threshold_state(self) -> dict[str, Any] | None:
        return self.contents.get(THRESHOLD)

    @property
    def data(self) -> str | None:
        return self.contents.get(DATA)

    @property
    def tasks(self) -> dict[str, list[str]] | None:
        """The tasks of each split of the run (``train``, ``val``, ``test``)."""
        return self.contents.get(TASKS)

    def learner_state(self) -> dict[str, torch.Tensor]:
        """The learner's own weights (the LightningModule holds it as ``learner``)."""
        if not isinstance(self.contents.get("state_dict"), dict):
            raise CheckpointError(
                f"ckpt_path: {self.path} is not a complete metaad-train checkpoint: it holds no weights"
            )
        return {k.removeprefix("learner."): v for k, v in self.contents["state_dict"].items()}

    def load_weights(self, learner: torch.nn.Module) -> None:
        """The weights into ``learner``; weights that do not fit are a CheckpointError."""
        try:
            learner.load_state_dict(self.learner_state())
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise CheckpointError(
                f"ckpt_path: {self.path}: its weights do not fit the model its config describes "
                f"({first[:200]})"
            ) from None


def contents(
    config: dict[str, Any],
    sample_shape: tuple[int, ...] | None,
    preprocessing: dict[str, Any] | None,
    data: str | None,
    tasks: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """What metaad adds to a checkpoint beside Lightning's state (all plain data)."""
    added: dict[str, Any] = {CONFIG: config}
    if sample_shape is not None:
        added[SAMPLE_SHAPE] = list(sample_shape)
    if preprocessing is not None:
        added[PREPROCESSING] = preprocessing
    if data is not None:
        added[DATA] = data
    if tasks is not None:
        added[TASKS] = tasks
    return added


def load(path: str | Path) -> Checkpoint:
    """A metaad checkpoint (tensors and plain data only), its config checked against the allow-list."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path: {path} is a folder; give a checkpoint file, e.g. "
            f"{path / 'checkpoints' / 'best.ckpt'}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"ckpt_path: {path} is not a checkpoint, or a truncated or corrupt one (not a complete zip "
            "archive, which torch.save writes)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which would run code from the file
        unsafe = "weights only load failed" in str(error).lower()
        why = (
            "it holds objects other than tensors and plain data, and metaad never unpickles those"
            if unsafe
            else "it is not a checkpoint, or it is corrupt"
        )
        raise CheckpointError(f"ckpt_path: {path} cannot be loaded: {why}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        kind = type(error).__name__
        raise CheckpointError(
            f"ckpt_path: {path} cannot be loaded: not a checkpoint, or a truncated or corrupt one ({kind})"
        ) from None
    if not isinstance(checkpoint, dict) or CONFIG not in checkpoint:
        raise CheckpointError(f"ckpt_path: {path} was not written by metaad-train (no '{CONFIG}' in it)")
    stored = checkpoint[CONFIG]
    lacking = [
        key for key in ("dataset", "backbone", "model") if not isinstance(stored, dict) or key not in stored
    ]
    if lacking:
        raise CheckpointError(
            f"ckpt_path: {path} is not a complete metaad-train checkpoint: its {CONFIG} has no {lacking}"
        )
    check_targets(stored, f"ckpt_path: {path}")
    return Checkpoint(path, OmegaConf.create(stored), checkpoint)


# --- writing: generations ---------------------------------------------------------------------
def save_generation(save: Callable[[Path], Any], path: Path) -> None:
    """Write a checkpoint with ``save(file)`` as ``path``, keeping the one it replaces as
    ``<name>.previous.ckpt``: a kill or a disk fault at any moment leaves a loadable generation.

    A full disk is reported naming the folder, with the last good checkpoint left as it was.
    """
    partial = path.with_suffix(".ckpt.partial")
    try:
        save(partial)
    except OSError as error:
        partial.unlink(missing_ok=True)
        good = path if path.exists() else previous_of(path)
        if error.errno == errno.ENOSPC:
            raise RunFolderError(
                f"{path.parent}: no space left on the device to write {path.name}; the last good "
                f"checkpoint ({good}) is intact. Free space, then resume with ckpt_path=last"
            ) from error
        raise RunFolderError(
            f"{path.parent}: cannot write {path.name} ({error.strerror or error}); the last good checkpoint "
            f"({good}) is intact"
        ) from error
    if path.exists():
        os.replace(path, previous_of(path))
    os.replace(partial, path)


def previous_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}.previous{path.suffix}")
