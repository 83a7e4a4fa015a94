"""Scaling out: DDP sharding and launch, resume after a crash, sweeps (grid and Optuna) and their summary.

The fast tests check the pieces in-process; the slow ones run the real ``metaad-train`` /
``metaad-eval`` as subprocesses: 2 CPU processes (gloo), multirun sweeps, a SIGKILL mid-run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metaad.apps.build import plain
from metaad.apps.summarize import summarize_sweep
from metaad.data import DataError, EpisodeDataModule, EpisodeSampler
from metaad.data.sources import digits
from metaad.training.distributed import HydraDDPStrategy, check_launch, rank_command
from metaad.training.resume import load_resume_state, resolve_ckpt_path
from tests.conftest import event_dir, run_app

BIN = Path(sys.executable).parent

TINY = ["experiment=digits", "debug=quick", "trainer.max_epochs=2", "dataset.meta_batch_size=4"]


# --- fast: the pieces -------------------------------------------------------------------------


def module(meta_batch_size: int = 4, train_episodes: int = 16) -> EpisodeDataModule:
    dm = EpisodeDataModule(
        source=digits,
        train_tasks=[0, 1, 2],
        val_tasks=[3, 4],
        test_tasks=[5, 6],
        k_shot=3,
        n_query=6,
        meta_batch_size=meta_batch_size,
        train_episodes=train_episodes,
        val_episodes=4,
        test_episodes=4,
        eval_batch_size=4,
    )
    dm.setup()
    return dm


def test_ranks_split_each_meta_batch_so_steps_match_one_process():
    """meta_batch_size is per optimizer step over all ranks: at every step the ranks' episodes
    together are exactly the episodes one process trains on at that step."""
    single = module(meta_batch_size=4, train_episodes=16)
    ranks = [module(meta_batch_size=4, train_episodes=16) for _ in range(2)]
    for rank, dm in enumerate(ranks):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
    one = [batch.query for batch in single.train_dataloader()]
    two = [[batch.query for batch in dm.train_dataloader()] for dm in ranks]
    assert len(one) == len(two[0]) == len(two[1]) == 4
    for step, query in enumerate(one):
        assert two[0][step].shape[0] == two[1][step].shape[0] == 2
        together = torch.cat([two[0][step], two[1][step]])
        assert sorted(map(hash_rows, together)) == sorted(map(hash_rows, query))
        assert not torch.equal(two[0][step], two[1][step]), "ranks must draw different episodes"


def hash_rows(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


def test_meta_batch_that_does_not_split_over_the_ranks_is_refused():
    dm = module(meta_batch_size=4)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(
        DataError, match=r"meta_batch_size \(4\) must be divisible by the number of processes \(3\)"
    ):
        dm.train_dataloader()


def test_sampler_resumes_mid_epoch_without_repeating_or_skipping():
    full = list(EpisodeSampler(20, rank=1, world_size=2))
    sampler = EpisodeSampler(20, rank=1, world_size=2)
    sampler.skip(epoch=0, n=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full)  # len: the epoch's full share
    sampler.set_epoch(1)
    assert len(list(sampler)) == len(full), "the skip applies to the resumed epoch only"


def test_train_loader_state_round_trip_resumes_the_episode_stream():
    """The loader state Lightning stores in a checkpoint makes a fresh loader continue the stream."""
    dm = module(meta_batch_size=4, train_episodes=16)
    done = 3
    before = dm.train_dataloader()
    before.batches_done = lambda: done  # what the fit loop reports after 3 trained batches
    state = before.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}
    expected = [batch.query for batch in dm.train_dataloader()][done:]
    after = dm.train_dataloader()
    after.load_state_dict(state)
    resumed = [batch.query for batch in after]
    assert len(resumed) == len(expected) == 1 and torch.equal(resumed[0], expected[0])


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hydra\.run\.dir=<its folder> ckpt_path=last"):
        resolve_ckpt_path("last", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None


def test_resume_with_another_config_is_refused_naming_the_keys(compose_cfg, tmp_path):
    cfg = compose_cfg([])
    path = tmp_path / "last.ckpt"
    torch.save({"metaad_config": plain(cfg)}, path)
    assert load_resume_state(path, cfg)["metaad_config"]["seed"] == cfg.seed
    other = compose_cfg(["dataset.k_shot=1", "model.distance=cosine", "trainer.max_epochs=5"])
    with pytest.raises(ValueError, match=r"dataset\.k_shot: 5 in the checkpoint, 1 now; model\.distance"):
        load_resume_state(path, other)


def test_extra_ranks_run_the_jobs_own_overrides_in_its_folder(compose_cfg):
    cfg = compose_cfg(["model.distance=cosine"])
    command, cwd = rank_command("metaad.apps.train")
    assert command[:3] == [sys.executable, "-m", "metaad.apps.train"]
    assert "model.distance=cosine" in command and "-m" not in command[3:] and "--multirun" not in command
    assert f"hydra.run.dir='{cfg.paths.output_dir}'" in command
    assert "hydra.mode=RUN" in command and "hydra.output_subdir=null" in command
    assert cwd == HydraConfig.get().runtime.cwd


def test_lightning_ddp_inside_a_multirun_is_refused_and_trainer_ddp_is_not(compose_cfg):
    assert compose_cfg(["hydra.mode=MULTIRUN"]).hydra.mode == RunMode.MULTIRUN
    plain_ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(RuntimeError, match=r"replay the whole sweep\. Use trainer=ddp"):
        check_launch(plain_ddp)
    ours = pl.Trainer(
        accelerator="cpu", devices=2, strategy=HydraDDPStrategy(app="metaad.apps.train"), logger=False
    )
    check_launch(ours)
    with pytest.raises(ValueError, match="trainer.strategy.app"):
        HydraDDPStrategy(app="metaad.no_such_app")


def write_job(sweep: Path, num: int, overrides: list[str], val: float | None, test: float = 0.0) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if val is not None:
        auroc = {"mean": test, "ci95": 0.01, "n_episodes": 40}
        metrics = {"model": "protonet", "k_shot": 1, "seed": 0, "val_auroc_best": val, "global_step": 8}
        metrics |= {"test": {"auroc": auroc}, "baselines": {}}
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_summary_sorts_by_validation_and_lists_unfinished_jobs(tmp_path, capsys):
    common = "trainer.max_epochs=2"
    write_job(tmp_path, 0, ["model=protonet", "dataset.k_shot=1", common], val=0.81, test=0.95)
    write_job(tmp_path, 1, ["model=protonet", "dataset.k_shot=5", common], val=0.90, test=0.85)
    write_job(tmp_path, 2, ["model=siamese", "dataset.k_shot=1", common], val=None)
    rows = summarize_sweep(tmp_path)
    assert [r["job"] for r in rows] == ["1", "0", "2"], "best validation first (never chosen on test)"
    assert rows[0]["overrides"] == "model=protonet dataset.k_shot=5"
    assert rows[2]["status"] == "no metrics.json"
    out = capsys.readouterr().out
    assert "best config (by val/auroc): job 1: model=protonet dataset.k_shot=5" in out
    markdown = (tmp_path / "sweep_summary.md").read_text().splitlines()
    assert len(markdown) == 5 and "| 1 | model=protonet dataset.k_shot=5 | 0.9000 | 0.8500 |" in markdown[2]
    assert (tmp_path / "sweep_summary.csv").read_text().count("\n") == 4


# --- slow: real processes ---------------------------------------------------------------------


def run_ok(app: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = run_app(app, args, cwd, timeout)
    assert done.returncode == 0, (
        f"{app} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_two_process_ddp_trains_and_evaluates_like_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok("metaad-train", [*TINY, f"hydra.run.dir={one}"], tmp_path)
    run_ok("metaad-train", [*TINY, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={two}"], tmp_path)
    assert (two / "train_rank1.log").is_file(), "a second process must have run"
    assert "rank 1/2 trained" in (two / "train_rank1.log").read_text()
    assert "rank 0/2 trained" in (two / "train.log").read_text()
    m1, m2 = metrics_of(one), metrics_of(two)
    # The same optimizer steps on the same episodes; only the order in which the gradients are
    # summed differs (each rank averages its share, the all-reduce averages the ranks), so the
    # numbers agree within the tolerance the README states, not to the last bit: AUROC and AUPR
    # within 1e-4, the fitted threshold within 1e-4 of its value; the baselines (no training) exactly.
    assert m2["global_step"] == m1["global_step"] == 16
    assert m2["val_auroc_best"] == pytest.approx(m1["val_auroc_best"], abs=1e-4)
    for metric in ("auroc", "aupr"):
        assert m2["test"][metric]["mean"] == pytest.approx(m1["test"][metric]["mean"], abs=1e-4), metric
        assert m2["val"][m2["model"]][metric]["mean"] == pytest.approx(
            m1["val"][m1["model"]][metric]["mean"], abs=1e-4
        )
    assert m2["threshold"]["value"] == pytest.approx(m1["threshold"]["value"], rel=1e-4)
    assert m2["baselines"] == m1["baselines"]
    # the same checkpoint evaluated by 2 processes reports exactly the one-process test numbers
    evaluated = tmp_path / "eval2"
    ckpt = one / "checkpoints" / "best.ckpt"
    run_ok(
        "metaad-eval",
        [f"ckpt_path={ckpt}", "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={evaluated}"],
        tmp_path,
    )
    # each rank scored half of the 20 val and 40 test episodes; the gathered results are the one-process ones
    assert "{'val': 10, 'test': 20}" in (evaluated / "eval_rank1.log").read_text()
    one_process = tmp_path / "eval1"
    run_ok("metaad-eval", [f"ckpt_path={ckpt}", f"hydra.run.dir={one_process}"], tmp_path)
    m_eval, m_one = metrics_of(evaluated), metrics_of(one_process)
    for block in ("test", "baselines", "val", "threshold"):
        assert m_eval[block] == m_one[block], block
    assert m_eval["test"]["auroc"]["n_episodes"] == 40, "every episode once: no padding duplicates"
    assert m_one["test"]["auroc"] == pytest.approx(m1["test"]["auroc"], abs=1e-9)


@pytest.mark.slow
def test_sweep_with_two_ddp_processes_per_job_gives_each_job_its_own_hyperparameters(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "backbone.embed_dim=16,32",
        "trainer=ddp",
        "trainer.devices=2",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    ]
    run_ok("metaad-train", args, tmp_path, timeout=400)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != "tensorboard")  # the sweep's events
    assert [p.name for p in jobs] == ["0", "1"], "no rank may replay the sweep into more job folders"
    for job, embed_dim in zip(jobs, (16, 32)):
        assert f"backbone.embed_dim={embed_dim}" in yaml.safe_load(
            (job / ".hydra" / "overrides.yaml").read_text()
        )
        for rank, log in ((0, "train.log"), (1, "train_rank1.log")):
            lines = [ln for ln in (job / log).read_text().splitlines() if f"rank {rank}/2 trained" in ln]
            assert len(lines) == 1, f"{job / log}: one run of this job only"
            hparams = json.loads(lines[0].split(" steps; ", 1)[1])
            assert hparams["backbone"]["embed_dim"] == embed_dim
        assert metrics_of(job)["global_step"] == 16
    rows = summarize_sweep(sweep)
    assert {r["overrides"] for r in rows} == {"backbone.embed_dim=16", "backbone.embed_dim=32"}


@pytest.mark.slow
def test_optuna_study_of_two_trials_maximises_validation_auroc_in_sqlite(tmp_path):
    sweep, db = tmp_path / "optuna", tmp_path / "study.db"
    args = [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{db}",
    ]
    run_ok("metaad-train", [*args, *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    vals = [metrics_of(sweep / str(n))["val_auroc_best"] for n in range(2)]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(vals), abs=1e-9)
    study = optuna.load_study(study_name="metaad", storage=f"sqlite:///{db}")
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(vals), abs=1e-9)
    assert set(study.trials[0].params) == {"model.optimizer.lr", "backbone.embed_dim", "model.distance"}
    best = summarize_sweep(sweep)[0]
    assert best["val/auroc"] == pytest.approx(max(vals), abs=1e-9)


def tensorboard_curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_killed_run_resumes_in_its_folder_with_the_same_steps_episodes_and_result(tmp_path):
    config = [
        *TINY,
        "dataset.train_episodes=64",
        "trainer.log_every_n_steps=1",
        "callbacks.last_checkpoint.every_n_train_steps=5",
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_ok("metaad-train", [*config, f"hydra.run.dir={straight}"], tmp_path)

    process = subprocess.Popen(
        [str(BIN / "metaad-train"), *config, f"hydra.run.dir={crashed}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = crashed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it train (and log) past the checkpoint
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run must be killed mid-way, not finish"
    assert not (crashed / "metrics.json").exists()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < 32

    run_ok("metaad-train", [*config, f"hydra.run.dir={crashed}", "ckpt_path=last"], tmp_path)
    a, b = metrics_of(straight), metrics_of(crashed)
    assert b["global_step"] == a["global_step"] == 32
    assert b["val_auroc_best"] == pytest.approx(a["val_auroc_best"], abs=1e-6)
    assert b["test"]["auroc"]["mean"] == pytest.approx(a["test"]["auroc"]["mean"], abs=1e-6)
    # the same loss at every step: no episode repeated or skipped, and TensorBoard shows one curve
    curve_a, curve_b = tensorboard_curve(straight, "train/loss"), tensorboard_curve(crashed, "train/loss")
    assert [s for s, _ in curve_b] == [s for s, _ in curve_a] and len(curve_a) == 32
    assert [v for _, v in curve_b] == pytest.approx([v for _, v in curve_a], abs=1e-5)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
        "last.previous.ckpt",
    ]


@pytest.mark.slow
def test_two_ddp_ranks_build_one_store_and_train_from_it_like_one_process_from_memory(tmp_path):
    """Both ranks read the table into the same cache at once: one store results, and the numbers are
    the in-memory run's (exactly for one process, up to summation order for two)."""
    rng = np.random.default_rng(0)
    n = 1200
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"f{j}" for j in range(6)])
    frame["machine"] = [f"m{i % 12:02d}" for i in range(n)]
    frame["faulty"] = (np.arange(n) // 12) % 5 == 4
    frame.loc[frame.faulty, ["f0", "f1"]] += 2.0
    frame.astype({"faulty": int}).to_csv(tmp_path / "t.csv", index=False)
    data = [
        "dataset=table",
        f"dataset.source.path={tmp_path / 't.csv'}",
        "dataset.source.task_column=machine",
        "dataset.source.anomaly_column=faulty",
        "dataset.val_tasks=[m10]",
        "dataset.test_tasks=[m11]",
    ]
    cache = tmp_path / "cache"
    runs = {
        "memory": [],
        "store": [f"dataset.source.cache={cache}"],
        "ddp": [f"dataset.source.cache={tmp_path / 'cache2'}", "trainer=ddp", "trainer.devices=2"],
    }
    for name, extra in runs.items():
        run_ok("metaad-train", [*TINY, *data, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path)
    memory, stored, ddp = (metrics_of(tmp_path / name) for name in runs)
    for block in ("test", "baselines", "val"):
        assert stored[block] == memory[block], block
    assert ddp["test"]["auroc"]["mean"] == pytest.approx(memory["test"]["auroc"]["mean"], abs=1e-4)
    assert ddp["baselines"] == memory["baselines"]
    assert [p.name.split("-")[0] for p in (tmp_path / "cache2").iterdir()] == ["t.csv"]
