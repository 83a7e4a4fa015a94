"""A run the user stops, a run that cannot go on, and what a run prints and writes: each ends in
one clear line (or a documented correct handling), never a silent success, a traceback or a
file that is not what it says.

Fast cases call the apps' functions in-process; the slow ones run the real command line: a
SIGTERM or SIGINT sent mid-training, a run folder that cannot be written, a file size limit.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from metaad.apps.runs import LOCK, claim
from metaad.apps.train import train
from metaad.errors import ConfigError, RunFolderError, TrainingError
from metaad.evaluation.report import print_summary
from metaad.evaluation.results import write_json
from tests.conftest import compose_in
from tests.test_bad_inputs import UNSAFE, one_block, run_app

BIN = Path(sys.executable).parent
QUIET = ["baselines=none", "logger=none"]


def strict_json(path: Path) -> dict:
    """``path`` read as JSON proper: NaN and Infinity (Python's extension) are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- metrics.json: valid JSON, whole or not at all -------------------------------------------------


def test_validation_that_never_ran_is_null_with_a_reason_and_a_warning(tmp_path, caplog):
    cfg = compose_in(tmp_path / "run", [*QUIET, "trainer.check_val_every_n_epoch=5"])
    with caplog.at_level(logging.WARNING, logger="metaad.apps.train"):
        returned = train(cfg)
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    why = metrics["null_reasons"]["val_auroc_best"]
    assert metrics["val_auroc_best"] is None and math.isnan(returned.val_auroc_best)
    assert "trainer.check_val_every_n_epoch=5" in why and "the test scored the last weights (step 4)" in why
    assert metrics["checkpoint"] == "" and metrics["test"]["auroc"]["n_episodes"] == 40
    assert "validation never ran" in caplog.text


@pytest.mark.parametrize(
    "metrics, key",
    [
        ({"test": {"auroc": {"mean": float("nan"), "n_episodes": 3}}}, "test.auroc.mean"),
        ({"baselines": {"knn": {"aupr": {"mean": float("inf")}}}}, "baselines.knn.aupr.mean"),
        ({"per_episode": [0.5, float("-inf")]}, "per_episode[1]"),
    ],
    ids=["nan", "inf", "in-a-list"],
)
def test_a_non_finite_metric_is_written_as_null_with_its_reason(tmp_path, metrics, key):
    write_json(tmp_path / "metrics.json", metrics)
    written = strict_json(tmp_path / "metrics.json")
    assert "not a finite number" in written["null_reasons"][key]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.fixture
def file_size_limit():
    """Files this process writes may not grow past 2 KiB (``ulimit -f``), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("before", [None, '{"test": "the previous run"}'], ids=["fresh", "previous-file"])
def test_metrics_json_on_a_full_disk_is_named_and_never_half_written(tmp_path, file_size_limit, before):
    path = tmp_path / "metrics.json"
    if before is not None:
        path.write_text(before)
    metrics = {"test": {f"detector{i}": {"auroc": {"mean": 0.5, "ci95": 0.1}} for i in range(200)}}
    with pytest.raises(RunFolderError) as error:
        write_json(path, metrics)
    assert f"{tmp_path}: cannot write metrics.json: no space left" in str(error.value)
    assert (path.read_text() if path.exists() else None) == before  # the old file, or none: never half
    assert [p.name for p in tmp_path.iterdir()] == ([] if before is None else ["metrics.json"])


# --- what a run prints: commands the user can paste -------------------------------------------------


@pytest.mark.parametrize("logger", ["none", "tensorboard"])
def test_the_tensorboard_hint_is_there_only_for_a_tensorboard_folder_and_quoted(tmp_path, logger):
    run_dir = tmp_path / "my runs" / "it's one"
    metrics = train(compose_in(run_dir, ["baselines=none", f"logger={logger}"]))
    out = io.StringIO()
    print_summary(metrics, run_dir, Console(file=out, width=60))
    hints = [line for line in out.getvalue().splitlines() if line.startswith("tensorboard")]
    if logger == "none":
        assert hints == [] and not (run_dir / "tensorboard").exists()
    else:
        assert len(hints) == 1, out.getvalue()  # one line, not wrapped at the console's width
        assert shlex.split(hints[0]) == ["tensorboard", "--logdir", str(run_dir / "tensorboard")]


def test_a_sweep_summary_lists_a_job_that_never_validated_and_quotes_its_tensorboard_hint(tmp_path, capsys):
    from metaad.apps.summarize import summarize_sweep

    sweep = tmp_path / "my sweep"
    for num, val in ((0, 0.8), (1, None)):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
        test = {"auroc": {"mean": 0.7, "ci95": 0.1, "n_episodes": 40}}
        write_json(job / "metrics.json", {"val_auroc_best": val, "global_step": 4, "test": test})
    rows = summarize_sweep(sweep)
    assert [row["job"] for row in rows] == ["0", "1"], "the job with no validation AUROC last, not dropped"
    hint = next(line for line in capsys.readouterr().out.splitlines() if "tensorboard --logdir" in line)
    assert shlex.split(hint.split(": ", 1)[1]) == ["tensorboard", "--logdir", str(sweep)]


# --- runs that cannot go on ---------------------------------------------------------------------


def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_the_step_and_the_lr(tmp_path):
    cfg = compose_in(tmp_path / "run", [*QUIET, "model.optimizer.lr=1e8"])
    with pytest.raises(TrainingError) as error:
        train(cfg)
    text = str(error.value)
    assert text.startswith("training diverged: the loss is not finite") and "at step " in text
    assert "Lower the learning rate (model.optimizer.lr, now 1e+08" in text
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / LOCK).exists()


@pytest.mark.parametrize(
    "overrides, given",
    [
        (["trainer.devices=3"], "trainer.devices=3 runs 3 processes"),
        (["trainer.devices=[0,1]"], "trainer.devices=[0, 1] runs 2 processes"),
        (["trainer.devices=2", "+trainer.num_nodes=2"], "trainer.devices=2 trainer.num_nodes=2 runs 4"),
        (["trainer.devices=3", "dataset.meta_batch_size=8"], "divisible by 3 (it is 8)"),
    ],
    ids=["devices=3", "device-list", "nodes", "uneven-meta-batch"],
)
def test_several_processes_without_trainer_ddp_are_refused_before_launching_any(
    tmp_path, monkeypatch, overrides, given
):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("launched"))
    cfg = compose_in(tmp_path / "run", [*QUIET, *overrides])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert given in str(error.value) and "Give: trainer=ddp" in str(error.value)
    assert not started and not any((tmp_path / "run").iterdir())


def test_a_folder_holding_an_evaluation_is_not_told_to_resume_it(tmp_path):
    run_dir = tmp_path / "eval"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = compose_in(run_dir, ["ckpt_path=x.ckpt"], config_name="eval", quick=False)
    with pytest.raises(RunFolderError) as error:
        with claim(cfg, run_dir, resume=False):
            pass
    text = str(error.value)
    assert "continue it with ckpt_path=last" not in text
    assert (
        "metaad-eval starts over each time" in text
        and "give this metaad-eval run another hydra.run.dir" in text
    )


# --- the command line ---------------------------------------------------------------------------


def below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a file").write_text("mine")
    return tmp_path / "a file" / "run"


def read_only(tmp_path: Path) -> Path:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    return tmp_path / "locked"


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        below_a_file,
        lambda tmp_path: Path("/proc/self"),  # a folder not even root can write in
        lambda tmp_path: Path("/proc/self/run"),
        pytest.param(read_only, marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anyway")),
    ],
    ids=["below-a-file", "unwritable", "cannot-make", "read-only"],
)
def test_a_run_folder_that_cannot_be_written_is_one_line_from_metaad_not_hydra(tmp_path, make):
    run_dir = make(tmp_path)
    done = run_app("metaad-train", ["debug=quick", f"hydra.run.dir={run_dir}"], tmp_path)
    line = one_block(done, "metaad-train")
    assert f"hydra.run.dir={run_dir}: cannot make or write in the run folder" in line
    assert "Error executing job" not in done.stderr
    if make is below_a_file:
        assert (tmp_path / "a file").read_text() == "mine"


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose_in(run_dir, QUIET))
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.mark.slow
def test_a_file_size_limit_hit_by_tensorboard_is_one_line_naming_the_run_folder(tmp_path, trained_ckpt):
    """TensorBoard writes in a thread: its failure, too, is metaad's line, said once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [str(BIN / "metaad-eval"), f"ckpt_path={trained_ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)),
    )
    line = one_block(done, "metaad-eval")
    assert f"cannot write a file in the run folder {tmp_path / 'eval'}: File too large" in line
    assert not (tmp_path / "eval" / "metrics.json").exists()


