"""Sweeps, the benchmark, the sweep summary and the speed script: checked before work, named when
wrong, nothing reused that ran with another config, a resumed Optuna study continues (issue 16)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from metaad.apps.benchmark import run
from metaad.apps.summarize import summarize_sweep
from metaad.errors import ConfigError
from tests.test_runs import run_app

ROOT = Path(__file__).resolve().parents[1]
# A real training in seconds, as tests/test_scale.py's sweeps run it.
TINY = ["debug=quick", "trainer.max_epochs=2", "dataset.meta_batch_size=4"]


def one_error_line(done, app: str) -> str:
    """The single ``metaad-<app>: error:`` line of a refused run (no traceback), exit status 1."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"metaad-{app}: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# --- refused before anything runs: one line naming the override, the job or the suite -------------

OPTUNA = ["hparams_search=optuna", "hydra.sweeper.n_trials=2"]


@pytest.mark.parametrize(
    "app, args, message",
    [
        pytest.param(
            "metaad-benchmark",
            ["preset=quick", "suites=[digits]", "preset.suites.digits.models=[]"],
            r"preset=quick, suite digits has no learners \(models: \[\]\)",
            marks=pytest.mark.slow,
            id="benchmark-suite-of-no-learners",
        ),
        pytest.param(
            "metaad-benchmark",
            ["preset=quick", 'overrides=["dataset.k_shot=0"]'],
            r"suite digits, fold 0, seed 0, protonet K=5: dataset.k_shot must be a positive integer",
            marks=pytest.mark.slow,
            id="benchmark-bad-training-config",
        ),
        pytest.param(
            "metaad-train",
            ["-m", "dataset.k_shot=5,"],
            r"the override 'dataset.k_shot=5,' cannot be read: a sweep value is empty",
            marks=pytest.mark.slow,
            id="empty-sweep-value",
        ),
        pytest.param(
            "metaad-train",
            ["-m", *TINY, "dataset.k_shot=5,3,0"],
            r"job 2 of 3 \(dataset.k_shot=0\): dataset.k_shot must be a positive integer, got 0",
            marks=pytest.mark.slow,
            id="bad-value-late-in-a-grid",
        ),
        pytest.param(
            "metaad-train",
            ["-m", *TINY, "model=protonet,siamese", "model.optimizer.lr=0.01,-1"],
            r"job 1 of 4 \(model=protonet model.optimizer.lr=-1\): model.optimizer.lr must be positive",
            marks=pytest.mark.slow,
            id="bad-value-in-a-two-key-grid",
        ),
        pytest.param(
            "metaad-train",
            ["-m", *TINY, *OPTUNA, "hydra.sweeper.params={model.optimizer.lr:'interval(0.1,0.001)'}"],
            r"the Optuna search space model.optimizer.lr=interval\(0.1,0.001\): The `low` value must be",
            marks=pytest.mark.slow,
            id="optuna-reversed-range-in-params",
        ),
        pytest.param(
            "metaad-train",
            ["-m", *TINY, *OPTUNA, "model.optimizer.lr=tag(log,interval(0,0.1))"],
            r"the Optuna search space model.optimizer.lr=tag\(log,interval\(0,0.1\)\)",
            marks=pytest.mark.slow,
            id="optuna-log-range-from-zero-on-the-command-line",
        ),
        pytest.param(
            "metaad-train",
            ["-m", *TINY, *OPTUNA, "backbone.embed_dim=choice(32,0)"],
            r"the Optuna search space \(.*backbone.embed_dim=0.*\): backbone.embed_dim must be a positive",
            marks=pytest.mark.slow,
            id="optuna-bad-choice",
        ),
    ],
)
def test_a_bad_sweep_or_suite_is_one_line_before_any_job_trains(tmp_path, app, args, message):
    out = tmp_path / "out"
    where = f"hydra.sweep.dir={out}" if "-m" in args else f"hydra.run.dir={out}"
    done = run_app(app, [*args, where], tmp_path)
    line = one_error_line(done, app.removeprefix("metaad-"))
    assert re.search(message, line), line
    trained = [p for p in out.rglob("*.ckpt")] if out.exists() else []
    assert not trained, f"nothing trains before the whole sweep is checked: {trained}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.k_shot=5,", r"'dataset.k_shot=5,' cannot be read: a sweep value is empty"),
        ("dataset.k_shot=,5", r"'dataset.k_shot=,5' cannot be read: a sweep value is empty"),
        ("model=protonet,,siamese", r"'model=protonet,,siamese' cannot be read: a sweep value is empty"),
        ("dataset.test_tasks=[1", r"'dataset.test_tasks=\[1' cannot be read: .*quote a value"),
    ],
)
def test_an_override_hydra_cannot_read_is_named_before_hydra_starts(capsys, override, message):
    from metaad.apps.cli import check_override_syntax

    check_override_syntax("train", ["-m", "debug=quick", "dataset.k_shot=1,5"])  # readable: no word
    with pytest.raises(SystemExit) as stopped:
        check_override_syntax("train", ["-m", "debug=quick", override])
    assert stopped.value.code == 1
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and said.startswith("metaad-train: error: the override")
    assert re.search(message, said), said


