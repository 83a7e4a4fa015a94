"""TensorBoard says which run won (issue 20, item 1): each run named by what distinguishes it,
HPARAMS of the swept and defining settings only, hp metrics written once, when known."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from metaad.apps.tracking import safe_name
from metaad.apps.train import train
from metaad.evaluation.results import RunResults
from tests.conftest import compose_in, event_dir, run_app

DEFINING = ["model", "backbone", "dataset", "dataset.k_shot", "model.optimizer.lr", "seed"]


def hparams_of(folder: Path) -> tuple[list[str], dict[str, object], list[str]]:
    """A run's HPARAMS as TensorBoard reads them: the columns in order, the run's values, the metrics."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = {
        key: getattr(value, value.WhichOneof("kind"))
        for key, value in start.session_start_info.hparams.items()
    }
    metrics = [m.name.tag for m in experiment.metric_infos]
    return [h.name for h in experiment.hparam_infos], values, metrics


def hp_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in scalars if tag.startswith("hp/")}


def test_folder_names_are_portable_and_stay_distinct():
    assert safe_name("model=siamese,dataset.k_shot=1") == "model=siamese,dataset.k_shot=1"
    assert safe_name("dataset.source.root=/data/my set") == "dataset.source.root=_data_my_set"
    assert safe_name(".hidden") == "hidden"
    long_a, long_b = "x=" + "a" * 300 + "1", "x=" + "a" * 300 + "2"
    assert len(safe_name(long_a)) <= 100 and safe_name(long_a) != safe_name(long_b)


def test_a_single_run_is_named_by_its_run_name_with_its_overrides_then_the_defining_settings(tmp_path):
    cfg = compose_in(tmp_path / "run", ["model.distance=cosine", "baselines=none"])
    results = train(cfg)
    folder = event_dir(Path(cfg.paths.output_dir))
    assert folder.relative_to(Path(cfg.paths.output_dir)) == Path("tensorboard/protonet_digits")
    columns, values, metrics = hparams_of(folder)
    assert columns == ["debug", "model.distance", "baselines", *DEFINING]
    assert values["model.distance"] == "cosine" and values["model"] == "protonet"
    assert values["dataset.k_shot"] == 5 and values["model.optimizer.lr"] == pytest.approx(1e-3)
    assert not [key for key, value in values.items() if "_target_" in key or "_target_" in str(value)]
    assert sorted(metrics) == ["hp/test_auroc", "hp/val_auroc"]
    step = results.global_step
    assert hp_events(folder) == {
        "hp/val_auroc": [(step, pytest.approx(results.val_auroc_best, abs=1e-6))],
        "hp/test_auroc": [(step, pytest.approx(results.test["auroc"].mean, abs=1e-6))],
    }


@pytest.mark.slow
def test_a_sweeps_jobs_are_named_by_their_swept_overrides_with_real_hp_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=protonet,siamese", "dataset.k_shot=3", "debug=quick", "baselines=none"]
    done = run_app("metaad-train", [*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # as TensorBoard lists them, pointed at the folder the sweep's summary names
    assert f"tensorboard --logdir {sweep / 'tensorboard'}" in done.stdout
    runs = EventMultiplexer().AddRunsFromDirectory(str(sweep / "tensorboard"))
    runs.Reload()
    assert sorted(runs.Runs()) == ["model=protonet", "model=siamese"]
    for job, model in ((0, "protonet"), (1, "siamese")):
        results = RunResults.read(sweep / str(job) / "metrics.json")
        folder = sweep / "tensorboard" / f"model={model}"
        columns, values, metrics = hparams_of(folder)
        assert columns == DEFINING, "the swept key first, then what defines a run; no constants"
        assert values["model"] == model and values["dataset.k_shot"] == 3 and values["seed"] == 0
        assert not [key for key, value in values.items() if "_target_" in key or "_target_" in str(value)]
        # each hp metric once, at the end, with its real value: nothing at step 0 before it is known
        step = results.global_step
        assert step > 0 and hp_events(folder) == {
            "hp/val_auroc": [(step, pytest.approx(results.val_auroc_best, abs=1e-6))],
            "hp/test_auroc": [(step, pytest.approx(results.test["auroc"].mean, abs=1e-6))],
        }
        hparams_yaml = (folder / "hparams.yaml").read_text()
        assert "_target_" not in hparams_yaml and f"model: {model}" in hparams_yaml
    # a grid sweep ends with the summary table, as an Optuna study does
    assert "best config (by val/auroc)" in done.stdout
    assert sorted(p.name for p in sweep.iterdir()) == [
        "0",
        "1",
        "multirun.yaml",
        "sweep_summary.csv",
        "sweep_summary.md",
        "tensorboard",
    ]


def as_sweep_job(cfg, sweep: Path, num: int, sweep_overrides: list[str] | None) -> None:
    """Make ``cfg`` (composed in-process) look like job ``num`` of a sweep in ``sweep``, as Hydra sets it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    OmegaConf.set_readonly(cfg.hydra, False)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    if sweep_overrides is not None:
        sweep.mkdir(parents=True, exist_ok=True)
        OmegaConf.save({"hydra": {"overrides": {"task": sweep_overrides}}}, sweep / "multirun.yaml")


def test_a_sweep_job_is_named_by_what_the_sweep_varies_and_a_taken_name_gets_its_job_number(tmp_path):
    from metaad.apps.tracking import place_loggers, run_hparams, tensorboard_dirs

    sweep = tmp_path / "sweep"
    cfg = compose_in(tmp_path / "sweep" / "3", ["model=siamese", "seed=1", "dataset.k_shot=2"], quick=False)
    as_sweep_job(cfg, sweep, 3, ["model=protonet,siamese", "seed=1", "dataset.k_shot=range(1,3)"])
    (folder,) = tensorboard_dirs(place_loggers(cfg, Path(cfg.paths.output_dir)))
    assert folder == sweep / "tensorboard" / "model=siamese,dataset.k_shot=2", "seed=1 is every job's"
    assert list(run_hparams(cfg))[:2] == ["model", "dataset.k_shot"]
    folder.mkdir(parents=True)  # an Optuna study may draw one configuration twice
    (again,) = tensorboard_dirs(place_loggers(cfg, Path(cfg.paths.output_dir)))
    assert again == sweep / "tensorboard" / "model=siamese,dataset.k_shot=2_job3"
    # a resumed run continues in the folder its checkpoint names
    (resumed,) = tensorboard_dirs(place_loggers(cfg, Path(cfg.paths.output_dir), str(folder)))
    assert resumed == folder
