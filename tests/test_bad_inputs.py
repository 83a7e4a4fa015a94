"""The bad-input battery: what a new user gets wrong, and what metaad says back.

Every case asserts one outcome: a refusal whose message names the file, field or setting and what
is wrong (and never advises an unsafe load), or a documented correct handling. Most cases call
the functions in-process (sources, config checks, ``metaad.load``, ``metaad.apps.score.score``); a few
run the command line, where one error block without a traceback is what is tested.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

import metaad
from metaad.apps.build import build_datamodule
from metaad.apps.checks import check_train_config
from metaad.apps.runs import LOCK, claim
from metaad.apps.score import read_samples, score
from metaad.apps.train import train
from metaad.data import DataError
from metaad.data.sources import omniglot, table, task_files
from metaad.errors import CheckpointError, ConfigError, RunFolderError
from metaad.training.resume import load_resume_state, resolve_ckpt_path
from tests.conftest import compose_in, run_app

BIN = Path(sys.executable).parent
UNSAFE = ("weights_only=False", "allow_pickle", "pickle.load", "trust")
PIXELS = [f"p{i}" for i in range(64)]


def refused(error: pytest.ExceptionInfo, *named: str) -> str:
    """The message, after checking it names each of ``named`` and advises nothing unsafe."""
    text = str(error.value)
    for name in named:
        assert str(name) in text, text
    assert not any(advice in text for advice in UNSAFE), text
    return text


class Pwned:
    """An object whose unpickling would write a marker file: loading it must never happen."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def pwned(tmp_path: Path) -> Pwned:
    evil = Pwned()
    Pwned.marker = evil.marker = tmp_path / "PWNED"
    return evil


# --- tables (dataset=table) ----------------------------------------------------------------------


def frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = pd.DataFrame(rng.normal(size=(n, 3)), columns=["f1", "f2", "f3"])
    data["machine"] = np.repeat(["m1", "m2", "m3", "m4"], n // 4)
    data["faulty"] = np.tile([0, 0, 0, 1], n // 4)
    return data


def write_text_table(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def duplicate_label(path: Path) -> Path:
    """The anomaly column twice: pandas would read the copy as ``faulty.1``, a feature (a label leak)."""
    lines = frame().to_csv(index=False).splitlines()
    return write_text_table(path, lines[0] + ",faulty", [f"{row},{row.split(',')[-1]}" for row in lines[1:]])


def duplicate_feature(path: Path) -> Path:
    lines = frame().to_csv(index=False).splitlines()
    return write_text_table(path, lines[0].replace("f2", "f1"), lines[1:])


def duplicate_in_tsv(path: Path) -> Path:
    lines = frame().to_csv(index=False, sep="\t").splitlines()
    return write_text_table(path.with_suffix(".tsv"), lines[0].replace("f3", "machine"), lines[1:])


def no_header(path: Path) -> Path:
    frame().to_csv(path, index=False, header=False)
    return path


def header_only(path: Path) -> Path:
    path.write_text("f1,f2,f3,machine,faulty\n")
    return path


def binary_csv(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 8)
    return path


def longer_rows(path: Path) -> Path:
    lines = frame().to_csv(index=False).splitlines()
    return write_text_table(path, lines[0], [f"{row},9" for row in lines[1:]])


def npy_as_npz(path: Path) -> Path:
    target = path.with_suffix(".npz")
    with open(target, "wb") as file:
        np.save(file, np.zeros((4, 3)))
    return target


def text_as_npz(path: Path) -> Path:
    target = path.with_suffix(".npz")
    target.write_text("machine,faulty\nm1,0\n")
    return target


def clashing_npz(path: Path) -> Path:
    data = frame()
    target = path.with_suffix(".npz")
    np.savez(
        target,
        X=data[["f1", "f2"]].to_numpy(),
        X_0=data.f3.to_numpy(),  # the 2-D X is read as X_0, X_1: X_0 twice
        machine=data.machine.to_numpy(str),
        faulty=data.faulty.to_numpy(),
    )
    return target


def changed(**columns):
    def write(path: Path) -> Path:
        frame().assign(**columns).to_csv(path, index=False)
        return path

    return write


LABELLED = dict(task_column="machine", anomaly_column="faulty")


@pytest.mark.parametrize(
    "make, kwargs, named",
    [
        (duplicate_label, LABELLED, ["dup.csv", "['faulty'] more than once"]),
        (duplicate_feature, LABELLED, ["dup.csv", "['f1'] more than once"]),
        (duplicate_in_tsv, LABELLED, ["dup.tsv", "['machine'] more than once"]),
        (no_header, LABELLED, ["task_column names ['machine']", "needs a header row"]),
        (header_only, LABELLED, ["dup.csv", "no data rows"]),
        (binary_csv, LABELLED, ["dup.csv", "not a UTF-8 text table"]),
        (longer_rows, LABELLED, ["dup.csv", "more fields than its header"]),
        (changed(note="x"), LABELLED, ["feature column(s) ['note'] are not numeric", "ignore_columns"]),
        (
            changed(faulty=np.tile([0, 1, 2, 0], 10)),
            LABELLED,
            ["column 'faulty'", "0 (normal) or 1", "row 2"],
        ),
        (changed(faulty=["yes"] * 40), LABELLED, ["column 'faulty'", "'yes'"]),
        (changed(), dict(task_column="site"), ["dataset.source.task_column names ['site']"]),
        (changed(), dict(task_column="machine", anomaly_column="label"), ["anomaly_column names ['label']"]),
        (changed(), dict(LABELLED, features=["f1", "f9"]), ["dataset.source.features names ['f9']"]),
        (changed(), dict(LABELLED, ignore_columns=["id"]), ["ignore_columns names ['id']"]),
        (changed(), dict(LABELLED, features="f1"), ["dataset.source.features must be a list", "'f1'"]),
        (changed(), dict(task_column=["machine"]), ["dataset.source.task_column must be one column name"]),
        (npy_as_npz, LABELLED, ["dup.npz", "single .npy array", "not an .npz archive"]),
        (text_as_npz, LABELLED, ["dup.npz", "never unpickles"]),
        (clashing_npz, LABELLED, ["dup.npz", "['X_0'] come twice"]),
        (
            lambda p: (frame().to_csv(p), p)[1],
            LABELLED,
            ["dup.csv", "unnamed (['Unnamed: 0']", "index=False"],
        ),
        (
            changed(),
            dict(LABELLED, drop_missing="maybe"),
            ["dataset.source.drop_missing must be true or false"],
        ),
    ],
    ids=[
        "duplicate-anomaly-column",
        "duplicate-feature-column",
        "duplicate-in-tsv",
        "numeric-header-row",
        "header-only",
        "binary-csv",
        "rows-longer-than-header",
        "text-feature-column",
        "label-2",
        "label-yes",
        "missing-task-column",
        "missing-anomaly-column",
        "missing-feature",
        "missing-ignored",
        "features-as-a-string",
        "task-column-as-a-list",
        "npy-named-npz",
        "text-named-npz",
        "npz-column-clash",
        "pandas-index-column",
        "drop-missing-not-a-switch",
    ],
)
def test_a_bad_table_is_refused_naming_file_and_column(tmp_path, make, kwargs, named):
    path = make(tmp_path / "dup.csv")
    with pytest.raises(DataError) as error:
        table(str(path), **kwargs)
    refused(error, *named)


def test_an_empty_table_file_is_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError) as error:
        table(str(tmp_path / "empty.csv"), "machine")
    refused(error, "empty.csv", "cannot read the table")


def test_a_text_file_named_parquet_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    frame().to_csv(tmp_path / "t.parquet", index=False)
    with pytest.raises(DataError) as error:
        table(str(tmp_path / "t.parquet"), **LABELLED)
    refused(error, "t.parquet", "cannot read the table")


def test_a_header_of_pandas_positions_is_a_header_and_names_columns_by_number(tmp_path):
    """A frame without column names is written with the header 0, 1, ...: integers name the columns."""
    data = frame()
    data.columns = range(5)
    data.to_csv(tmp_path / "t.csv", index=False)
    read = table(str(tmp_path / "t.csv"), task_column=3, anomaly_column=4)
    assert read.x.shape == (40, 3) and read.preprocessing.feature_names == ("0", "1", "2")
    assert read.anomalous.sum() == 10


def test_an_unnamed_index_column_listed_in_ignore_columns_is_left_out(tmp_path):
    frame().to_csv(tmp_path / "t.csv")  # pandas writes its index as a first, unnamed column
    read = table(str(tmp_path / "t.csv"), **LABELLED, ignore_columns=["Unnamed: 0"])
    assert read.preprocessing.feature_names == ("f1", "f2", "f3")


def test_columns_named_like_pandas_renames_are_distinct_columns(tmp_path):
    """``a`` and ``a.1`` written by the user are two names, not a repeat."""
    data = frame().rename(columns={"f2": "f1.1"})
    data.to_csv(tmp_path / "t.csv", index=False)
    read = table(str(tmp_path / "t.csv"), **LABELLED)
    assert read.preprocessing.feature_names == ("f1", "f1.1", "f3")


# --- task files (dataset=task_files) -------------------------------------------------------------


def task_folder(tmp_path: Path) -> Path:
    root = tmp_path / "tasks"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "a.npz", X=rng.normal(size=(30, 4)), y=np.r_[np.zeros(24), np.ones(6)])
    return root


def ragged(path: Path, tmp_path: Path) -> None:
    np.savez(path, X=np.array([np.zeros(3), np.zeros(4)], dtype=object), y=np.zeros(2))


def pickled_object(path: Path, tmp_path: Path) -> None:
    np.savez(path, X=np.array([pwned(tmp_path)], dtype=object), y=np.zeros(1))


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda p, t: np.savez(p, X=np.zeros((5, 4))), ["bad.npz: no y", "has ['X']"]),
        (lambda p, t: np.savez(p, data=np.zeros((5, 4)), y=np.zeros(5)), ["bad.npz: no X"]),
        (ragged, ["bad.npz", "object (pickled) arrays", "never unpickles"]),
        (pickled_object, ["bad.npz", "object (pickled) arrays"]),
        (
            lambda p, t: np.savez(p, X=np.zeros((5, 4)), y=np.zeros(4)),
            ["bad.npz: y has shape (4,)", "5 rows"],
        ),
        (lambda p, t: np.savez(p, X=np.zeros((5, 4)), y=np.zeros((5, 1))), ["bad.npz: y has shape (5, 1)"]),
        (lambda p, t: np.savez(p, X=np.zeros((5, 3)), y=np.zeros(5)), ["bad.npz: X has feature shape (3,)"]),
        (lambda p, t: np.savez(p, X=np.zeros((0, 4)), y=np.zeros(0)), ["bad.npz: X must be a non-empty"]),
        (lambda p, t: np.savez(p, X=np.full((5, 4), "a"), y=np.zeros(5)), ["bad.npz", "numeric", "<U1"]),
        (lambda p, t: np.savez(p, X=np.zeros((5, 4), complex), y=np.zeros(5)), ["bad.npz", "real numbers"]),
        (lambda p, t: np.savez(p, X=np.zeros((5, 4)), y=np.r_[0, 0, 0, 1, 0.5]), ["bad.npz", "row 4 holds"]),
        (lambda p, t: p.write_text("X,y\n1,0\n"), ["bad.npz: cannot read it as .npz", "never unpickles"]),
        (lambda p, t: p.write_bytes(b"PK\x03\x04 truncated"), ["bad.npz: cannot read it as .npz"]),
        (lambda p, t: np.save(open(p, "wb"), np.zeros((5, 4))), ["bad.npz", "single .npy array"]),
    ],
    ids=[
        "no-y",
        "no-X",
        "ragged",
        "pickled-object",
        "y-too-short",
        "y-2d",
        "other-features",
        "no-rows",
        "text-X",
        "complex-X",
        "label-half",
        "text-file",
        "truncated-zip",
        "npy-named-npz",
    ],
)
def test_a_bad_task_file_is_refused_naming_it_without_unpickling(tmp_path, make, named):
    root = task_folder(tmp_path)
    make(root / "bad.npz", tmp_path)
    with pytest.raises(DataError) as error:
        task_files(str(root))
    refused(error, *named)
    assert not (tmp_path / "PWNED").exists()


