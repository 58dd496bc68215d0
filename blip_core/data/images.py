"""One conversion of any decoded photograph to upright 8-bit RGB, shared by every decode path.

:func:`to_rgb` is called by ingest (so shards hold upright RGB pixels), the training and eval transforms,
the shard loader, the ``infer`` CLI and the MLflow model. It handles:

* EXIF orientation (tag 274, values 2-8): the pixels are turned upright with
  :func:`PIL.ImageOps.exif_transpose` and the tag is dropped, so a second call changes nothing;
* transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palette or ``L``/``RGB`` images with a
  ``tRNS`` transparency entry): composited on white, not on black;
* 16-bit grayscale (``I;16*``, and ``I`` read as 16-bit; e.g. a 16-bit PNG): scaled to 8 bit by ``round(v / 257)``
  (65535 -> 255) rather than clipped, so a 16-bit image is not turned white; ``F`` is clipped to 0..255;
* ``CMYK`` JPEGs, including Adobe's YCCK (the JPEG decoder returns CMYK for both): Pillow's
  ``CMYK -> RGB`` conversion (no colour profile is applied);
* everything else Pillow decodes (``L``, ``1``, ``P``, ``YCbCr``, ``LAB``, ``HSV``, progressive JPEG, WebP):
  ``convert("RGB")``.

16-bit RGB(A) PNGs are decoded by Pillow as 8-bit ``RGB``/``RGBA`` (the high byte), which is the scaled value.
"""

from __future__ import annotations

import struct

from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112  # EXIF Orientation
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of ``img`` (1 = upright; 1 when absent or unreadable)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return 1  # unreadable EXIF: the pixels are taken as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def swaps_sides(orientation: int) -> bool:
    """Whether turning an image of this EXIF orientation upright swaps its width and height."""
    return orientation in _TRANSPOSING


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, _WHITE)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright (EXIF orientation applied) as 8-bit RGB; transparent areas become white.

    Always a new image (``img`` is left as it is, and may be closed afterwards).
    """
    upright = ImageOps.exif_transpose(img) if exif_orientation(img) != 1 else None  # drops the tag
    if upright is not None:
        img = upright
    if img.mode == "RGB" and "transparency" not in img.info:
        return img if upright is not None else img.copy()
    if _has_alpha(img):
        return _on_white(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        eight_bit = img.convert("I").point(lambda v: v / 257.0 + 0.5)  # 0..65535 -> 0..255, rounded
        return eight_bit.convert("L").convert("RGB")
    if img.mode == "F":
        return img.point(lambda v: min(max(v, 0.0), 255.0)).convert("L").convert("RGB")
    return img.convert("RGB")