def test_every_training_of_the_benchmark_is_checked_before_the_first_trains(tmp_path):
    preset = tiny_preset()
    preset.suites.digits.models = ["protonet", "siamese"]
    preset.suites.digits.model_overrides = {"siamese": ["model.margin=-1"]}
    with pytest.raises(ConfigError, match=r"suite digits, fold 0, seed 0, siamese K=5: model.margin must be"):
        run(preset, tmp_path / "bench", [], None, "tiny")
    assert not list((tmp_path / "bench").rglob("*.ckpt")), "protonet, the first job, must not have trained"


# --- metaad-summarize: every job listed, each without metrics with why --------------------------


def write_job(sweep: Path, num: int, overrides: list[str], metrics: str | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(metrics)


def metrics_text(val, test: float = 0.8) -> str:
    auroc = {"mean": test, "ci95": 0.01, "n_episodes": 40}
    metrics = {"model": "protonet", "k_shot": 5, "seed": 0, "val_auroc_best": val, "global_step": 8}
    return json.dumps(metrics | {"test": {"auroc": auroc}, "baselines": {}})


@pytest.mark.parametrize(
    "bad, status",
    [
        (metrics_text(0.7)[:60], r"unreadable .*1/metrics.json: not valid JSON"),
        ("", r"unreadable .*1/metrics.json: not valid JSON"),
        (json.dumps({"val_auroc_best": 0.7}), r"unreadable .*1/metrics.json: not the .*no 'test'"),
        (json.dumps({"val_auroc_best": "high", "test": {"auroc": {"mean": 1, "ci95": 0}}}), r"unreadable"),
        (json.dumps([1, 2]), r"unreadable .*1/metrics.json"),
    ],
    ids=["truncated", "empty", "no-test-block", "not-a-number", "not-an-object"],
)
def test_an_unreadable_metrics_file_is_named_and_the_other_jobs_listed(tmp_path, capsys, bad, status):
    write_job(tmp_path, 0, ["dataset.k_shot=1"], metrics_text(0.9, 0.85))
    write_job(tmp_path, 1, ["dataset.k_shot=5"], bad)
    write_job(tmp_path, 2, ["dataset.k_shot=10"], metrics_text(0.8))
    rows = summarize_sweep(tmp_path)
    assert [r["job"] for r in rows] == ["0", "2", "1"]
    assert re.search(status, rows[2]["status"]), rows[2]["status"]
    assert re.search(status, capsys.readouterr().out.replace("\n", "")), "the file is named below the table"


def test_a_null_validation_auroc_is_listed_as_nan_not_dropped(tmp_path):
    write_job(tmp_path, 0, ["trainer.check_val_every_n_epoch=5"], metrics_text(None, 0.7))
    write_job(tmp_path, 1, ["trainer.check_val_every_n_epoch=1"], metrics_text(0.9, 0.8))
    rows = summarize_sweep(tmp_path)
    assert [r["job"] for r in rows] == ["1", "0"] and rows[1]["test/auroc"] == 0.7


@pytest.mark.slow
def test_a_job_refused_at_start_up_and_the_jobs_after_it_are_listed(tmp_path, capsys):
    """k_shot=1000 is more than a digits task holds: refused when its data loads (not by the config
    checks), after job 0 trained; the sweep stops there."""
    sweep = tmp_path / "sweep"
    done = run_app(
        "metaad-train", ["-m", *TINY, "dataset.k_shot=5,1000,3", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert done.returncode == 1 and (sweep / "0" / "metrics.json").is_file()
    rows = {row["job"]: row for row in summarize_sweep(sweep)}
    assert set(rows) == {"0", "1", "2"}
    assert rows["0"]["status"] == "done"
    assert rows["1"]["overrides"] == "dataset.k_shot=1000"
    assert re.match(r"refused at start-up: .*dataset.k_shot \(1000\)", rows["1"]["status"]), rows["1"]
    assert rows["2"] == rows["2"] | {
        "overrides": "dataset.k_shot=3",
        "status": "not run: the sweep stopped before it",
    }
    out = capsys.readouterr().out
    assert "job 1: refused at start-up" in out and "job 2: not run" in out


# --- a resumed Optuna study continues ------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_optuna_study_runs_new_trials_up_to_n_trials_in_all(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = ["-m", *TINY, "hparams_search=optuna", f"hydra.sweeper.storage={storage}"]

    def sweep(n_trials: int, folder: str):
        done = run_app(
            "metaad-train",
            [*study, f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={tmp_path / folder}"],
            tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        trials = optuna.load_study(study_name="metaad", storage=storage).trials
        return done, [t.params for t in trials if t.state == optuna.trial.TrialState.COMPLETE]

    _, first = sweep(1, "first")
    done, resumed = sweep(2, "resumed")
    assert len(resumed) == 2 and resumed[:1] == first
    assert resumed[1] not in first, "the earlier trial drawn again"
    assert "1 complete trial(s), 1 more to reach hydra.sweeper.n_trials=2" in done.stderr
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.is_dir()) == ["0", "tensorboard"]
    done, again = sweep(2, "again")
    assert again == resumed, "a finished study runs no trial more"
    assert "0 more" in done.stderr and (tmp_path / "again" / "optimization_results.yaml").is_file()
    # the folder of the earlier trials is refused up front, naming the setting
    refused = run_app(
        "metaad-train",
        [*study, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'first'}"],
        tmp_path,
    )
    assert "hydra.sweep.dir=" in one_error_line(refused, "train")


# --- metaad-benchmark: reuse only what ran with the same full config -----------------------------


def tiny_preset(**eval_overrides):
    suite = {
        "experiment": "digits",
        "models": ["protonet"],
        "train_k_shot": 5,
        "k_shots": [5],
        "baselines": "none",
        "overrides": [*TINY, "dataset.val_episodes=8"],
        "eval_overrides": list(eval_overrides.get("eval", [])),
    }
    return OmegaConf.create({"suites": {"digits": suite}})


def test_the_benchmark_reuses_an_evaluation_only_when_its_full_config_matches(tmp_path, capsys):
    out = tmp_path / "bench"
    ckpt = out / "runs" / "digits" / "fold0" / "seed0" / "protonet_k5" / "train" / "checkpoints" / "best.ckpt"

    def episodes(pooled: dict) -> int:
        return pooled[("digits", 5, "protonet")]["auroc"].n_episodes

    rows, counts = run(tiny_preset(), out, ["dataset.test_episodes=20"], None, "tiny")
    assert episodes(rows) == 20 and counts["digits"] == {"run": 1}
    trained = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    rows, counts = run(tiny_preset(), out, ["dataset.test_episodes=20"], None, "tiny")
    assert episodes(rows) == 20 and counts["digits"] == {"reused": 1}
    assert "reused: suite digits, fold 0, seed 0, protonet K=5, evaluated at K=5" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == trained
    # another evaluation setting: the evaluation reruns on the same training
    rows, counts = run(
        tiny_preset(eval=["threshold=support_quantile"]), out, ["dataset.test_episodes=20"], None, "tiny"
    )
    assert counts["digits"] == {"run": 1} and ckpt.stat().st_mtime_ns == trained
    said = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "rerun: suite digits" in said and "config changed" in said and "threshold" in said
    # another training setting: trained again and evaluated again
    rows, counts = run(tiny_preset(), out, ["dataset.test_episodes=24"], None, "tiny")
    assert episodes(rows) == 24 and counts["digits"] == {"run": 1}
    said = " ".join(capsys.readouterr().out.split())
    assert "retrained: suite digits" in said and "dataset.test_episodes: 20 then, 24 now" in said
    # nothing an earlier run wrote is deleted: the replaced runs are set aside, named on the console
    job = ckpt.parents[2]
    assert (job / "eval_k5.replaced-1" / "metrics.json").is_file() and "kept as train.replaced-1" in said
    assert (job / "train.replaced-1" / "checkpoints" / "best.ckpt").is_file()


def test_a_suite_of_no_learners_is_refused_naming_preset_and_suite_before_any_folder(tmp_path):
    preset = tiny_preset()
    preset.suites.digits.models = []
    with pytest.raises(ConfigError, match=r"preset=tiny, suite digits has no learners"):
        run(preset, tmp_path / "bench", [], None, "tiny")
    assert not (tmp_path / "bench").exists()


# --- make speed: each check says what failed, by name and numbers ---------------------------------


@pytest.fixture
def bench_speed(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "scripts" / "bench_speed.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_speed", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)

    def main(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["bench_speed.py", *args, "--out", str(tmp_path / "speed.md")])
        try:
            module.main()
        except SystemExit as exit:
            return exit.code
        return 0

    module.run = main
    return module


def test_disagreeing_gradients_are_named_with_their_numbers(bench_speed, monkeypatch, capsys):
    args = ["--sections", "maml", "--maml-meta-batch-sizes", "4", "--inner-steps", "1", "--rounds", "1"]
    assert bench_speed.run(*args) == 0
    monkeypatch.setattr(bench_speed, "REL_TOL", 0.0)  # any difference at all now disagrees
    assert bench_speed.run(*args) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(
        r"FAILED: gradients agree with metaad's \(meta-batch 4, 1 inner step\(s\)\): "
        r".*max \|diff\| \d\.\de-\d+",
        said,
    ), said


@pytest.mark.slow
def test_a_missed_start_up_target_is_named_not_called_a_gradient_disagreement(
    bench_speed, monkeypatch, capsys
):
    monkeypatch.setattr(bench_speed, "STARTUP_TARGET_S", -100.0)  # no start-up can meet it
    assert bench_speed.run("--sections", "startup", "--no-score-call", "--startup-repeats", "1") == 1
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(
        r"FAILED: start-up target: `metaad-score --help` within -100 s .*: median [\d.]+ s", said
    ), said
    assert "gradient" not in said
