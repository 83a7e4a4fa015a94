"""Image folders (MVTec AD and plain layouts), ELPV, synthetic defects, masks through episodes and the
held-out-category protocol, from small image files written here (and the real folders, slow)."""

from __future__ import annotations

import dataclasses
import io
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaad.data import DataError, EpisodeDataset, LabelledData, collate_episodes, split_tasks
from metaad.data.image_folder import image_folder
from metaad.data.synthetic import add_synthetic, make_defect
from metaad.data.tasks import check_category_leaks, pool_rows

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data" / "images"


def noise_image(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def mask_image(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def mvtec_category(
    root: Path, name: str, n_train: int = 6, n_good: int = 3, defects: dict | None = None, masks: bool = True
) -> Path:
    """``root/name`` in the MVTec AD layout: noise images (RGB and grey, two sizes), box masks."""
    folder = root / name
    seed = sum(map(ord, name))
    for split, count in (("train/good", n_train), ("test/good", n_good)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            mode = "L" if i % 2 else "RGB"
            noise_image(seed + i + 100 * count, (40 + i, 30), mode).save(folder / split / f"{i:03d}.png")
    for defect, count in (defects if defects is not None else {"scratch": 3}).items():
        (folder / "test" / defect).mkdir(parents=True)
        if masks:
            (folder / "ground_truth" / defect).mkdir(parents=True)
        for i in range(count):
            size = (32, 32 + i)
            noise_image(seed + 1000 + i, size).save(folder / "test" / defect / f"{i:03d}.jpg", quality=95)
            if masks:
                mask_image(size, (4, 4, 12 + i, 20)).save(
                    folder / "ground_truth" / defect / f"{i:03d}_mask.png"
                )
    return folder


@pytest.fixture
def two_categories(tmp_path: Path) -> Path:
    mvtec_category(tmp_path / "data", "bottle", defects={"scratch": 3, "crack": 2})
    mvtec_category(tmp_path / "data", "cable")
    return tmp_path / "data"


def test_mvtec_layout_labels_partitions_and_masks(two_categories):
    data = image_folder(str(two_categories), size=16)
    assert data.task_names == ["bottle", "cable"]
    assert data.x.shape == (2 * 9 + 5 + 3, 3, 16, 16) and data.x.dtype == np.uint8
    bottle = data.task == "bottle"
    assert (data.anomalous & bottle).sum() == 5 and (~data.anomalous & bottle).sum() == 9
    assert (data.partition[data.anomalous] == "test").all()
    assert ((data.partition == "train") & bottle).sum() == 6
    assert data.masks.shape == (len(data.x), 16, 16)
    assert not data.masks[~data.anomalous].any() and data.masks[data.anomalous].any(axis=(1, 2)).all()
    assert data.support_partition == "train"
    pre = data.preprocessing
    assert pre.image_size == 16 and pre.sample_shape == (3, 16, 16) and pre.scale == pytest.approx(1 / 255)


def test_the_mask_is_resized_with_nearest_and_thresholded(tmp_path):
    folder = mvtec_category(tmp_path, "tile", defects={"hole": 1}, masks=False)
    (folder / "ground_truth" / "hole").mkdir(parents=True)
    soft = np.zeros((32, 32), np.uint8)
    soft[:, :16] = 127  # below the threshold: background
    soft[:, 16:] = 128  # defect
    Image.fromarray(soft, "L").save(folder / "ground_truth" / "hole" / "000_mask.png")
    data = image_folder(str(folder), size=8)
    mask = data.masks[data.anomalous][0]
    assert not mask[:, :4].any() and mask[:, 4:].all()


def test_every_image_kind_reads_as_the_viewer_shows_it(tmp_path):
    """16-bit grey, RGBA over white, CMYK, and an EXIF-rotated JPEG whose mask is of the upright size."""
    folder = mvtec_category(tmp_path, "mixed", n_train=1, n_good=0, defects={}, masks=False)
    good = folder / "train" / "good"
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(good / "sixteen.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red, half transparent over white: (255, 128, 128)
    rgba[..., 3] = 127
    Image.fromarray(rgba, "RGBA").save(good / "rgba.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(good / "cmyk.jpg", quality=100)
    stored = np.zeros((10, 30), np.uint8)  # stored 30 wide, 10 high; the left third is white
    stored[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    (folder / "test" / "dent").mkdir(parents=True)
    Image.fromarray(stored, "L").save(folder / "test" / "dent" / "turned.jpg", exif=exif, quality=100)
    (folder / "ground_truth" / "dent").mkdir(parents=True)
    mask_image((10, 30), (0, 0, 10, 10)).save(folder / "ground_truth" / "dent" / "turned_mask.png")
    data = image_folder(str(folder), size=10)
    x = {name: data.x[i] for i, name in enumerate(["first", "cmyk", "rgba", "sixteen", "turned"])}
    assert abs(int(x["sixteen"].mean()) - 128) <= 1
    assert np.allclose(x["rgba"][:, 5, 5], (255, 128, 128), atol=1)
    assert np.allclose(x["cmyk"][:, 5, 5], (255, 0, 0), atol=8)
    turned = x["turned"][0]  # upright: 10 wide, 30 high, the white stored left third now on top
    assert turned[:3].mean() > 200 and turned[-3:].mean() < 50
    assert data.masks[4][:3].all() and not data.masks[4][-4:].any()


def test_the_plain_layout_splits_its_normal_images_by_the_readme_rule(tmp_path):
    folder = tmp_path / "wood"
    (folder / "good").mkdir(parents=True)
    names = [f"n{i:02d}.png" for i in range(10)]
    for i, name in enumerate(names):
        noise_image(i).save(folder / "good" / name)
    for defect in ("knot", "split"):
        (folder / defect).mkdir()
        noise_image(50).save(folder / defect / "a.png")
    data = image_folder(str(folder), size=8, test_share=0.3, split_seed=4)
    order = list(range(10))
    random.Random(4).shuffle(order)
    assert sorted(np.flatnonzero(data.partition[:10] == "train").tolist()) == sorted(order[:7])
    assert data.anomalous.sum() == 2 and data.masks is None and data.task_names == ["wood"]


def test_a_list_of_roots_with_nested_datasets_and_a_clash(tmp_path, two_categories):
    mvtec_category(tmp_path / "more" / "set_a", "zipper")
    (tmp_path / "more" / "README.md").write_text("ignored: not an image")
    data = image_folder([str(two_categories), str(tmp_path / "more")], size=8)
    assert data.task_names == ["bottle", "cable", "zipper"]
    mvtec_category(tmp_path / "other", "cable")
    with pytest.raises(DataError, match="two categories named 'cable'"):
        image_folder([str(two_categories), str(tmp_path / "other")], size=8)


def write_garbage(path: Path) -> None:
    path.write_bytes(b"\x89PNG not really an image")


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: write_garbage(f / "train/good/001.png"), "train/good/001.png"),
        (
            lambda f: mask_image((9, 9), (0, 0, 3, 3)).save(f / "ground_truth/scratch/001_mask.png"),
            "001_mask.png",
        ),
        (lambda f: (f / "ground_truth/scratch/002_mask.png").unlink(), "test/scratch/002.jpg"),
        (lambda f: (f / "ground_truth/scratch/009_mask.png").write_bytes(b""), "009_mask.png"),
        (lambda f: (f / "test/scratch/notes.txt").write_text("x"), "notes.txt"),
        (lambda f: [p.unlink() for p in (f / "train/good").iterdir()], "train/good is empty"),
        (
            lambda f: (
                [p.rename(f / "test/good" / f"t{p.name}") for p in (f / "train/good").iterdir()]
                and (f / "train/good").rmdir()
            ),
            "no train/good",
        ),  # fmt: skip
        (lambda f: (f / "train/bad").mkdir(), "train/bad"),
        (lambda f: noise_image(3).save(f / "stray.png"), "stray.png"),
    ],
    ids=[
        "undecodable",
        "mask-size",
        "missing-mask",
        "orphan-mask",
        "not-an-image",
        "empty",
        "no-train-good",
        "train-defect",
        "stray-image",
    ],  # fmt: skip
)
def test_bad_folders_are_named(tmp_path, damage, named):
    folder = mvtec_category(tmp_path, "bottle")
    damage(folder)
    with pytest.raises(DataError, match=named.replace(".", r"\.")):
        image_folder(str(folder), size=8)


def test_a_test_image_copying_a_training_image_is_named_and_left_out(tmp_path, caplog):
    folder = mvtec_category(tmp_path, "bottle")
    copy = folder / "test" / "good" / "copy.png"
    Image.open(folder / "train" / "good" / "002.png").save(copy, compress_level=1)  # other bytes
    Image.open(folder / "train" / "good" / "002.png").rotate(90).save(folder / "test" / "good" / "turned.png")
    data = image_folder(str(folder), size=8)
    assert len(data.x) == 6 + 4 + 3 and "copy.png = 002.png" in caplog.text and "turned" not in caplog.text
    assert len(image_folder(str(folder), size=8, duplicates="keep").x) == 6 + 5 + 3


def test_an_empty_root_and_a_folder_of_nothing_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a category"):
        image_folder(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="is not a folder"):
        image_folder(str(tmp_path / "absent"))


def test_defects_without_any_masks_leave_the_data_without_masks_named(tmp_path, caplog):
    mvtec_category(tmp_path / "d", "bottle")
    mvtec_category(tmp_path / "d", "cable", masks=False)
    data = image_folder(str(tmp_path / "d"), size=8)
    assert data.masks is None and "cable/scratch" in caplog.text


# --- the protocol -------------------------------------------------------------------------------------


@pytest.fixture
def four_categories(tmp_path: Path) -> LabelledData:
    for name in ("a", "b", "c", "d"):
        mvtec_category(tmp_path / "data", name, n_train=6, n_good=4, defects={"scratch": 4})
    return image_folder(str(tmp_path / "data"), size=16)


def test_held_out_support_from_train_good_queries_from_test(four_categories):
    data = four_categories
    pools = split_tasks(data, None, ["c"], ["d"])
    test = pools["test"]
    assert (data.partition[test.support_rows["d"]] == "train").all() and len(test.support_rows["d"]) == 6
    assert (data.partition[test.normal_rows["d"]] == "test").all() and len(test.normal_rows["d"]) == 4
    assert (data.partition[test.anomaly_rows["d"]] == "test").all()
    train = pools["train"]  # meta-training uses every image of its categories, their defects too
    assert set(data.partition[pool_rows(train)]) == {"train", "test"} and train.n_anomalies("a") == 4
    episodes = EpisodeDataset(test, "test", k_shot=3, n_query=6, anomaly_ratio=0.5, n_episodes=4, seed=0)
    for i in range(4):
        episode = episodes[i]
        assert episode.query_masks.shape == (6, 16, 16)
        normal = episode.label == 0
        assert not episode.query_masks[normal].any() and episode.query_masks[~normal].any()
    with pytest.raises(DataError, match="4 normal queries"):
        EpisodeDataset(test, "test", k_shot=3, n_query=10, anomaly_ratio=0.5, n_episodes=1, seed=0)
    with pytest.raises(DataError, match="6 support normals"):
        EpisodeDataset(test, "test", k_shot=7, n_query=4, anomaly_ratio=0.5, n_episodes=1, seed=0)


def test_episodes_collate_masks_and_none(four_categories):
    from metaad.data.sources import digits

    pools = split_tasks(four_categories, None, ["c"], ["d"])
    train = EpisodeDataset(
        pools["train"], "train", k_shot=2, n_query=4, anomaly_ratio=0.5, n_episodes=3, seed=0
    )
    batch = collate_episodes([train[i] for i in range(3)])
    assert batch.query_masks.shape == (3, 4, 16, 16) and batch.query_masks.dtype == torch.bool
    assert batch.support.dtype == torch.float32 and 0 <= batch.support.min() and batch.support.max() <= 1
    plain = split_tasks(digits(), None, [6, 7], [8, 9])["train"]
    episodes = EpisodeDataset(plain, "train", k_shot=2, n_query=4, anomaly_ratio=0.5, n_episodes=2, seed=0)
    assert collate_episodes([episodes[0], episodes[1]]).query_masks is None


def test_synthetic_defects_are_seeded_and_their_masks_are_the_changed_pixels(four_categories):
    data = four_categories
    grown = add_synthetic(data, ["a", "b"], per_task=6, seed=3)
    again = add_synthetic(data, ["a", "b"], per_task=6, seed=3)
    other = add_synthetic(data, ["a", "b"], per_task=6, seed=4)
    n = len(data.x)
    assert (
        len(grown.x) == n + 12
        and np.array_equal(grown.x, again.x)
        and np.array_equal(grown.masks, again.masks)
    )
    assert not np.array_equal(grown.x[n:], other.x[n:])
    made = grown.made_from[n:]
    assert (made >= 0).all() and (grown.task[n:] == data.task[made]).all() and grown.anomalous[n:].all()
    assert (~data.anomalous[made]).all() and set(grown.task[n:]) == {"a", "b"}
    for row, base in zip(range(n, n + 12), made, strict=True):
        changed = (grown.x[row] != data.x[base]).any(axis=0)
        assert grown.masks[row].any() and np.array_equal(changed, grown.masks[row])


@pytest.mark.parametrize("kind", ["cutpaste", "noise"])
def test_each_kind_changes_only_its_region(kind):
    image = np.asarray(noise_image(1, (24, 24)), np.uint8).transpose(2, 0, 1).copy()
    out, mask = make_defect(image, kind, np.random.default_rng(0))
    assert mask.any() and np.array_equal(out[:, ~mask], image[:, ~mask]) and 0.005 < mask.mean() < 0.5


def test_the_leak_check_passes_the_protocol_and_catches_a_leaking_synthesis(four_categories):
    data = four_categories
    grown = add_synthetic(data, ["a", "b"], per_task=4, seed=0)
    both = dict(train_anomalies="real+synthetic")
    pools = split_tasks(grown, None, ["c"], ["d"], **both)  # checks itself
    assert pools["train"].n_anomalies("a") == 4 + 4
    assert not np.isin(pool_rows(pools["train"]), np.flatnonzero(grown.task == "d")).any()
    # a synthesis that pastes defects onto the held-out category's images and files them under "a"
    leaking = add_synthetic(data, ["d"], per_task=4, seed=0)
    task = leaking.task.copy()
    task[len(data.x) :] = "a"
    leaking = dataclasses.replace(leaking, task=task)
    with pytest.raises(DataError, match="held-out task 'd'"):
        split_tasks(leaking, None, ["c"], ["d"], **both)
    # a split that hands a held-out image to meta-training
    pools = split_tasks(grown, None, ["c"], ["d"], **both)
    train = pools["train"]
    stolen = np.concatenate([train.normal_rows["a"], np.flatnonzero(grown.task == "d")[:1]])
    pools["train"] = dataclasses.replace(train, normal_rows={**train.normal_rows, "a": stolen})
    with pytest.raises(DataError, match="leak"):
        check_category_leaks(grown, pools)


def test_the_datamodule_makes_synthetic_defects_of_training_categories_only(two_categories, tmp_path):
    from metaad.data import EpisodeDataModule

    mvtec_category(two_categories, "carpet")
    source = partial(image_folder, str(two_categories), size=16)
    args = dict(val_tasks=["cable"], test_tasks=["carpet"], k_shot=2, n_query=4, seed=0, synthetic_per_task=5)
    dm = EpisodeDataModule(source, train_anomalies="synthetic", synthetic_kinds=["cutpaste"], **args)
    dm.setup()
    train = dm.pools["train"]
    assert train.tasks == ["bottle"] and train.n_anomalies("bottle") == 5  # the real ones left out
    assert dm.pools["test"].n_anomalies("carpet") == 3
    real = EpisodeDataModule(source, train_anomalies="real", **args)
    real.setup()
    assert real.pools["train"].n_anomalies("bottle") == 5 and len(real.pools["train"].x) == len(source().x)
    with pytest.raises(DataError, match="synthetic_kinds"):
        EpisodeDataModule(source, synthetic_kinds=["cutpaste", "spike"], **args)


# --- real data --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/images is absent")
def test_real_mtd_and_piped_through_the_experiment(tmp_path, compose_cfg):
    from metaad.apps.build import build_datamodule

    overrides = [
        "experiment=mtd_piped",
        "backbone=mlp",
        f"paths.data_dir={SHARED.parent}",
        "dataset.source.size=32",
    ]
    cfg = compose_cfg([*overrides, "dataset.train_anomalies=real"])
    dm = build_datamodule(cfg)
    data_tasks = dm.task_names()
    assert len(data_tasks["train"]) == 10 and data_tasks["test"] == ["magnetic_tile"]
    test = dm.pools["test"]
    assert len(test.support_rows["magnetic_tile"]) == 762 and len(test.normal_rows["magnetic_tile"]) == 190
    assert test.n_anomalies("magnetic_tile") == 392 and test.masks.shape[1:] == (32, 32)
    # PIPED holds 6 test/good images with the pixels of a train/good one of their category: left out
    assert len(test.masks) == 2490 and test.masks.reshape(2490, -1).any(axis=1).sum() > 900
    episode = dm.datasets["test"][0]
    assert episode.query.shape == (14, 3, 32, 32) and episode.query_masks.shape == (14, 32, 32)
    normals = {t: len(dm.pools["val"].normal_rows[t]) for t in dm.pools["val"].tasks}
    assert normals == {"PA_BRG01_RL": 10, "PA_FLR01_TL": 10}


@pytest.mark.slow
def test_elpv_types_labels_and_the_uncertain_cells():
    pytest.importorskip("elpv_dataset")
    from metaad.data.image_folder import elpv

    data = elpv(size=16)
    assert data.task_names == ["mono", "poly"] and len(data.x) == 1508 + 715
    assert data.anomalous.sum() == 715 and data.masks is None
    normal_train = (data.partition == "train") & ~data.anomalous
    assert normal_train.sum() == pytest.approx(0.8 * 1508, abs=2)
    assert len(elpv(size=8, uncertain="anomalous").x) == 2624
    assert elpv(size=8, uncertain="anomalous").anomalous.sum() == 715 + 295 + 106
    with pytest.raises(DataError, match="uncertain"):
        elpv(uncertain="maybe")


def test_image_bytes_are_decoded_once_by_the_shared_decoder(tmp_path):
    """A JPEG in memory and on disk give the same pixels through the folder source."""
    folder = mvtec_category(tmp_path, "x", n_train=1, n_good=0, defects={}, masks=False)
    buffer = io.BytesIO()
    noise_image(9).save(buffer, "PNG")
    (folder / "train" / "good" / "000.png").write_bytes(buffer.getvalue())
    data = image_folder(str(folder), size=8)
    expected = data.preprocessing.resize_plane(
        Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").split()[0]
    )
    assert np.array_equal(data.x[0, 0], expected)


def test_a_task_dealt_between_training_and_validation_keeps_each_synthetic_row_with_its_image(
    four_categories,
):
    """ELPV's two types: one is dealt between meta-training and validation; a synthetic defect made from
    an image dealt to validation goes with it (and is used by nobody), never to meta-training."""
    grown = add_synthetic(four_categories, ["a", "b"], per_task=12, seed=0)
    pools = split_tasks(
        grown, ["a", "b"], ["a"], ["d"], require_disjoint=False, train_anomalies="real+synthetic"
    )  # checks the leak itself
    n = len(four_categories.x)
    train_rows = pool_rows(pools["train"])
    synthetic = train_rows[train_rows >= n]
    assert 0 < len(synthetic) < 24 and np.isin(grown.made_from[synthetic], train_rows).all()
    assert not np.isin(pool_rows(pools["val"]), np.arange(n, n + 24)).any()