def test_a_task_file_pattern_that_is_not_a_pattern_is_named(tmp_path):
    with pytest.raises(DataError) as error:
        task_files(str(task_folder(tmp_path)), pattern=5)
    refused(error, "dataset.source.pattern must be a file name pattern", "got 5")


# --- images (Omniglot layout, image folders for metaad-score) -------------------------------------


def glyph(path: Path, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 255, np.uint8)).save(path)


@pytest.mark.parametrize(
    "root, make, named",
    [
        ("x.zip", lambda r: r.write_bytes(b"not a zip"), ["x.zip: not a readable zip"]),
        ("x.tar", lambda r: r.write_bytes(b"not a zip"), ["x.tar is neither a folder nor a .zip"]),
        (
            "root",
            lambda r: (r.mkdir(), (r / "images_background.zip").write_bytes(b"PK junk")),
            ["images_background.zip: not a readable zip"],
        ),
        (
            "root",
            lambda r: (
                glyph(r / "A" / "c1" / "1.png"),
                (r / "A" / "c1" / "2.png").write_bytes(b"\x89PNG junk"),
            ),
            ["2.png: cannot decode the image"],
        ),
        (
            "root",
            lambda r: glyph(r / "stray.png"),
            ["stray.png: expected the layout <Alphabet>/<character>/"],
        ),
        ("root", lambda r: (r.mkdir(), (r / "notes.txt").write_text("x")), ["no .png images"]),
    ],
    ids=[
        "zip-not-a-zip",
        "not-a-zip-at-all",
        "corrupt-zip-in-folder",
        "png-not-decoding",
        "wrong-layout",
        "no-images",
    ],
)
def test_bad_omniglot_data_is_refused_naming_the_file(tmp_path, root, make, named):
    make(tmp_path / root)
    with pytest.raises(DataError) as error:
        omniglot(str(tmp_path / root))
    refused(error, *named)


