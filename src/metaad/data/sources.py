"""Sources turn files or packaged data into :class:`LabelledData`; they know nothing of episodes.

Each is a plain function; configs pass it with ``_partial_: true`` so loading happens in
``EpisodeDataModule.setup`` rather than when the config is instantiated.
"""

from __future__ import annotations

import numpy as np

from metaad.data.tasks import LabelledData


def digits() -> LabelledData:
    """scikit-learn's bundled 8x8 digits (1,797 images, ten classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return LabelledData(x=x, task=bunch.target.astype(str), name="digits")
