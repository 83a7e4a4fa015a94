"""A ``-m`` sweep is checked whole before its first job trains; its refused jobs are written down.

:class:`CheckSweep` is a Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): at the start
of a multirun, before the sweeper launches anything, it lists the sweep's jobs, composes each
job's config as the launcher will and runs the app's start-up checks on every one, so that a bad
value late in a sweep (``dataset.k_shot=5,3,0``) is one message naming the job before any job
trains. The grid sweeper's jobs are known up front; an Optuna study draws its values later, so
every choice and both ends of every range (all combinations, up to :data:`MAX_CHECKED`; beyond
that each value once) are checked instead, and a range Optuna cannot sample (a reversed
``interval``, a log range from 0) is named. Other sweepers' jobs are checked as each starts.

It also makes a resumed Optuna study continue (:func:`continue_study`). A job refused at start-up
inside a sweep is appended to ``refused_jobs.yaml`` in the sweep folder (:func:`record_refusal`)
so that ``metaad-summarize`` lists it with the reason.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from metaad.apps.messages import message
from metaad.errors import ConfigError

REFUSED = "refused_jobs.yaml"
# Optuna: the checked combinations of every choice and range end, at most this many.
MAX_CHECKED = 256


def sweep_arguments(config: DictConfig) -> list[str]:
    """The overrides a sweeper sweeps over: its ``params`` then the command line's, as it reads them."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    return [f"{key}={value}" for key, value in params.items()] + list(task)


def sweeper_kind(config: DictConfig) -> str:
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if target.endswith("BasicSweeper"):
        return "grid"
    return "optuna" if "optuna" in target.lower() else "other"


def grid_jobs(arguments: list[str], loader: Any = None) -> list[list[str]]:
    """The job override lists of Hydra's grid sweeper, in its order (job ``i`` is folder ``i``);
    ``loader``, Hydra's config loader, expands ``glob(...)`` over a group's options."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def optuna_candidates(arguments: list[str]) -> list[list[str]]:
    """Override lists covering every value an Optuna study may draw: each choice, each range end."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    values: dict[str, list[str]] = {}  # by key: a later override replaces an earlier one, as Optuna's
    for text in arguments:
        override = OverridesParser.create().parse_overrides([text])[0]
        key = override.get_key_element()
        try:
            distribution = create_optuna_distribution_from_override(override)
        except (ValueError, AssertionError, NotImplementedError) as error:
            why = str(error).rstrip(".") or "not a range Optuna can sample"
            raise ConfigError(f"the Optuna search space {text}: {why}") from None
        if isinstance(distribution, str):
            values[key] = [f"{key}={distribution}"]
        elif hasattr(distribution, "choices"):
            values[key] = [f"{key}={choice}" for choice in distribution.choices]
        else:
            values[key] = [f"{key}={end}" for end in dict.fromkeys((distribution.low, distribution.high))]
    return _combinations(list(values.values()))


def _combinations(values: list[list[str]]) -> list[list[str]]:
    combinations = 1
    for options in values:
        combinations *= len(options)
    if combinations <= MAX_CHECKED:
        return [list(job) for job in itertools.product(*values)]
    first = [options[0] for options in values]
    return [first[:i] + [value] + first[i + 1 :] for i, options in enumerate(values) for value in options]


