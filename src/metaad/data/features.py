"""Patch features of images, computed once by a frozen extractor and cached on disk.

The extractor is any module with ``forward(images (N, 3, S, S) float in [0, 1]) -> (N, C, h, w)``
and ``identity() -> dict`` (its name, weights' sha256, stages ...; see
``metaad.detectors.extractors``); the data layer only calls it, never imports it.

The cache is the data or nothing, like the store: one file per image under
``<folder>/<extractor key>/``, named by the sha256 of the image's decoded, resized 8-bit pixels
(and their shape), so an image is never run through the same extractor twice, whichever run,
dataset or split it comes in. The extractor key is the sha256 of its identity. A file holds a
header (magic, shape), the features as float16 and the sha256 of both; one that is short,
corrupt or of another shape is named in a warning and computed again, never read as features.
Files are written atomically (:mod:`metaad.files`). Features read back and features just
computed are the same numbers (both pass through float16); a new photo's features (a batch of
its own) may differ from its training features by one float16 step where the extractor's float32
arithmetic depends on the batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from metaad.data.errors import DataError

log = logging.getLogger(__name__)

MAGIC = b"METAADF1"
_HEADER = struct.Struct("<8sIII")
_DIGEST = 32
_EIGHT_BIT = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)


def extractor_identity(extractor: Any) -> dict[str, Any]:
    """The extractor's ``identity()`` as plain JSON data (what a checkpoint stores), checked."""
    identity = getattr(extractor, "identity", None)
    if not callable(identity):
        raise DataError(f"{type(extractor).__name__} is no frozen feature extractor: it has no identity()")
    value = identity()
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise DataError(f"{type(extractor).__name__}.identity() is not plain data ({error})") from error


def extractor_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def image_key(image: np.ndarray) -> str:
    """sha256 of an 8-bit image's shape and pixels."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def as_float(images: np.ndarray) -> np.ndarray:
    """8-bit pixels as the models see them: float32 ``value * (1/255)``; float images unchanged."""
    return _EIGHT_BIT[images] if images.dtype == np.uint8 else np.asarray(images, np.float32)


def extract(extractor: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Features ``(N, C, h, w)`` float32 of ``images`` (8-bit or float in [0, 1]), ``batch`` at a time,
    through float16 as the cache holds them (no cache here: scoring new photos)."""
    import torch

    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunks.append(_run(extractor, images[start : start + batch]))
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


