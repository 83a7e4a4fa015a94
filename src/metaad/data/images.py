"""The one image decoder of metaad: an image file's pixels as a viewer shows them.

Pillow's ``Image.open(...).convert("L")`` is not that: a 16-bit PNG (mode ``I;16`` or ``I``)
is clipped at 255, so anything above 1/256 of full scale reads as white, and a JPEG whose EXIF
orientation tag says "rotated" is read as stored, sideways. Here, every decoded image

- is turned upright by its EXIF orientation (``ImageOps.exif_transpose``);
- has 16-bit samples scaled to 0-255 (``round(v * 255 / 65535)``), the range the models were
  trained on;
- has transparency composited onto white (a page's background), palette, CMYK, YCbCr, LA, 1-bit
  and the rest converted by Pillow to 8-bit grey (``L``) or ``RGB``.

Floating-point and 32-bit images carry no agreed range, so they are an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np

from metaad.data.errors import DataError


def open_image(source: str | Path | IO[bytes], channels: int, where: Any = None) -> Any:
    """A Pillow image of ``source`` in mode ``L`` (``channels`` 1) or ``RGB`` (3), upright, 8-bit."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = where if where is not None else source
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"{where}: images are read with 1 or 3 channels, not {channels}")
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image) or image  # loads the pixels
            image.load()
            return _eight_bit(image, mode, where)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{where}: cannot decode the image ({error})") from error


def read_image(source: str | Path | IO[bytes], channels: int, where: Any = None) -> np.ndarray:
    """Pixels 0-255 as uint8: ``(H, W)`` for 1 channel, ``(H, W, 3)`` for 3."""
    return np.asarray(open_image(source, channels, where))


def _eight_bit(image: Any, mode: str, where: Any) -> Any:
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{where}: a 32-bit integer image (values {values.min()}..{values.max()}); metaad reads "
                "8-bit and 16-bit images"
            )
        grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
        return grey if mode == "L" else grey.convert(mode)
    if image.mode == "F":
        raise DataError(
            f"{where}: a floating-point image has no agreed range; metaad reads 8- and 16-bit images"
        )
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(mode) if image.mode != mode else image