class CheckSweep(Callback):
    """Check every job of a sweep before the first one runs; continue a resumed Optuna study."""

    def __init__(self, app: str, check: str) -> None:
        self.app = app
        module, _, name = check.rpartition(".")
        if not module.startswith("metaad."):
            raise ValueError(f"CheckSweep: check must be one of metaad's checks, got {check!r}")
        self.check: Callable[[DictConfig], None] = getattr(importlib.import_module(module), name)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            kind = sweeper_kind(config)
            if kind == "optuna":
                continue_study(config)
                jobs = optuna_candidates(sweep_arguments(config))
                what = "the Optuna search space"
            elif kind == "grid":
                from hydra.core.global_hydra import GlobalHydra

                jobs = grid_jobs(sweep_arguments(config), GlobalHydra.instance().config_loader())
                what = "job"
            else:
                return
            self.check_jobs(config, jobs, what)
        except Exception as error:  # a callback's exception would only be a warning: stop here
            self.stop(error)

    def check_jobs(self, config: DictConfig, jobs: list[list[str]], what: str) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        loader = GlobalHydra.instance().config_loader()
        saved = HydraConfig.instance().cfg
        try:
            for num, overrides in enumerate(jobs):
                try:
                    job = loader.load_sweep_config(config, list(overrides))
                    HydraConfig.instance().set_config(job)
                    self.check(job)
                except Exception as error:
                    where = f"job {num} of {len(jobs)}" if what == "job" else what
                    swept = [o for o in overrides if not all(o in other for other in jobs)]
                    error.add_note(f"{where} ({' '.join(swept or overrides)})")
                    raise
        finally:
            HydraConfig.instance().cfg = saved

    def stop(self, error: Exception) -> None:
        text = message(error) or (str(error) if isinstance(error, HydraException) else None)
        if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exception(error)
            sys.exit(1)
        notes = getattr(error, "__notes__", [])
        where = f"{notes[-1]}: " if notes else ""
        print(f"metaad-{self.app}: error: {where}{text}", file=sys.stderr)
        print("(no job of the sweep was started; set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def continue_study(config: DictConfig) -> None:
    """A study resumed from ``hydra.sweeper.storage`` runs up to ``n_trials`` trials in all, new ones.

    ``n_trials`` counts the study's complete trials, so the command that was killed finishes its
    study and a larger ``n_trials`` adds trials; the sampler's seed is drawn from ``(seed, trials
    done)``, so the new trials are not the first ones drawn again (same history, same trials).
    """
    import numpy as np
    import optuna

    sweeper = config.hydra.sweeper
    if not sweeper.get("storage") or not sweeper.get("study_name"):  # nothing to resume by name
        return
    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
    except KeyError:  # a new study
        return
    done = sum(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)
    if not done:
        return
    sweep_dir = Path(str(config.hydra.sweep.dir))
    earlier = sorted(p.parent.name for p in sweep_dir.glob("*/.hydra")) if sweep_dir.is_dir() else []
    if earlier:
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds the folders of earlier trials ({', '.join(earlier[:5])}); "
            f"the resumed study {sweeper.study_name!r} numbers its new trials' folders from 0 again: give "
            "it a new hydra.sweep.dir (the study's trials are kept in its storage)"
        )
    wanted = int(sweeper.n_trials)
    with read_write(config.hydra), open_dict(config.hydra):
        sweeper.n_trials = max(0, wanted - done)
        seed = OmegaConf.select(sweeper, "sampler.seed")
        if "sampler" in sweeper and "seed" in sweeper.sampler:
            base = seed if isinstance(seed, int) else 0
            sweeper.sampler.seed = int(np.random.SeedSequence([base, done]).generate_state(1)[0])
    if not sweeper.n_trials:  # the sweeper still writes the study's best into the sweep folder
        sweep_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"Optuna study {sweeper.study_name!r} in {sweeper.storage} resumed: {done} complete trial(s), "
        f"{sweeper.n_trials} more to reach hydra.sweeper.n_trials={wanted}"
        + ("" if sweeper.n_trials else " (raise it to run more)"),
        file=sys.stderr,
    )


def record_refusal(text: str) -> None:
    """Inside a sweep, append this job's start-up refusal to the sweep folder's ``refused_jobs.yaml``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    entry = {
        "job": str(hydra_cfg.job.get("num", "")),
        "folder": str(hydra_cfg.sweep.subdir),
        "overrides": list(hydra_cfg.overrides.task),
        "error": text,
    }
    sweep = Path(hydra_cfg.sweep.dir)
    sweep.mkdir(parents=True, exist_ok=True)
    with open(sweep / REFUSED, "a") as file:
        file.write(yaml.safe_dump([entry], sort_keys=False))


def refused_jobs(sweep: Path) -> list[dict]:
    path = sweep / REFUSED
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def expected_jobs(sweep: Path) -> list[list[str]] | None:
    """The grid sweep's job override lists, from the ``multirun.yaml`` Hydra wrote; None if unknown."""
    path = sweep / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        config = OmegaConf.load(path)
        if sweeper_kind(config) != "grid" or not isinstance(config.hydra.overrides.task, ListConfig):
            return None
        return grid_jobs(sweep_arguments(config))
    except Exception:  # an unreadable record lists only the folders found
        return None
