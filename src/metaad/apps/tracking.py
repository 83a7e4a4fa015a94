"""What a run is called and described as in TensorBoard, so that one TensorBoard over many runs
says which configuration won.

A single run writes under ``<run folder>/tensorboard/<run_name>``; a job of a sweep under
``<sweep folder>/tensorboard/<its swept overrides>`` (``model=siamese,dataset.k_shot=1``), so
``tensorboard --logdir <sweep folder>/tensorboard`` lists the jobs by what distinguishes them.
HPARAMS gets the swept settings (or a single run's overrides) first, then the few that define any
run (model, backbone, dataset, K, learning rate, seed): never ``_target_`` paths or constants.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# what defines any run, beside what was swept: hparam name -> config key (a group's choice for groups)
DEFINING = {
    "model": "model",
    "backbone": "backbone",
    "dataset": "dataset",
    "dataset.k_shot": "dataset.k_shot",
    "model.optimizer.lr": "model.optimizer.lr",
    "seed": "seed",
}
# never what distinguishes a run: where it resumes from
NOT_DISTINGUISHING = ("ckpt_path",)
MAX_NAME = 100  # characters of a folder name; longer ones are cut and keep a hash of the whole


def _hydra() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def is_sweep_job(hydra: Any) -> bool:
    from hydra.types import RunMode

    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def swept_keys(hydra: Any) -> set[str]:
    """The keys a sweep varies: its sweeper's ``params`` (Optuna's search space) and the command
    line's sweep overrides (``model=a,b``), as recorded in the sweep folder's ``multirun.yaml``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {str(key) for key in (OmegaConf.select(hydra, "sweeper.params") or {})}
    record = Path(str(hydra.sweep.dir)) / "multirun.yaml"
    try:
        task = OmegaConf.load(record).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # no record (Optuna writes none) or an unreadable one: the params alone
        return keys
    return keys | {_key(o.input_line) for o in parsed if o.is_sweep_override() and o.input_line}


def distinguishing_overrides(hydra: Any) -> list[str]:
    """A sweep job's swept overrides, in its order (all its overrides when none is known to be
    swept); a single run's command-line overrides."""
    if hydra is None:
        return []
    given = [str(o) for o in hydra.overrides.task if _key(str(o)) not in NOT_DISTINGUISHING]
    if not is_sweep_job(hydra):
        return given
    swept = swept_keys(hydra)
    return [o for o in given if _key(o) in swept] or given


def safe_name(text: str) -> str:
    """``text`` as one folder name on any file system: characters outside a portable set become
    ``_``; a long one is cut and ends with a hash of the whole, so different names stay different."""
    name = re.sub(r"[^\w.,=+\-\[\]~@]", "_", text).lstrip(".") or "run"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def run_label(cfg: DictConfig) -> str:
    """The run's TensorBoard name: a sweep job's swept overrides joined by ``,``, else ``run_name``."""
    hydra = _hydra()
    if is_sweep_job(hydra):
        overrides = distinguishing_overrides(hydra)
        if overrides:
            return safe_name(",".join(overrides))
    return safe_name(str(cfg.get("run_name") or "run"))


def _value(cfg: DictConfig, key: str, choices: dict[str, Any]) -> Any:
    """A setting as TensorBoard can show it: a group's chosen option, else the resolved value."""
    if key in choices:
        return choices[key]
    value = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """HPARAMS: what distinguishes the run first (a sweep's swept settings), then what defines
    any run; only settings a run has (a learner without ``optimizer.lr`` has no such column)."""
    hydra = _hydra()
    choices = dict(hydra.runtime.choices) if hydra is not None else {}
    choices |= {key: cfg.names[key] for key in ("model", "dataset") if key in (cfg.get("names") or {})}
    params: dict[str, Any] = {}
    for override in distinguishing_overrides(hydra):
        key = _key(override)
        if not key.startswith("hydra.") and (key in choices or OmegaConf.select(cfg, key) is not None):
            params[key] = _value(cfg, key, choices)
    for name, key in DEFINING.items():
        if name not in params and (key in choices or OmegaConf.select(cfg, key) is not None):
            params[name] = _value(cfg, key, choices)
    return params


def _is_tensorboard(conf: Any) -> bool:
    return str(conf.get("_target_", "")).endswith("TensorBoardLogger")


def place_loggers(cfg: DictConfig, run_dir: Path, resumed_dir: str | None = None) -> DictConfig:
    """``cfg`` with each TensorBoard logger whose ``save_dir`` or ``version`` is null told where
    this run writes: ``<run folder or sweep folder>/tensorboard/<run label>``. A resumed run keeps
    the folder its checkpoint names; a sweep job whose label another job holds gets ``_job<n>``
    (an Optuna study may draw one configuration twice)."""
    open_ = [c for c in (cfg.get("logger") or {}).values() if _is_tensorboard(c)]
    if not any(c.get("save_dir") is None or c.get("version") is None for c in open_):
        return cfg
    cfg = copy.deepcopy(cfg)
    hydra = _hydra()
    sweep_job = is_sweep_job(hydra)
    for conf in (cfg.get("logger") or {}).values():
        chosen = conf.get("save_dir") is not None and conf.get("version") is not None
        if not _is_tensorboard(conf) or chosen:
            continue
        name = str(conf.get("name") or "")
        if resumed_dir and Path(resumed_dir).is_dir():
            folder = Path(resumed_dir)
            save_dir, name, version = folder.parent.parent, folder.parent.name, folder.name
        else:
            base = Path(str(hydra.sweep.dir)) if sweep_job else run_dir
            save_dir = Path(str(conf.save_dir)) if conf.get("save_dir") is not None else base
            version = str(conf.version) if conf.get("version") is not None else run_label(cfg)
            if sweep_job and conf.get("version") is None and (save_dir / name / version).exists():
                version = f"{version}_job{hydra.job.num}"
        with open_dict(conf):
            conf.save_dir, conf.name, conf.version = str(save_dir), name, version
    return cfg


def tensorboard_dirs(cfg: DictConfig) -> list[Path]:
    """The folders this run's TensorBoard loggers write to (after :func:`place_loggers`)."""
    return [
        Path(str(conf.save_dir)) / str(conf.get("name") or "") / str(conf.get("version") or "")
        for conf in (cfg.get("logger") or {}).values()
        if _is_tensorboard(conf) and conf.get("save_dir") is not None
    ]
