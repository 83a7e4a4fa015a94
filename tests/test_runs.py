"""Run folders belong to one run; start-up errors are one clean block and leave nothing behind;
checkpoint generations survive a truncated file or a full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaad.apps.runs import LOCK, claim
from metaad.apps.train import train
from metaad.checkpoint import load as load_checkpoint
from metaad.checkpoint import previous_of, save_generation
from metaad.errors import CheckpointError, RunFolderError
from metaad.training.resume import resolve_ckpt_path
from tests.conftest import run_app

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.optimizer.lr=-0.001"], "model.optimizer.lr must be positive, got -0.001"),
        (["threshold=fixed", "threshold.value=high"], "threshold.value must be a number, got 'high'"),
        (["threshold=fixed", "threshold.value=null"], "threshold.value must be a number, got None"),
        (["dataset.k_shot=0"], "dataset.k_shot must be a positive integer, got 0"),
        (["dataset.n_query=2.5"], "dataset.n_query must be a positive integer, got 2.5"),
        (["trainer=ddp", "dataset.meta_batch_size=5"], r"dataset.meta_batch_size \(5\) must be divisible"),
        (["dataset=task_files"], r"give them: dataset.source.root=\.\.\."),
        (["+model.bogus=1"], "unexpected keyword argument 'bogus'"),
    ],
)
def test_a_config_mistake_is_one_message_and_leaves_no_run_folder(tmp_path, args, message):
    run_dir = tmp_path / "run"
    done = run_app("metaad-train", ["debug=quick", *args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("metaad-train: error:")]
    assert len(lines) == 1, done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not run_dir.exists()


def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    args = ["debug=quick", "model.optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run([str(BIN / "metaad-train"), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_a_folder_in_use_by_a_live_run_is_refused(compose_cfg):
    cfg = compose_cfg()
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / LOCK).write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(RunFolderError, match=f"run folder {run_dir} is in use by another run"):
        train(cfg)
    assert not (run_dir / ".hydra").exists() and not (run_dir / "checkpoints").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(compose_cfg):
    cfg = compose_cfg(["logger=none", "baselines=none", "test=false"])
    run_dir = Path(cfg.paths.output_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (run_dir / LOCK).write_text(dead.stdout.decode().strip())
    train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / LOCK).exists()


def test_a_finished_run_folder_is_not_reused_and_a_refused_resume_changes_nothing(compose_cfg):
    cfg = compose_cfg(["logger=none", "baselines=none", "test=false"])
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    before = {p: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}
    with pytest.raises(RunFolderError, match="already holds a run .*ckpt_path=last"):
        train(cfg)
    changed = compose_cfg(
        ["logger=none", "baselines=none", "test=false", "ckpt_path=last", "dataset.k_shot=3"]
    )
    with pytest.raises(CheckpointError, match="dataset.k_shot: 5 in the checkpoint, 3 now"):
        train(changed)
    assert {p: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())} == before


def test_save_generation_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_generation(lambda f: torch.save({"step": 1}, f), path)
    save_generation(lambda f: torch.save({"step": 2}, f), path)
    assert torch.load(path)["step"] == 2 and torch.load(previous_of(path))["step"] == 1
    assert not list(tmp_path.glob("*.partial"))


def test_a_full_disk_names_the_folder_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_generation(lambda f: torch.save({"step": 1}, f), path)

    def full_disk(file: Path) -> None:
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFolderError, match=rf"{tmp_path}: no space left .*\({path}\) is intact"):
        save_generation(full_disk, path)
    assert torch.load(path)["step"] == 1 and not list(tmp_path.glob("*.partial"))


def test_resume_falls_back_to_the_previous_generation_of_a_truncated_last_checkpoint(compose_cfg):
    cfg = compose_cfg(["logger=none", "baselines=none", "test=false", "trainer.max_epochs=2"])
    train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    last = folder / "last.ckpt"
    assert previous_of(last).is_file()
    last.write_bytes(last.read_bytes()[:1000])  # a crash mid-write of an older, non-atomic writer
    (folder / "last.ckpt.partial").write_bytes(b"leftover")
    with pytest.warns(UserWarning, match="resuming from the generation before it"):
        resolved = resolve_ckpt_path("last", folder.parent)
    assert resolved == previous_of(last) and not (folder / "last.ckpt.partial").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "is not a checkpoint"),
        (None, "holds objects other than tensors and plain data"),
        ("truncated", "truncated or corrupt"),
    ],
    ids=["text", "pickled-object", "truncated"],
)
def test_bad_checkpoints_are_refused_without_advising_an_unsafe_load(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    if content is None:
        torch.save({"metaad_config": {}, "payload": Path("x")}, path)  # an object torch will not load safely
    elif content == "truncated":
        torch.save({"metaad_config": {}, "weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "weights_only=False" not in str(error.value)


def test_claim_lets_the_extra_ranks_of_a_ddp_run_share_the_folder(tmp_path, monkeypatch, compose_cfg):
    cfg = compose_cfg()
    run_dir = Path(cfg.paths.output_dir)
    with claim(cfg, run_dir, resume=False):
        assert (run_dir / LOCK).read_text() == str(os.getpid())
        monkeypatch.setenv("LOCAL_RANK", "1")
        with claim(cfg, run_dir, resume=False):  # rank 1 of the same run: no lock, no refusal
            pass
        monkeypatch.delenv("LOCAL_RANK")
    assert not (run_dir / LOCK).exists()
