"""Toy-web scenes: the vocabulary (shapes, colours, sizes, backgrounds, textures), :class:`Scene`, sampling
and drawing. The captions and the generator are in :mod:`blip_core.data.toyweb`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 35),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
}
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "gray": (125, 125, 125),
    "black": (22, 22, 22),
    "beige": (222, 206, 176),
}
TEXTURES = ("plain", "gradient", "noise")


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyObject:
    """One drawn shape. ``x``, ``y`` (centre) and ``radius`` are fractions of the image side."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A drawn scene: objects ordered left to right, a background colour and a texture."""

    objects: tuple[ToyObject, ...]
    background: str
    texture: str

    @property
    def is_group(self) -> bool:
        """True when every object is identical in shape, colour and size (and there are at least two)."""
        return len(self.objects) > 1 and len({(o.shape, o.color, o.size) for o in self.objects}) == 1

    def to_json(self) -> dict:
        """JSON form stored in the sample's ``json["scene"]``."""
        return {
            "background": self.background,
            "texture": self.texture,
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": round(o.x, 4),
                         "y": round(o.y, 4), "radius": round(o.radius, 4)} for o in self.objects],
        }

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        """Inverse of :meth:`to_json`."""
        objs = tuple(ToyObject(o["shape"], o["color"], o["size"], float(o["x"]), float(o["y"]),
                               float(o["radius"])) for o in d["objects"])
        return cls(objs, d["background"], d["texture"])


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: 1-3 objects in left-to-right slots; a quarter of multi-object scenes are groups."""
    n = rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]
    group = n > 1 and rng.random() < 0.25
    if group:
        attrs = [(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES))] * n
    else:
        pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
        attrs = [(s, c, rng.choice(SIZES)) for s, c in pairs]
    slot = 1.0 / n
    objects = []
    for i, (shape, color, size) in enumerate(attrs):
        radius = rng.uniform(0.13, 0.155) if size == "large" else rng.uniform(0.07, 0.09)
        radius = min(radius, slot / 2 - 0.01)  # never wider than the slot, so left/right stays unambiguous
        lo, hi = i * slot + radius + 0.005, (i + 1) * slot - radius - 0.005
        x = rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2
        y = rng.uniform(radius + 0.05, 1 - radius - 0.05)
        objects.append(ToyObject(shape, color, size, x, y, radius))
    return Scene(tuple(objects), rng.choice(tuple(BACKGROUNDS)), rng.choice(TEXTURES))


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 2


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * np.cos(np.radians(a)), cy + r * np.sin(np.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.radians(-90 + 36 * k)
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    raise ValueError(f"not a polygon shape: {shape}")


def render_scene(scene: Scene, size: int, texture_seed: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels (2x supersampled, then reduced)."""
    side = size * _SUPERSAMPLE
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.texture == "gradient":
        ramp = np.linspace(-18.0, 18.0, side, dtype=np.float32)  # (side,) brightness ramp
        canvas = base[None, None, :] + ramp[:, None, None]  # (side, 1, 3)
        canvas = np.broadcast_to(canvas, (side, side, 3))
    elif scene.texture == "noise":
        nrng = np.random.default_rng(texture_seed)
        canvas = base[None, None, :] + nrng.normal(0.0, 9.0, (side, side, 1)).astype(np.float32)
    else:
        canvas = np.broadcast_to(base, (side, side, 3))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * side, o.y * side, o.radius * side
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img.reduce(_SUPERSAMPLE)
