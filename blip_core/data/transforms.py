"""BLIP's image transforms, driven by an explicit ``random.Random`` so a data stream is reproducible.

Train (pre-training and fine-tuning)::

    RandomResizedCrop(S, scale=(min_scale, 1), bicubic) -> RandomHorizontalFlip -> RandAugment(N=2, M=5)
    -> ToTensor -> Normalize(CLIP mean/std)

A horizontal flip also swaps ``left`` and ``right`` in the caption, as the official code does: toy-web
captions say "a red circle to the left of a blue square", and a flipped image must not contradict them.

RandAugment uses BLIP's op set (Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX, ShearY,
TranslateX, TranslateY, Rotate): ``N`` ops drawn with replacement, each applied with probability 0.5, at
magnitude ``M`` out of 10 (shear 0.3·M/10, rotation 30°·M/10, translation 10 px·M/10 at 224 px scaled to the
image side, grey fill 128; geometric ops pick a random sign). As in BLIP, the Brightness and Sharpness
factor is 1.8·M/10 + 0.1, which is exactly 1.0 (a no-op) at M=5.

Eval: ``Resize((S, S), bicubic) -> ToTensor -> Normalize``.

Both first turn the image upright and into 8-bit RGB with :func:`~blip_core.data.images.to_rgb` (EXIF
orientation, transparency on white, 16-bit grayscale scaled, CMYK).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from blip_core.constants import CLIP_MEAN, CLIP_STD
from blip_core.data.images import to_rgb

_FILL = (128, 128, 128)
_MEAN = torch.tensor(CLIP_MEAN).mul(255.0).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).mul(255.0).view(3, 1, 1)
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor ``(3, H, W)`` normalised with the CLIP mean/std."""
    arr = np.array(img if img.mode == "RGB" else to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    t = torch.from_numpy(arr).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
    return t.sub_(_MEAN).div_(_STD)


def swap_left_right(caption: str) -> str:
    """Swap the words ``left`` and ``right`` (the caption of a horizontally flipped image)."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Pick a crop ``(left, top, right, bottom)`` covering ``scale`` of the area with aspect in ``ratio``.

    Ten tries at a random area and log-uniform aspect ratio; if none fits, a centre crop clamped to
    ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


# --------------------------------------------------------------------------------------------------
# RandAugment with BLIP's op set
# --------------------------------------------------------------------------------------------------


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                         fillcolor=_FILL)


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _op_identity(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return img


def _op_autocontrast(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(img)


def _op_equalize(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(img)


def _op_brightness(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    factor = m / 10 * 1.8 + 0.1
    return img if factor == 1.0 else ImageEnhance.Brightness(img).enhance(factor)


def _op_sharpness(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    factor = m / 10 * 1.8 + 0.1
    return img if factor == 1.0 else ImageEnhance.Sharpness(img).enhance(factor)


def _op_shear_x(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    s = _signed(0.3 * m / 10, rng)
    return _affine(img, (1.0, s, -s * img.height / 2, 0.0, 1.0, 0.0))  # shear about the centre row


def _op_shear_y(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    s = _signed(0.3 * m / 10, rng)
    return _affine(img, (1.0, 0.0, 0.0, s, 1.0, -s * img.width / 2))


def _op_translate_x(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    dx = _signed(10.0 * m / 10 * img.width / 224, rng)
    return _affine(img, (1.0, 0.0, dx, 0.0, 1.0, 0.0))


def _op_translate_y(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    dy = _signed(10.0 * m / 10 * img.height / 224, rng)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, dy))


def _op_rotate(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    angle = _signed(30.0 * m / 10, rng)
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


RANDAUG_OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "Identity": _op_identity,
    "AutoContrast": _op_autocontrast,
    "Brightness": _op_brightness,
    "Sharpness": _op_sharpness,
    "Equalize": _op_equalize,
    "ShearX": _op_shear_x,
    "ShearY": _op_shear_y,
    "TranslateX": _op_translate_x,
    "TranslateY": _op_translate_y,
    "Rotate": _op_rotate,
}


def rand_augment(img: Image.Image, rng: random.Random, n: int = 2, m: float = 5.0, p: float = 0.5) -> Image.Image:
    """Apply ``n`` ops drawn with replacement from :data:`RANDAUG_OPS`, each with probability ``p``."""
    names = list(RANDAUG_OPS)
    for _ in range(n):
        op = RANDAUG_OPS[rng.choice(names)]
        if rng.random() < p:
            img = op(img, m, rng)
    return img


# --------------------------------------------------------------------------------------------------
# Composed transforms
# --------------------------------------------------------------------------------------------------


class TrainTransform:
    """BLIP's train transform on an ``(image, caption)`` pair; the caption follows a horizontal flip."""

    def __init__(self, image_size: int, min_scale: float = 0.5, randaugment: bool = True,
                 flip: bool = True) -> None:
        self.image_size = image_size
        self.min_scale = min_scale
        self.randaugment = randaugment
        self.flip = flip

    def __call__(self, img: Image.Image, caption: str, rng: random.Random) -> tuple[torch.Tensor, str]:
        img = to_rgb(img)
        box = random_resized_crop_box(img.width, img.height, (self.min_scale, 1.0), rng)
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            img = ImageOps.mirror(img)
            caption = swap_left_right(caption)
        if self.randaugment:
            img = rand_augment(img, rng)
        return to_tensor_normalized(img), caption


class EvalTransform:
    """``Resize((S, S), bicubic) -> ToTensor -> Normalize``; the caption is returned unchanged."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, img: Image.Image, caption: str = "", rng: random.Random | None = None) -> tuple[torch.Tensor, str]:
        img = to_rgb(img)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return to_tensor_normalized(img), caption