def test_an_image_in_a_score_folder_that_does_not_decode_is_named(tmp_path):
    glyph(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "b.png").write_text("not a png")
    with pytest.raises(DataError) as error:
        read_samples(tmp_path / "images", "query")
    refused(error, "query", "b.png: cannot decode the image")


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.k_shot=five"], "dataset.k_shot must be a positive integer, got 'five'"),
        (["dataset.k_shot=null"], "dataset.k_shot must be a positive integer, got None"),
        (["dataset.meta_batch_size=-2"], "dataset.meta_batch_size must be a positive integer, got -2"),
        (["dataset.val_n_query=0"], "dataset.val_n_query must be a positive integer or null"),
        (["dataset.num_workers=-1"], "dataset.num_workers must be an integer >= 0, got -1"),
        (["dataset.anomaly_ratio=1.5"], "dataset.anomaly_ratio must be in (0, 1)"),
        (["dataset.anomaly_ratio=0"], "dataset.anomaly_ratio must be in (0, 1)"),
        (["dataset.anomaly_ratio=half"], "dataset.anomaly_ratio must be a number, got 'half'"),
        (["dataset.anomaly_ratio=0.01"], "dataset.n_query=20 with anomaly_ratio=0.01 gives 0 anomalies"),
        (
            ["dataset.meta_batch_size=64"],
            "dataset.train_episodes (32) is smaller than dataset.meta_batch_size",
        ),
        (["dataset.val_tasks=6"], "dataset.val_tasks must be a list of tasks, e.g. dataset.val_tasks=[6]"),
        (["dataset.train_rotations=90"], "dataset.train_rotations must be a list"),
        (["dataset.anomalies_from=others"], "dataset.anomalies_from must be 'split' or 'source_test'"),
        (["dataset.require_disjoint=maybe"], "dataset.require_disjoint must be true or false, got 'maybe'"),
        (["seed=null"], "seed must be a non-negative integer, got None"),
        (["seed=abc"], "seed must be a non-negative integer, got 'abc'"),
        (["test=yes please"], "test must be true or false"),
        (["model.optimizer.lr=-0.001"], "model.optimizer.lr must be positive, got -0.001"),
        (["model.optimizer.lr=fast"], "model.optimizer.lr must be a number, got 'fast'"),
        (["model=maml", "model.inner_lr=0"], "model.inner_lr must be positive, got 0"),
        (["model=maml", "model.inner_steps=1.5"], "model.inner_steps must be a positive integer, got 1.5"),
        (["model=siamese", "model.margin=null"], "model.margin must be a number, got None"),
        (["model=siamese", "model.aggregation=knn", "model.k=8"], "model.k (8) nearest neighbours"),
        (["threshold=fixed", "threshold.value=nan"], "threshold.value must be a finite number, got nan"),
        (["model.optimizer.lr=inf"], "model.optimizer.lr must be a finite number, got inf"),
        (["backbone.hidden=128"], "backbone.hidden must be a list of layer widths"),
        (["backbone.embed_dim=0"], "backbone.embed_dim must be a positive integer, got 0"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be a positive integer (or -1: no limit), got 0"),
        (["trainer.max_epochs=ten"], "trainer.max_epochs must be a positive integer"),
        (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be a positive integer"),
        (["threshold=fixed", "threshold.value=high"], "threshold.value must be a number, got 'high'"),
        (["threshold=fixed", "threshold.value=null"], "threshold.value must be a number, got None"),
        (["threshold=support_quantile", "threshold.q=2"], "threshold.q must be in [0, 1]"),
        (["threshold=support_quantile", "threshold.margin=-1"], "threshold.margin must be positive, got -1"),
        (["threshold.normalise=l2"], "threshold.normalise must be 'zscore' or 'none', got 'l2'"),
        (["trainer=ddp", "dataset.meta_batch_size=5"], "dataset.meta_batch_size (5) must be divisible"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_a_bad_setting_is_refused_before_any_data_naming_it(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as error:
        check_train_config(compose_cfg(overrides))
    refused(error, message)


def test_a_trainer_setting_lightning_refuses_is_one_message_not_a_bug(compose_cfg):
    from hydra.errors import InstantiationException

    from metaad.apps.build import build_trainer
    from metaad.apps.messages import message

    with pytest.raises(InstantiationException) as error:
        build_trainer(compose_cfg(["trainer.devices=0", "logger=none"]))
    text = message(error.value)
    assert text is not None and text.startswith("trainer: ") and "devices=0" in text


def test_the_missing_field_hint_names_each_setting_once(compose_cfg):
    with pytest.raises(ConfigError) as error:
        check_train_config(compose_cfg(["dataset=table"]))
    text = refused(
        error, "dataset.source.path=...", "dataset.source.task_column=...", "dataset.val_tasks=..."
    )
    assert "dataset.dataset." not in text and "source.source." not in text


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["model=nope"], MissingConfigException, "Could not find 'model/nope'"),
        (["dataset=nope"], MissingConfigException, "Could not find 'dataset/nope'"),
        (["dataset.bogus=1"], ConfigCompositionException, "Could not override 'dataset.bogus'"),
    ],
    ids=["unknown-model", "unknown-dataset", "unknown-key"],
)
def test_unknown_names_are_refused_by_hydra_naming_them(tmp_path, overrides, error, message):
    with pytest.raises(error, match=re.escape(message)):
        compose_in(tmp_path / "run", overrides)


def test_a_ddp_mistake_stops_before_launching_or_making_the_run_folder(compose_cfg):
    cfg = compose_cfg(["trainer=ddp", "trainer.devices=3", "dataset.meta_batch_size=8", "logger=none"])
    with pytest.raises(ConfigError, match=r"\(trainer.devices x trainer.num_nodes = 3\)"):
        train(cfg)
    assert not any(Path(cfg.paths.output_dir).iterdir())  # no .hydra, no lock, no checkpoints


def test_k_shot_larger_than_a_task_supplies_names_the_task_and_setting(compose_cfg):
    with pytest.raises(DataError) as error:
        build_datamodule(compose_cfg(["dataset.k_shot=120"]))
    refused(error, "val task '6'", "dataset.k_shot (120)", "lower k_shot or n_query")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(quick_run):
    """The shared quick run (f1_optimal on z-scores, fitted at K=5): its config and best checkpoint."""
    return quick_run[0], quick_run[2]


def doctored(key: str, value):
    def write(path: Path, ckpt: Path) -> None:
        checkpoint = torch.load(ckpt, weights_only=True)
        if value is None:
            del checkpoint[key]
        else:
            checkpoint[key] = value
        torch.save(checkpoint, path)

    return write


def truncated(path: Path, ckpt: Path) -> None:
    path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def pickled_checkpoint(path: Path, ckpt: Path) -> None:
    torch.save({"metaad_config": {}, "payload": pwned(path.parent)}, path)


def plain_pickle(path: Path, ckpt: Path) -> None:
    path.write_bytes(pickle.dumps({"metaad_config": {}}))


def other_zip(path: Path, ckpt: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.txt", "1 2 3")


@pytest.mark.parametrize(
    "make, error, named",
    [
        (
            lambda p, c: p.write_bytes(b""),
            CheckpointError,
            ["is not a checkpoint, or a truncated or corrupt"],
        ),
        (lambda p, c: p.write_text("hello"), CheckpointError, ["is not a checkpoint"]),
        (truncated, CheckpointError, ["truncated or corrupt"]),
        (
            pickled_checkpoint,
            CheckpointError,
            ["objects other than tensors and plain data", "never unpickles"],
        ),
        (plain_pickle, CheckpointError, ["is not a checkpoint"]),
        (other_zip, CheckpointError, ["cannot be loaded: not a checkpoint"]),
        (lambda p, c: torch.save(torch.zeros(3), p), CheckpointError, ["was not written by metaad-train"]),
        (lambda p, c: torch.save({"state_dict": {}}, p), CheckpointError, ["no 'metaad_config'"]),
        (doctored("metaad_config", {"seed": 0}), CheckpointError, ["its metaad_config has no"]),
        (doctored("state_dict", None), CheckpointError, ["it holds no weights"]),
        (doctored("state_dict", {"learner.w": torch.zeros(1)}), CheckpointError, ["weights do not fit"]),
        (doctored("metaad_sample_shape", None), CheckpointError, ["does not record the sample shape"]),
        (lambda p, c: p.mkdir(), CheckpointError, ["is a folder", "best.ckpt"]),
        (lambda p, c: None, FileNotFoundError, ["no checkpoint at"]),
    ],
    ids=[
        "empty",
        "text",
        "truncated",
        "pickled-object",
        "plain-pickle",
        "other-zip",
        "a-tensor",
        "lightning-not-metaad",
        "config-incomplete",
        "no-weights",
        "wrong-weights",
        "no-sample-shape",
        "a-folder",
        "missing",
    ],
)
def test_a_bad_checkpoint_is_refused_without_advising_an_unsafe_load(trained, tmp_path, make, error, named):
    path = tmp_path / "model.ckpt"
    make(path, trained[1])
    with pytest.raises(error) as raised:
        metaad.load(path)
    refused(raised, str(path), *named)
    assert not (tmp_path / "PWNED").exists()


# --- scoring inputs (metaad-score, metaad.load) --------------------------------------------------


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """Raw digits as a user has them (0-16): 5 normal '6's, and a query of 10 '6's and 10 '7's."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("files")
    bunch = load_digits()
    sixes, sevens = bunch.data[bunch.target == 6], bunch.data[bunch.target == 7]
    support = pd.DataFrame(sixes[:5], columns=PIXELS)
    query = pd.DataFrame(np.r_[sixes[5:15], sevens[:10]], columns=PIXELS)
    support.to_csv(folder / "support.csv", index=False)
    query.to_csv(folder / "query.csv", index=False)
    return folder, support, query


def run_score(trained, tmp_path, support, query, *overrides):
    cfg = compose_in(
        tmp_path / "score",
        [f"ckpt_path={trained[1]}", f"support={support}", f"query={query}", *overrides],
        config_name="score",
        quick=False,
    )
    return score(cfg)


def test_query_columns_in_another_order_are_matched_by_name(trained, digits_files, tmp_path):
    folder, _, query = digits_files
    query[PIXELS[::-1]].to_csv(tmp_path / "reversed.csv", index=False)
    straight = run_score(trained, tmp_path, folder / "support.csv", folder / "query.csv")
    reordered = run_score(trained, tmp_path, folder / "support.csv", tmp_path / "reversed.csv")
    np.testing.assert_allclose(reordered.score, straight.score, rtol=1e-6)
    assert reordered.is_anomaly.tolist() == straight.is_anomaly.tolist()


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda q: q.drop(columns=["p3"]), ["query=", "missing ['p3']"]),
        (lambda q: q.assign(extra=1.0), ["query=", "unexpected ['extra']"]),
        (
            lambda q: q.assign(p5=np.where(np.arange(20) == 3, np.nan, q.p5)),
            ["query=", "NaN or inf (rows [3])"],
        ),
        (lambda q: q.assign(note="ok"), ["query=", "column(s) ['note'] are not numeric"]),
        (lambda q: q.iloc[:0], ["query=", "holds no samples"]),
        (lambda q: q.rename(columns={"p0": ""}), ["query=", "unnamed (['Unnamed: 0']"]),
    ],
    ids=["missing-column", "extra-column", "nan", "text-column", "no-rows", "unnamed-column"],
)
def test_a_bad_query_file_is_refused_naming_it(trained, digits_files, tmp_path, change, named):
    folder, _, query = digits_files
    change(query).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError) as error:
        run_score(trained, tmp_path, folder / "support.csv", tmp_path / "bad.csv")
    refused(error, "bad.csv", *named)


def test_a_one_row_support_is_refused_against_a_threshold_fitted_at_k5(trained, digits_files, tmp_path):
    folder, support, _ = digits_files
    support[:1].to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataError) as error:
        run_score(trained, tmp_path, tmp_path / "one.csv", folder / "query.csv")
    refused(error, "support=", "one.csv", "fit got 1 normal sample(s)", "needs at least 3")


def test_a_k_other_than_the_thresholds_is_warned_and_still_scored(trained, digits_files, tmp_path):
    folder, support, _ = digits_files
    support[:4].to_csv(tmp_path / "four.csv", index=False)
    with pytest.warns(UserWarning, match="fitted on validation episodes with K=5 .* got K=4"):
        table_ = run_score(trained, tmp_path, tmp_path / "four.csv", folder / "query.csv")
    assert len(table_) == 20


def test_an_output_that_is_a_folder_is_refused_before_any_scoring(
    trained, digits_files, tmp_path, monkeypatch
):
    folder, _, _ = digits_files
    monkeypatch.setattr("metaad.api.load", lambda *a, **k: pytest.fail("loaded the checkpoint first"))
    with pytest.raises(DataError) as error:
        run_score(trained, tmp_path, folder / "support.csv", folder / "query.csv", f"output={tmp_path}")
    refused(error, f"output={tmp_path} is a folder")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError) as error:
        run_score(
            trained, tmp_path, folder / "support.csv", folder / "query.csv", f"output={tmp_path}/afile/o.csv"
        )
    refused(error, "afile is a file")
    with pytest.raises(DataError) as error:
        run_score(
            trained, tmp_path, folder / "support.csv", folder / "query.csv", f"output={tmp_path}/s.parquet"
        )
    refused(error, "s.parquet", "writes a CSV table")


@pytest.mark.parametrize("setting", ["support=5", "query=[a,b]", "ckpt_path=null"])
def test_a_path_setting_that_is_not_a_path_is_named(trained, digits_files, tmp_path, setting):
    folder, _, _ = digits_files
    with pytest.raises(ConfigError) as error:
        run_score(trained, tmp_path, folder / "support.csv", folder / "query.csv", setting)
    refused(error, f"{setting.split('=')[0]} must be the path of a file or folder")


def test_a_bad_threshold_setting_at_scoring_is_named(trained, digits_files, tmp_path):
    folder, _, _ = digits_files
    files = (folder / "support.csv", folder / "query.csv")
    with pytest.raises(ConfigError) as error:
        run_score(trained, tmp_path, *files, "threshold=fixed", "threshold.value=high")
    refused(error, "threshold.value must be a number, got 'high'")


def test_a_folder_of_images_for_a_vector_model_is_refused(trained, digits_files, tmp_path):
    glyph(tmp_path / "images" / "a.png", size=8)
    with pytest.raises(DataError) as error:
        run_score(trained, tmp_path, tmp_path / "images", digits_files[0] / "query.csv")
    refused(error, "support=", "is a folder of images", "shape (64,)")


@pytest.mark.slow
def test_image_folders_for_an_image_model_wrong_size_refused_rgb_read_as_gray(tmp_path):
    overrides = ["dataset=mnist_small", "backbone=mlp", "logger=none", "baselines=none", "test=false"]
    train(compose_in(tmp_path / "run", [*overrides, "threshold=support_quantile"]))
    rng = np.random.default_rng(0)
    for name, shape in (("gray", (28, 28)), ("rgb", (28, 28, 3)), ("small", (20, 20))):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    def run(support: str, query: str):
        files = [f"ckpt_path={ckpt}", f"support={tmp_path / support}", f"query={tmp_path / query}"]
        return score(compose_in(tmp_path / "score", files, config_name="score", quick=False))

    assert run("gray", "rgb").id.tolist() == [f"{i}.png" for i in range(5)]  # RGB read as grayscale
    with pytest.raises(DataError) as error:
        run("gray", "small")
    refused(error, "query=", "small", "expected images (N, 1, 28, 28)", "got shape (5, 20, 20)")


def test_images_of_mixed_sizes_are_refused_naming_both(tmp_path):
    glyph(tmp_path / "images" / "a.png", size=8)
    glyph(tmp_path / "images" / "b.png", size=10)
    with pytest.raises(DataError) as error:
        read_samples(tmp_path / "images", "support")
    refused(error, "b.png is 10x10 pixels but a.png is 8x8")


def object_npz(path: Path) -> None:
    np.savez(path, X=np.array([pwned(path.parent)], dtype=object))


@pytest.mark.parametrize(
    "name, make, named",
    [
        ("bin.csv", lambda p: p.write_bytes(bytes(range(256)) * 4), ["query=", "not a UTF-8 text table"]),
        (
            "long.csv",
            lambda p: p.write_text("a,b\n1,2,3\n4,5,6\n"),
            ["query=", "more fields than its header"],
        ),
        ("twice.csv", lambda p: p.write_text("a,b,a\n1,2,3\n"), ["query=", "['a'] more than once"]),
        ("text.npz", lambda p: p.write_text("1,2,3\n"), ["query=", "never unpickles"]),
        ("object.npz", object_npz, ["query=", "object (pickled) arrays"]),
        (
            "flat.npy",
            lambda p: np.save(p, np.zeros(5)),
            ["query=", "expected a numeric (samples, features...)"],
        ),
        ("many.npz", lambda p: np.savez(p, a=np.zeros((2, 2)), b=np.zeros((2, 2))), ["expected an array X"]),
        ("ids.npz", lambda p: np.savez(p, X=np.zeros((3, 2)), id=np.arange(2)), ["2 ids for 3 samples"]),
        ("data.xlsx", lambda p: p.write_bytes(b"PK"), ["query=", "expected a .csv, .npz or .npy"]),
        ("none.csv", lambda p: None, ["query=", "no such file or folder"]),
    ],
    ids=lambda v: v.split(".")[0] if isinstance(v, str) else "",
)
def test_a_sample_file_that_is_not_what_it_says_is_refused(tmp_path, name, make, named):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError) as error:
        read_samples(path, "query")
    refused(error, name, *named)
    assert not (tmp_path / "PWNED").exists()


def test_a_threshold_given_by_name_to_load_is_refused_saying_what_it_takes(trained):
    with pytest.raises(TypeError) as error:
        metaad.load(trained[1], threshold="f1_optimal")
    refused(error, "metaad.load: threshold must be a metaad.evaluation.thresholds.Threshold", "'f1_optimal'")


def test_an_empty_array_is_refused_by_the_api(trained):
    detector = metaad.load(trained[1]).fit(np.ones((5, 64)))
    with pytest.raises(DataError) as error:
        detector.decision_function(np.zeros((0, 64)))
    refused(error, "at least one sample")


# --- run folders ---------------------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_naming_it(compose_cfg):
    cfg = compose_cfg()
    run_dir = Path(cfg.paths.output_dir)
    with claim(cfg, run_dir, resume=False):  # this process holds it, as a live first run would
        with pytest.raises(RunFolderError) as error:
            with claim(cfg, run_dir, resume=False):
                pass
        refused(error, f"run folder {run_dir} is in use by another run (pid {os.getpid()})")
        assert (run_dir / LOCK).read_text() == str(os.getpid())


@pytest.mark.parametrize("content", ["999999999", "not a pid", ""], ids=["dead-pid", "garbage", "empty"])
def test_a_stale_lock_is_taken_over(compose_cfg, content):
    cfg = compose_cfg()
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / LOCK).write_text(content)
    with claim(cfg, run_dir, resume=False):
        assert (run_dir / LOCK).read_text() == str(os.getpid())
    assert not (run_dir / LOCK).exists() and (run_dir / ".hydra" / "config.yaml").is_file()


def test_a_run_folder_below_a_file_is_refused_naming_it(compose_cfg, tmp_path):
    cfg = compose_cfg()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError) as error:
        with claim(cfg, tmp_path / "file" / "run", resume=False):
            pass
    refused(error, f"{tmp_path / 'file'} is a file")


def test_a_refused_resume_leaves_the_run_files_byte_identical(trained):
    cfg, ckpt = trained
    run_dir = ckpt.parents[1]
    kept = ["overrides.yaml", "config.yaml", "hydra.yaml"]
    before = {name: (run_dir / ".hydra" / name).read_bytes() for name in kept}
    metrics = (run_dir / "metrics.json").read_bytes()
    overrides = ["threshold=f1_optimal", "threshold.normalise=zscore", "baselines=none", "logger=none"]
    changed_cfg = compose_in(run_dir, [*overrides, "ckpt_path=last", "model=siamese"])
    with pytest.raises(CheckpointError) as error:
        train(changed_cfg)
    refused(error, "was trained with another config", "model._target_", ".hydra/overrides.yaml")
    assert {name: (run_dir / ".hydra" / name).read_bytes() for name in kept} == before
    assert (run_dir / "metrics.json").read_bytes() == metrics and not (run_dir / LOCK).exists()


def test_another_runs_checkpoint_is_not_continued_in_a_folder_holding_a_run(trained, compose_cfg):
    last = trained[1].with_name("last.ckpt")
    cfg = compose_cfg([f"ckpt_path={last}"])
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError) as error:
        with claim(cfg, run_dir, resume=True):
            pass
    refused(error, f"run folder {run_dir} already holds a run", f"ckpt_path={last} is not one of its")


def test_a_checkpoint_continued_in_a_fresh_folder_gets_its_config_files(trained, tmp_path):
    overrides = ["threshold=f1_optimal", "threshold.normalise=zscore", "baselines=none", "logger=none"]
    last = trained[1].with_name("last.ckpt")
    cfg = compose_in(
        tmp_path / "fresh", [*overrides, f"ckpt_path={last}", "test=false", "trainer.max_epochs=2"]
    )
    assert train(cfg).global_step == 8  # the second epoch of the run, after its checkpoint's 4 steps
    assert (tmp_path / "fresh" / ".hydra" / "config.yaml").is_file()
    assert "ckpt_path=" in (tmp_path / "fresh" / ".hydra" / "overrides.yaml").read_text()


def test_a_run_continued_after_its_best_checkpoint_was_deleted_tests_the_last_weights(tmp_path, caplog):
    """No epoch of the continued run beats the old best, whose file is gone: say so, do not crash."""
    overrides = ["baselines=none", "logger=none"]
    train(compose_in(tmp_path / "old", overrides))
    (tmp_path / "old" / "checkpoints" / "best.ckpt").unlink()
    last = tmp_path / "old" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="metaad.apps.train"):
        metrics = train(compose_in(tmp_path / "fresh", [*overrides, f"ckpt_path={last}"])).to_json()
    assert "best checkpoint" in caplog.text and "is gone: testing the last weights" in caplog.text
    assert metrics["checkpoint"] == "" and metrics["test"]["auroc"]["n_episodes"] > 0


def test_a_read_only_checkpoint_folder_is_named_and_the_last_checkpoint_kept(tmp_path):
    import errno

    from metaad.checkpoint import save_generation

    path = tmp_path / "last.ckpt"
    save_generation(lambda f: torch.save({"step": 1}, f), path)

    def read_only(file: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(RunFolderError) as error:
        save_generation(read_only, path)
    refused(error, f"{tmp_path}: cannot write last.ckpt (Read-only file system)", f"({path}) is intact")
    assert torch.load(path)["step"] == 1


def test_resume_with_a_checkpoint_of_another_kind_is_refused(trained, tmp_path):
    (tmp_path / "other.ckpt").write_bytes(b"\x00" * 64)
    path = resolve_ckpt_path(str(tmp_path / "other.ckpt"), tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_resume_state(path, trained[0])
    refused(error, "other.ckpt", "is not a checkpoint")


def test_resume_last_in_a_folder_without_a_run_says_where_to_point(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        resolve_ckpt_path("last", tmp_path / "fresh")
    refused(error, "ckpt_path=last", "hydra.run.dir=<its folder>")


# --- the command line: one block, no traceback ---------------------------------------------------


def one_block(done: subprocess.CompletedProcess, app: str) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{app}: error:")]
    assert len(lines) == 1, done.stderr
    assert not any(advice in done.stderr for advice in UNSAFE), done.stderr
    return lines[0]


@pytest.mark.slow
def test_a_data_error_on_the_command_line_is_one_block_and_leaves_no_run_folder(tmp_path):
    path = duplicate_label(tmp_path / "machines.csv")
    args = [
        "debug=quick",
        "dataset=table",
        f"dataset.source.path={path}",
        "dataset.source.task_column=machine",
        "dataset.source.anomaly_column=faulty",
        "dataset.val_tasks=[m3]",
        "dataset.test_tasks=[m4]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    line = one_block(run_app("metaad-train", args, tmp_path), "metaad-train")
    assert "machines.csv" in line and "['faulty'] more than once" in line
    assert not (tmp_path / "run").exists()


def test_a_garbage_checkpoint_for_metaad_score_is_one_block(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (tmp_path / "s.csv").write_text("a,b\n1,2\n3,4\n")
    args = [
        f"ckpt_path={tmp_path / 'model.ckpt'}",
        f"support={tmp_path / 's.csv'}",
        f"query={tmp_path / 's.csv'}",
    ]
    line = one_block(
        run_app("metaad-score", [*args, f"hydra.run.dir={tmp_path / 'out'}"], tmp_path), "metaad-score"
    )
    assert "model.ckpt is not a checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_on_the_command_line_lists_the_choices_without_a_traceback(tmp_path):
    done = run_app("metaad-train", ["model=nope", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Could not find 'model/nope'" in done.stderr and "protonet" in done.stderr
    assert not (tmp_path / "run").exists()
