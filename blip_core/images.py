"""Decode untrusted images with a pixel limit checked before any pixel is decoded.

A PNG of 12000 x 12000 one-bit pixels is a few kilobytes on disk but tens of megabytes once decoded and
hundreds as RGB. :func:`open_rgb` opens the image lazily (PIL reads only the header), compares
``width * height`` with ``max_pixels`` and only then decodes. PIL's own guard
(``Image.MAX_IMAGE_PIXELS``, a ``DecompressionBombError`` above twice that) is reported the same way.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

from PIL import Image

from blip_core.data.images import to_rgb

MAX_PIXELS = 40_000_000  # 40 megapixels: 120 MB as RGB; the default limit for captioning and serving


class ImageTooLarge(ValueError):
    """An image whose pixel count is over the limit (refused before decoding)."""


def open_rgb(source: bytes | str | Path | IO[bytes], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image in ``source`` (bytes, a path or a binary file object) decoded as RGB.

    Raises :class:`ImageTooLarge` when it has more than ``max_pixels`` pixels (checked on the header, before
    decoding), and PIL's ``UnidentifiedImageError``/``OSError``/``ValueError`` when it is not a readable
    image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():  # the limit is enforced below; PIL's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)  # lazy: the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large to decode: {e}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, more than "
                                f"the limit of {max_pixels / 1e6:g} megapixels")
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"image too large to decode: {e}") from None
        return to_rgb(img)  # upright (EXIF orientation), 8-bit RGB, transparency on white
