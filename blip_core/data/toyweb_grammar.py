"""The toy-web caption grammar read back: :func:`parse_caption` finds the objects a caption names, and
:func:`caption_matches` checks them against a drawn :class:`~blip_core.data.toyweb_scenes.Scene`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from blip_core.data.toyweb_scenes import (
    COLORS,
    SHAPES,
    Scene,
)

_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3}
_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}


# --------------------------------------------------------------------------------------------------
# Caption grammar parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """An object named in a caption; ``size`` and ``color`` are None when the caption leaves them out."""

    count: int
    size: str | None
    color: str | None
    shape: str


@dataclass(frozen=True)
class CaptionParse:
    """What a caption says: mentions in reading order and ``(i, "left_of"|"right_of", j)`` relations."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...] = field(default=())


def parse_caption(text: str) -> CaptionParse:
    """Read a caption with the toy-web grammar (tolerant: unknown words are ignored).

    A mention is a shape word (``circle``/``circles``...) preceded by up to three modifiers: a count or
    article, a size (small/little/tiny, large/big) and a colour. Between two consecutive mentions,
    ``left``/``right`` give the relation of the first to the second; a leading ``from left to right`` (or
    ``from right to left``) orders all mentions.
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    mentions: list[Mention] = []
    positions: list[int] = []
    for i, tok in enumerate(tokens):
        if tok not in _SHAPE_WORDS:
            continue
        shape, plural = _SHAPE_WORDS[tok]
        color = size = None
        count = None
        j = i - 1
        while j >= 0 and i - j <= 3:
            t = tokens[j]
            if t in COLORS and color is None:
                color = t
            elif t in _SIZE_WORDS and size is None:
                size = _SIZE_WORDS[t]
            elif t in _COUNT_WORDS:
                count = _COUNT_WORDS[t]
                break
            else:
                break
            j -= 1
        if count is None:
            count = 2 if plural else 1
        mentions.append(Mention(count, size, color, shape))
        positions.append(i)
    relations: list[tuple[int, str, int]] = []
    if positions:
        head = " ".join(tokens[: positions[0]])
        if "from left to right" in head or "from right to left" in head:
            rel = "left_of" if "from left to right" in head else "right_of"
            relations = [(k, rel, k + 1) for k in range(len(mentions) - 1)]
        else:
            for k in range(len(positions) - 1):
                between = tokens[positions[k] + 1: positions[k + 1]]
                if "left" in between:
                    relations.append((k, "left_of", k + 1))
                elif "right" in between:
                    relations.append((k, "right_of", k + 1))
    return CaptionParse(tuple(mentions), tuple(relations))


def _matching(scene: Scene, m: Mention) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.shape == m.shape
            and (m.color is None or o.color == m.color) and (m.size is None or o.size == m.size)]


def caption_matches(scene: Scene, caption: str | CaptionParse, require_all: bool = True) -> bool:
    """Does ``caption`` describe ``scene`` correctly?

    Every mention must name objects of the scene with the right shape, colour, size (when given) and count,
    every left/right relation must hold, and with ``require_all`` every object must be mentioned. A caption
    naming no object never matches.
    """
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    if not parsed.mentions:
        return False
    covered: set[int] = set()
    chosen: list[list[int]] = []
    for m in parsed.mentions:
        idx = _matching(scene, m)
        if len(idx) != m.count:
            return False
        chosen.append(idx)
        covered.update(idx)
    for a, rel, b in parsed.relations:
        xa = [scene.objects[i].x for i in chosen[a]]
        xb = [scene.objects[i].x for i in chosen[b]]
        if rel == "left_of" and not max(xa) < min(xb):
            return False
        if rel == "right_of" and not min(xa) > max(xb):
            return False
    return not require_all or covered == set(range(len(scene.objects)))