def _run(extractor: Any, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = extractor(torch.from_numpy(np.ascontiguousarray(as_float(images))))
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or len(out) != len(images):
        raise DataError(
            f"the feature extractor must return (N, C, h, w) features, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    half = out.detach().float().cpu().numpy().astype(np.float16)
    if not np.isfinite(half).all():
        raise DataError("the feature extractor gave NaN, inf or values beyond float16's range (+-65504)")
    return half.astype(np.float32)


class FeatureCache:
    """Features of images by content, for one extractor, under ``folder`` (see the module)."""

    def __init__(self, folder: str | Path, extractor: Any, batch: int = 32) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise DataError(f"dataset.feature_batch must be a positive integer, got {batch!r}")
        self.extractor, self.batch = extractor, batch
        if hasattr(extractor, "eval"):
            extractor.eval()  # frozen: no batch statistics, no dropout
        self.identity = extractor_identity(extractor)
        self.folder = Path(folder).expanduser() / extractor_key(self.identity)[:24]
        self.computed = 0  # images run through the extractor by this cache
        self.rebuilt = 0  # cache files found corrupt and computed again

    def features(self, images: np.ndarray, name: str = "images") -> np.ndarray:
        """``(N, C, h, w)`` float32 features of 8-bit ``images`` ``(N, 3, S, S)``, cached."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{name}: features are cached for 8-bit images (N, C, H, W), got {images.dtype}")
        side = self.identity.get("size")
        if isinstance(side, int) and images.shape[2:] != (side, side):
            raise DataError(
                f"{name}: images of {images.shape[3]}x{images.shape[2]} pixels for an extractor of "
                f"{side}x{side} (backbone.size={side}); set dataset.source.size={side} or backbone.size"
            )
        self._describe()
        keys = [image_key(image) for image in images]
        out: np.ndarray | None = None
        missing: dict[str, list[int]] = {}
        for row, key in enumerate(keys):
            found = self._read(key)
            if found is None:
                missing.setdefault(key, []).append(row)
                continue
            out = self._place(out, len(images), row, found)
        todo = list(missing)
        reused = len(images) - sum(len(rows) for rows in missing.values())
        if todo:
            log.info(
                "%s: patch features of %d images (%d read from %s), %d at a time",
                name, len(todo), reused, self.folder, self.batch,
            )  # fmt: skip
        step = max(self.batch, (len(todo) // 10) // self.batch * self.batch)
        for start in range(0, len(todo), self.batch):
            chunk = todo[start : start + self.batch]
            rows = [missing[key][0] for key in chunk]
            computed = _run(self.extractor, images[rows])
            self.computed += len(chunk)
            for key, features in zip(chunk, computed, strict=True):
                self._write(key, features)
                for row in missing[key]:
                    out = self._place(out, len(images), row, features)
            done = start + len(chunk)
            if done % step < self.batch or done == len(todo):
                log.info("%s: features %d of %d images computed", name, done, len(todo))
        assert out is not None
        return out

    @staticmethod
    def _place(out: np.ndarray | None, n: int, row: int, features: np.ndarray) -> np.ndarray:
        if out is None:
            out = np.empty((n, *features.shape), np.float32)
        elif out.shape[1:] != features.shape:
            raise DataError(
                f"the feature extractor gave features of shapes {out.shape[1:]} and {features.shape}"
            )
        out[row] = features
        return out

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.feat"

    def _describe(self) -> None:
        from metaad.files import write_atomically

        about = self.folder / "extractor.json"
        if not about.exists():
            text = json.dumps(self.identity, indent=2, sort_keys=True)
            write_atomically(about, lambda path: path.write_text(text + "\n"))

    def _read(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise DataError(f"{path}: cannot read the feature cache file ({error})") from error
        problem = _check(blob)
        if problem:
            log.warning("%s: %s; computing its features again", path, problem)
            self.rebuilt += 1
            return None
        _, c, h, w = _HEADER.unpack_from(blob)
        body = blob[_HEADER.size : -_DIGEST]
        return np.frombuffer(body, np.float16).reshape(c, h, w).astype(np.float32)

    def _write(self, key: str, features: np.ndarray) -> None:
        from metaad.files import write_atomically

        path = self._path(key)
        head = _HEADER.pack(MAGIC, *features.shape)
        body = features.astype(np.float16).tobytes()
        blob = head + body + hashlib.sha256(head + body).digest()
        try:
            write_atomically(path, lambda p: p.write_bytes(blob))
        except OSError as error:
            raise DataError(f"{path}: cannot write the feature cache ({error})") from error


def _check(blob: bytes) -> str | None:
    """What is wrong with a cache file's bytes, or None."""
    if len(blob) < _HEADER.size + _DIGEST:
        return f"a truncated feature cache file ({len(blob)} bytes)"
    magic, c, h, w = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        return "not a metaad feature cache file"
    if len(blob) != _HEADER.size + 2 * c * h * w + _DIGEST:
        return f"a feature cache file of {len(blob)} bytes for features of shape ({c}, {h}, {w})"
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        return "a corrupt feature cache file (its checksum does not match)"
    return None


def with_features(data: Any, cache: FeatureCache) -> Any:
    """``data`` (a :class:`~metaad.data.tasks.LabelledData`, not imported: the preprocessing imports
    this module) with its 8-bit images replaced by their patch features; the preprocessing records
    the images' shape and the extractor's identity, so a new photo gets the same features."""
    features = cache.features(data.x, data.name)
    preprocessing = dataclasses.replace(
        data.preprocessing,
        sample_shape=features.shape[1:],
        image_shape=tuple(data.x.shape[1:]),
        extractor=cache.identity,
    )
    return dataclasses.replace(data, x=features, preprocessing=preprocessing, finite_checked=True)