# --- SIGTERM / SIGINT mid-training ----------------------------------------------------------------

LONG = [
    "debug=quick",
    "dataset.train_episodes=2000",
    "dataset.meta_batch_size=4",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    *QUIET,
]


def started(process: subprocess.Popen, last: Path) -> None:
    """Wait until the run trains (its first periodic checkpoint is there)."""
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The run of LONG without a stop, for comparison."""
    folder = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(BIN / "metaad-train"), *LONG, f"hydra.run.dir={folder / 'run'}"],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "run" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_saying_how_to_resume_and_the_resumed_run_ends_as_if_never_stopped(
    tmp_path, straight, signum
):
    run_dir = tmp_path / "my run"  # a space: the printed command must quote it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    process = subprocess.Popen(
        [str(BIN / "metaad-train"), *LONG, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    started(process, last)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr
    lines = [line for line in stderr.splitlines() if line.startswith("metaad-train:")]
    assert len(lines) == 1, stderr
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"metaad-train: interrupted by {name}; {last} holds step ")
    step = int(lines[0].split(" holds step ")[1].split(".")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step and 0 < step < 500
    assert not (run_dir / LOCK).exists() and not (run_dir / "metrics.json").exists()

    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert command[0] == "metaad-train" and command[-2:] == [f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    assert command[1:-2] == LONG
    resumed = subprocess.run(
        [str(BIN / "metaad-train"), *command[1:]], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    metrics = strict_json(run_dir / "metrics.json")
    assert metrics["global_step"] == straight["global_step"] == 500
    assert metrics["val_auroc_best"] == pytest.approx(straight["val_auroc_best"], abs=1e-6)
    assert metrics["test"]["auroc"]["mean"] == pytest.approx(straight["test"]["auroc"]["mean"], abs=1e-6)
    assert not any(advice in stderr for advice in UNSAFE)


def processes_running_in(folder: Path) -> list[int]:
    """Pids of live processes whose command line names ``folder`` (a rank left behind)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_sigterm_to_a_ddp_run_stops_every_rank_at_one_step_with_one_line(tmp_path):
    run_dir = tmp_path / "ddp run"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(BIN / "metaad-train"), *LONG, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    started(process, last)  # both ranks train: a step takes both
    process.send_signal(signal.SIGTERM)  # to the first rank only, as `kill <pid>` does
    _, stderr = process.communicate(timeout=120)
    time.sleep(1)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("metaad-train:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"metaad-train: interrupted by SIGTERM; {last} holds step "
    )
    step = int(lines[0].split(" holds step ")[1].split(".")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert not processes_running_in(run_dir), "the second rank must stop with the first"
    assert not (run_dir / LOCK).exists()
