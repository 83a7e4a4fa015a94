"""Which sample values metaad computes with: finite, and small enough for float32 arithmetic.

Detectors compute in float32, and most of them sum squares over a sample (a squared distance,
a norm, a variance). A finite value of 1e25 squares to 1e50, beyond float32's 3.4e38: the score
becomes inf or NaN, and a NaN compared with a threshold reads as "normal". So every way samples
come in (a source, the Python API) refuses a value whose square, summed over two samples'
difference of ``D`` features, could overflow: ``|x| > sqrt(float32 max / (4 D))`` (about 9e17 for
100 features), naming the row and column, rather than let it reach a detector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metaad.data.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 65536


def magnitude_limit(features: int) -> float:
    """The largest |value| whose squared differences over ``features`` values stay within float32."""
    return math.sqrt(FLOAT32_MAX / (4 * max(int(features), 1)))


def column_label(column: int, sample_shape: tuple[int, ...], names: Sequence[str] | None = None) -> str:
    """A flat column index as the user knows it: a feature name, or its position in the sample."""
    if names is not None and column < len(names):
        return repr(str(names[column]))
    if len(sample_shape) <= 1:
        return str(column)
    return str(tuple(int(i) for i in np.unravel_index(column, sample_shape)))


def refuse_extreme(
    x: np.ndarray,
    where: str,
    rows: np.ndarray | None = None,
    columns: Sequence[str] | None = None,
    after: str = "",
) -> None:
    """A :class:`DataError` naming the first row and column of ``x`` (N, ...) beyond the limit.

    ``rows``: the data row number of each row of ``x`` (a chunk of a table); ``columns``: names;
    ``after``: how ``x`` came from the user's values (" after the model's preprocessing ...").
    NaN and inf are the callers' own checks (each names them in its words).
    """
    if not len(x):
        return
    flat = x.reshape(len(x), -1)
    limit = magnitude_limit(flat.shape[1])
    for start in range(0, len(flat), _CHUNK):
        with np.errstate(invalid="ignore"):
            big = np.abs(flat[start : start + _CHUNK]) > limit
        if not big.any():
            continue
        with np.errstate(invalid="ignore"):
            count = sum(
                int((np.abs(flat[s : s + _CHUNK]) > limit).any(axis=1).sum())
                for s in range(0, len(flat), _CHUNK)
            )
        r, c = (int(i) for i in np.argwhere(big)[0])
        row = start + r
        number = int(rows[row]) if rows is not None else row
        raise DataError(
            f"{where}: row {number}, column {column_label(c, x.shape[1:], columns)} holds "
            f"{float(flat[row, c]):.3g}{after} ({count} row(s) hold such values); metaad computes in "
            f"float32, where squares of values beyond +-{limit:.2g} summed over {flat.shape[1]} features "
            "overflow to inf and NaN: rescale the data (e.g. standardise each column)"
        )
