"""What a source does to raw samples, as plain data, so that it travels with a trained model.

A source reads raw values (pixel counts, table columns) and turns them into model inputs with
:meth:`Preprocessing.transform`, or with the same arithmetic where it reads a table itself, so the
same call on a user's raw data gives exactly the inputs the model was trained on, bit for bit.
:meth:`~Preprocessing.to_dict` / :meth:`~Preprocessing.from_dict` store it in a checkpoint as plain
data (lists, floats, str, None), loadable with ``torch.load(weights_only=True)``.

The arithmetic, in this order: resize images to ``image_size`` (Pillow, Lanczos, on 8-bit planes
as Omniglot's PNGs are), then in float64 ``x * scale``, then ``1 - x`` if ``invert``, then one
rounding to float32. Importing this module imports numpy only: Pillow is imported when an image is
resized, and pandas never (a frame is recognised only when pandas is already loaded).

A series source also records what turns a raw ``(steps, columns)`` series into the model's
windows: ``window`` and ``stride``, the source's columns and the ones it selected, and the scaling
rule (``scaling=support``: each metric standardised by the support's mean and spread only,
:func:`metaad.data.episodes.scale_by_support`); :meth:`Preprocessing.series_values` applies the
column selection to a user's series.

A model of patch features (a frozen extractor's output, :mod:`metaad.data.features`) records the
images' shape (``image_shape``, e.g. ``(3, 224, 224)``) and the extractor's ``identity()``
(``extractor``): :meth:`Preprocessing.transform` turns raw photos into those images as above, then
runs the extractor, which the caller attaches with :meth:`Preprocessing.with_extractor` after
checking it is the one the model was trained with.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from metaad.data.errors import DataError

_CHUNK = 8192  # rows converted at a time, so the float64 intermediate stays small


@dataclass(frozen=True)
class Preprocessing:
    """Raw samples -> model inputs ``(N, *sample_shape)`` float32.

    ``sample_shape``: the model input shape of one sample. ``feature_names``: a table's feature
    columns in training order (a frame is matched to them by name). ``scale``: raw values are
    multiplied by it (digits 1/16, MNIST 1/255). ``invert``: after scaling, ``x -> 1 - x``
    (Omniglot: ink = 1). ``image_size``: raw images are first resized to this square size.
    """

    sample_shape: tuple[int, ...]
    feature_names: tuple[str, ...] | None = None
    scale: float = 1.0
    invert: bool = False
    image_size: int | None = None
    window: int | None = None
    stride: int | None = None
    source_columns: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    scaling: str = "none"
    scale_clip: float = 100.0
    image_shape: tuple[int, ...] | None = None
    extractor: dict[str, Any] | None = None
    # the extractor module itself: attached at run time (with_extractor), never stored
    extractor_module: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.sample_shape)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"preprocessing: sample_shape must be integers, got {self.sample_shape!r}"
            ) from error
        if not shape or min(shape) < 1:
            raise DataError(f"preprocessing: sample_shape must be positive sizes, got {shape}")
        object.__setattr__(self, "sample_shape", shape)
        if self.feature_names is not None:
            names = tuple(str(n) for n in self.feature_names)
            if shape != (len(names),):
                raise DataError(
                    f"preprocessing: {len(names)} feature names for samples of shape {shape}; "
                    "feature names are for (features,) samples, one name a feature"
                )
            _refuse_duplicates(names, "preprocessing: feature_names")
            object.__setattr__(self, "feature_names", names)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise DataError(f"preprocessing: scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise DataError(f"preprocessing: scale must be finite and non-zero, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if not isinstance(self.invert, (bool, np.bool_)):
            raise DataError(f"preprocessing: invert must be true or false, got {self.invert!r}")
        object.__setattr__(self, "invert", bool(self.invert))
        if (self.image_shape is None) != (self.extractor is None):
            raise DataError(
                "preprocessing: a model of patch features needs image_shape and extractor together"
            )
        if self.image_shape is not None:
            if not isinstance(self.extractor, dict):
                raise DataError(
                    f"preprocessing: extractor must be its identity (a dict), got {self.extractor!r}"
                )
            image_shape = tuple(int(s) for s in self.image_shape)
            if len(image_shape) != 3 or min(image_shape) < 1:
                raise DataError(f"preprocessing: image_shape must be (channels, H, W), got {image_shape}")
            object.__setattr__(self, "image_shape", image_shape)
        pixels = self.image_shape or shape
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
                raise DataError(f"preprocessing: image_size must be an integer, got {self.image_size!r}")
            if len(pixels) != 3 or pixels[1:] != (self.image_size, self.image_size):
                raise DataError(
                    f"preprocessing: image_size {self.image_size} needs samples of shape "
                    f"(channels, {self.image_size}, {self.image_size}), got {pixels}"
                )
            object.__setattr__(self, "image_size", int(self.image_size))
        self._check_series(shape)

    def _check_series(self, shape: tuple[int, ...]) -> None:
        """Series fields: all or none of window, stride and the columns; a window of the columns."""
        given = [self.window is not None, self.stride is not None, self.columns is not None]
        if not any(given):
            if self.scaling != "none" or self.source_columns is not None:
                raise DataError("preprocessing: scaling and source_columns are for series (window) models")
            return
        if not all(given):
            raise DataError("preprocessing: a series model needs window, stride and columns together")
        for key in ("window", "stride"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"preprocessing: {key} must be a positive integer, got {value!r}")
            object.__setattr__(self, key, int(value))
        columns = tuple(str(c) for c in self.columns)
        source = tuple(str(c) for c in (self.source_columns if self.source_columns is not None else columns))
        _refuse_duplicates(columns, "preprocessing: columns")
        _refuse_duplicates(source, "preprocessing: source_columns")
        unknown = [c for c in columns if c not in source]
        if unknown:
            raise DataError(
                f"preprocessing: columns {unknown} are not among the source's {list(source)[:20]}"
            )
        if shape != (self.window, len(columns)):
            raise DataError(
                f"preprocessing: windows of {self.window} steps x {len(columns)} columns, but samples of "
                f"shape {shape}"
            )
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "source_columns", source)
        if self.scaling not in ("none", "support"):
            raise DataError(f"preprocessing: scaling must be 'none' or 'support', got {self.scaling!r}")
        clip = self.scale_clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise DataError(f"preprocessing: scale_clip must be a positive number, got {clip!r}")
        object.__setattr__(self, "scale_clip", float(clip))

    @property
    def is_series(self) -> bool:
        """A model of windows cut from a series (``fit(history)``, a score per step)."""
        return self.window is not None

    # --- plain data --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Lists, floats, bools, str and None only: safe in a ``weights_only`` checkpoint. The
        series keys are written for a series model only (a sample model's dict is as before)."""
        plain = {
            "sample_shape": list(self.sample_shape),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "scale": self.scale,
            "invert": self.invert,
            "image_size": self.image_size,
        }
        if self.extractor is not None:
            plain |= {"image_shape": list(self.image_shape), "extractor": self.extractor}
        if self.is_series:
            plain |= {
                "window": self.window,
                "stride": self.stride,
                "source_columns": list(self.source_columns),
                "columns": list(self.columns),
                "scaling": self.scaling,
                "scale_clip": self.scale_clip,
            }
        return plain

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; unknown keys are refused, named."""
        if not isinstance(d, dict):
            raise DataError(f"preprocessing: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"extractor_module"}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise DataError(f"preprocessing: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if "sample_shape" not in d:
            raise DataError("preprocessing: sample_shape is missing")
        return cls(**d)

    # --- a raw series -> the model's columns ------------------------------------------------------

    def series_values(self, x: Any, what: str) -> np.ndarray:
        """A user's raw series ``(steps, columns)`` -> ``(steps, len(columns))`` float32, the columns
        the source selected, as it stored them (float32, before any scaling).

        A frame is matched by column name: it must hold every selected column, and may hold the
        source's other columns (left out, as the source left them); a column the source never had is
        refused. An array is read by position and must have the source's width."""
        if not self.is_series:
            raise DataError(f"{what}: this model does not take a series")
        if _is_frame(x):
            names = [str(c) for c in x.columns]
            _refuse_duplicates(names, f"{what}: the frame's columns")
            missing = [c for c in self.columns if c not in names]
            foreign = [c for c in names if c not in self.source_columns]
            if missing or foreign:
                raise DataError(
                    f"{what}: the columns do not match the model's (matched by name): missing "
                    f"{missing[:10]}, unknown {foreign[:10]}; it was trained on the columns "
                    f"{list(self.columns)[:20]}"
                )
            frame = x.iloc[:, [names.index(c) for c in self.columns]]
            text = [
                str(c)
                for c, kind in zip(frame.columns, frame.dtypes)
                if getattr(kind, "kind", "O") not in "biuf"
            ]
            if text:
                raise DataError(f"{what}: the column(s) {text[:10]} are not numeric")
            values = frame.to_numpy(np.float64)
        else:
            raw = _as_array(x)
            if raw.dtype.kind not in "biuf":
                raise DataError(f"{what}: the series must be numeric, got dtype {raw.dtype}")
            if raw.ndim != 2 or raw.shape[1] != len(self.source_columns):
                raise DataError(
                    f"{what}: expected a (steps, {len(self.source_columns)}) series, the source's columns "
                    f"{list(self.source_columns)[:20]} in order, got shape {raw.shape}"
                )
            index = {c: i for i, c in enumerate(self.source_columns)}
            values = raw[:, [index[c] for c in self.columns]].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            raise DataError(
                f"{what}: {len(bad)} step(s) hold NaN, inf or an empty value (first rows, 0-based: "
                f"{bad[:5].tolist()})"
            )
        with np.errstate(over="ignore"):
            single = values.astype(np.float32)
        beyond = np.flatnonzero(~np.isfinite(single).all(axis=1))
        if len(beyond):
            raise DataError(
                f"{what}: step {beyond[0]} holds a value beyond float32's range (+-3.4e38); rescale the data"
            )
        return single

    # --- raw samples -> model inputs --------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one raw sample after resizing: the images for a model of patch features."""
        return self.image_shape or self.sample_shape

    def with_extractor(self, module: Any) -> Preprocessing:
        """This preprocessing with the frozen extractor that makes its patch features, which must be
        the one the model was trained with (its ``identity()`` equal to the stored one)."""
        if self.extractor is None:
            raise DataError("preprocessing: this model takes no patch features; it needs no extractor")
        from metaad.data.features import extractor_identity

        identity = extractor_identity(module)
        if identity != self.extractor:
            differ = sorted(
                k for k in set(identity) | set(self.extractor) if identity.get(k) != self.extractor.get(k)
            )
            raise DataError(
                f"the feature extractor differs from the one the model was trained with in {differ}: "
                f"{[identity.get(k) for k in differ]} against {[self.extractor.get(k) for k in differ]}"
            )
        return replace(self, extractor_module=module)

    def transform(self, x: Any) -> np.ndarray:
        """Raw samples as the user has them -> ``(N, *sample_shape)`` float32.

        ``x``: a numpy array (or anything ``np.asarray`` takes, a CPU tensor too) of samples as
        rows, or a pandas DataFrame (its columns are matched to ``feature_names`` by name). Images
        may come as ``(N, H, W)``, ``(N, C, H, W)`` or flattened rows; 8-bit or boolean pixels
        (a boolean pixel is white, 255, as Pillow reads a 1-bit PNG) are resized as 8-bit planes.
        A model of patch features: the images as above, then the attached extractor's features.
        """
        if self.extractor is not None:
            if self.extractor_module is None:
                name = self.extractor.get("name", self.extractor)
                raise DataError(
                    f"this model scores patch features of the extractor {name}; load it with "
                    "metaad.load(checkpoint), which rebuilds the extractor"
                )
            from metaad.data.features import extract

            images = replace(self, sample_shape=self.image_shape, image_shape=None, extractor=None).transform(
                x
            )
            return extract(self.extractor_module, images)
        raw = self._frame_values(x) if _is_frame(x) else _as_array(x)
        if raw.dtype.kind not in "biuf":
            raise DataError(f"samples must be numeric, got dtype {raw.dtype}")
        if raw.ndim < 2:
            raise DataError(
                f"expected samples as rows, shape (N, ...) with one sample of shape {self.sample_shape}, "
                f"got shape {raw.shape}; a single sample x is x[None]"
            )
        raw = self._layout(raw)
        if raw.dtype.kind == "f":
            _refuse_non_finite(raw)
        images = len(self.sample_shape) == 3
        if images and raw.dtype == bool:
            raw = raw.astype(np.uint8) * np.uint8(255)
        resize = self.image_size is not None and raw.shape[2:] != self.sample_shape[1:]
        out = np.empty((len(raw), *self.sample_shape), np.float32)
        for start in range(0, len(raw), _CHUNK):
            block = raw[start : start + _CHUNK]
            if resize:
                block = self._resize(block)
            values = block.reshape(len(block), *self.sample_shape).astype(np.float64)
            if self.scale != 1.0:
                values *= self.scale
            if self.invert:
                np.subtract(1.0, values, out=values)
            out[start : start + len(block)] = values
        return out

    def _frame_values(self, frame: Any) -> np.ndarray:
        columns = [str(c) for c in frame.columns]
        _refuse_duplicates(columns, "the frame's columns")
        if self.feature_names is not None:
            wanted, have = set(self.feature_names), set(columns)
            missing = [n for n in self.feature_names if n not in have]
            extra = [c for c in columns if c not in wanted]
            if missing or extra:
                raise DataError(
                    f"the frame's columns do not match the model's features: missing {missing}, "
                    f"extra {extra}; expected the columns {list(self.feature_names)}"
                )
            frame = frame.iloc[:, [columns.index(n) for n in self.feature_names]]
        text = [
            str(c) for c, kind in zip(frame.columns, frame.dtypes) if getattr(kind, "kind", "O") not in "biuf"
        ]
        if text:
            raise DataError(f"the frame's column(s) {text[:10]} are not numeric")
        return frame.to_numpy(np.float64)

    def _layout(self, raw: np.ndarray) -> np.ndarray:
        """Rows of any accepted raw layout -> ``(N, *sample_shape)``, or ``(N, C, H, W)`` to resize."""
        n, tail, shape = len(raw), raw.shape[1:], self.sample_shape
        if tail == shape:
            return raw
        if self.feature_names is not None:
            raise DataError(
                f"expected (N, {shape[0]}) table rows, the features {list(self.feature_names)[:10]}"
                f"{' ...' if shape[0] > 10 else ''}, got shape {raw.shape}"
            )
        if len(shape) == 3:
            channels = shape[0]
            if len(tail) == 2 and channels == 1:
                tail = (1, *tail)
            elif len(tail) == 1:
                side = math.isqrt(tail[0] // channels)
                if channels * side * side == tail[0]:
                    tail = (channels, side, side)
            if len(tail) == 3 and tail[0] == channels and (self.image_size is not None or tail == shape):
                return raw.reshape(n, *tail)
            resized = " (resized to that size)" if self.image_size is not None else ""
            sizes = "H, W" if self.image_size is not None else f"{shape[1]}, {shape[2]}"
            forms = f"(N, {channels}, {sizes})" + (f" or (N, {sizes})" if channels == 1 else "")
            raise DataError(
                f"expected images {forms} or flattened rows{resized} for samples of shape {shape}, "
                f"got shape {raw.shape}"
            )
        if len(shape) == 1 and math.prod(tail) == shape[0]:
            return raw.reshape(n, shape[0])  # e.g. 8x8 digit images for a 64-pixel vector model
        raise DataError(f"expected samples of shape (N, {', '.join(map(str, shape))}), got shape {raw.shape}")

    def _resize(self, block: np.ndarray) -> np.ndarray:
        """``(b, C, H, W)`` -> ``(b, C, S, S)``: Lanczos per plane, 8-bit when the pixels are 8-bit:
        whole numbers in 0..255 of any dtype (a photo read as float32 resizes as its source did)."""
        eight_bit = block.dtype == np.uint8 or (
            block.dtype.kind in "iuf"
            and block.size
            and 0 <= block.min()
            and block.max() <= 255
            and (block.dtype.kind != "f" or bool((block == np.round(block)).all()))
        )
        planes = block.astype(np.uint8 if eight_bit else np.float32)
        out = np.empty((*block.shape[:2], self.image_size, self.image_size), planes.dtype)
        for i, image in enumerate(planes):
            for c, plane in enumerate(image):
                out[i, c] = self.resize_plane(plane)
        return out

    def resize_plane(self, plane: Any) -> np.ndarray:
        """One image plane (a 2-D array, or a Pillow image of mode L or F) resized to ``image_size``.

        The one resize of metaad: sources call it on the images they decode, :meth:`transform`
        on raw arrays, so both give the same pixels.
        """
        from PIL import Image

        image = plane if isinstance(plane, Image.Image) else Image.fromarray(plane)
        size = (self.image_size, self.image_size)
        return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def _is_frame(x: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(x, pandas.DataFrame)


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as error:
        raise DataError(f"cannot read the samples as an array ({error})") from error


def _refuse_duplicates(names: list[str] | tuple[str, ...], what: str) -> None:
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise DataError(f"{what} name a column more than once: {twice}")


def _refuse_non_finite(raw: np.ndarray) -> None:
    flat = raw.reshape(len(raw), math.prod(raw.shape[1:]))
    bad = np.concatenate(
        [
            np.flatnonzero(~np.isfinite(flat[s : s + _CHUNK]).all(axis=1)) + s
            for s in range(0, len(flat), _CHUNK)
        ]
        or [np.array([], int)]
    )
    if len(bad):
        raise DataError(f"{len(bad)} sample(s) hold NaN or inf (rows {bad[:5].tolist()})")
