"""Toy-web: an embedded, procedurally drawn image-text data set with known caption noise.

Every image is a small scene of 1-3 coloured shapes on a plain or lightly textured background. Scenes are
either 1-3 *distinct* objects (no two share colour and shape) placed left to right, or a *group* of 2-3
identical objects ("three small red circles"). Each image comes with captions written in a small grammar
that :func:`parse_caption` reads back, so evaluation can check whether any caption (human, web or
generated) names the right objects, colours, sizes, counts and left/right relations.

Splits, addressed as ``toyweb://?split=web&n=2000&noise=0.3&seed=0&size=64``:

- ``web``: one web-style caption ("alt text") per image, terse or wordy. With probability ``noise`` the
  caption is replaced by a noisy one of a known kind: ``unrelated`` (the caption of another scene),
  ``boilerplate`` ("IMG_2041.jpg", "click to enlarge") or ``wrong_attribute`` (one object's colour or shape
  changed). The kind is stored in the sample's ``json["noise"]`` (and, for ``wrong_attribute``, the changed
  attribute, ``color`` or ``shape``, in ``json["noise_detail"]``) for evaluation only.
- ``human``: clean, COCO-like: ``captions`` (default 5) human-style captions per image, varied in wording.
- ``test``: like ``human``, held out.
- ``vqa_train`` and ``vqa_test``: visual question answering (see :func:`vqa_questions`). A sample has no
  captions; its ``json["questions"]`` holds ``questions`` (default 4) questions about the drawn scene, each
  ``{"question_id", "question", "answers", "kind"}`` with ten annotator answers in the VQAv2 style: mostly
  the right answer, some in another form ("2"/"two", "gray"/"grey", "large"/"big") and now and then a wrong
  one, always at least five right ones. :func:`vqa_answer_list` lists every answer they can hold.

Query parameters: ``split`` (web), ``n`` (web 2000, human 500, test 200, vqa_train 1000, vqa_test 200),
``noise`` (0.3 for web; must be 0 for the others), ``seed`` (0), ``size`` (image side in pixels, 64),
``captions`` (captions per image for human/test, 5), ``questions`` (questions per image for the VQA splits,
4), ``mix`` (relative weights of the noise kinds, ``unrelated:1,boilerplate:1,wrong_attribute:1``).

Sample ``i`` of a split depends only on ``(split, seed, i)``: the scene stream of each split is seeded
separately (splits are disjoint in scene seeds), and the noise draw uses its own stream, so changing
``noise`` changes captions but never the images.
"""

from __future__ import annotations

import dataclasses
import io
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image, ImageDraw

from blip_core.errors import UserError

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
NOISE_KINDS = ("unrelated", "boilerplate", "wrong_attribute")
SPLITS = ("web", "human", "test", "vqa_train", "vqa_test")
VQA_SPLITS = ("vqa_train", "vqa_test")
_DEFAULT_N = {"web": 2000, "human": 500, "test": 200, "vqa_train": 1000, "vqa_test": 200}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3}
_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}

_BOILERPLATE = (
    "IMG_{n4}.jpg", "DSC{n5}.JPG", "click to enlarge", "stock photo", "image", "untitled-{n1}.png",
    "photo {n3}", "thumbnail", "view full size", "no description available", "screenshot {n4}",
    "free download", "copyright {year} all rights reserved", "download high resolution",
)


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


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _np(obj: ToyObject, rng: random.Random, count: int = 1, det: bool = True, p_size: float = 0.6) -> str:
    """A noun phrase: ``a small red circle``, ``red circle`` or ``three large blue squares``."""
    words = []
    if count > 1:
        words.append(_NUMBER_WORDS[count])
    elif det:
        words.append("a")
    if rng.random() < p_size:
        words.append(rng.choice(("small", "little")) if obj.size == "small" else rng.choice(("large", "big")))
    words.append(obj.color)
    words.append(obj.shape + ("s" if count > 1 else ""))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _human_templates(scene: Scene) -> list[str]:
    """Templates applicable to a scene; ``{A}``, ``{B}``, ``{C}`` are noun phrases, ``{bg}`` the background."""
    n = len(scene.objects)
    if scene.is_group:
        return ["{G}", "{G} on a {bg} background", "a row of {G}", "there are {G} in the picture",
                "an image with {G}", "{G} drawn side by side"]
    if n == 1:
        return ["{A}", "{A} on a {bg} background", "there is {A} in the picture", "an image with {A}",
                "{A} drawn on a {bg} background", "a drawing of {A}"]
    if n == 2:
        return ["{A} to the left of {B}", "{B} to the right of {A}", "{A} and {B}", "{A} next to {B}",
                "{A} and {B} on a {bg} background", "from left to right {A} and {B}"]
    return ["{A}, {B} and {C}", "{A} to the left of {B} and {C}", "from left to right {A}, {B} and {C}",
            "{C} to the right of {B} and {A}", "{A}, {B} and {C} on a {bg} background",
            "{B} to the right of {A} and to the left of {C}"]


def _fill(template: str, scene: Scene, rng: random.Random, det: bool = True) -> str:
    objs = scene.objects
    values = {"bg": scene.background}
    if scene.is_group:
        values["G"] = _np(objs[0], rng, count=len(objs))
    for name, obj in zip("ABC", objs):
        values[name] = _np(obj, rng, det=det)
    return template.format(**values)


def human_captions(scene: Scene, rng: random.Random, k: int) -> list[str]:
    """``k`` distinct clean human-style captions (fewer only if the grammar cannot produce ``k``)."""
    templates = _human_templates(scene)
    out: list[str] = []
    for t in rng.sample(templates, len(templates)) * 3:
        cap = _fill(t, scene, rng)
        if cap not in out:
            out.append(cap)
        if len(out) == k:
            break
    return out


def web_caption(scene: Scene, rng: random.Random) -> str:
    """A clean web-style caption: terse keywords or a wordy alt text around a human-style caption."""
    if rng.random() < 0.5:  # terse: "red circle blue square", "small red circle and big blue square"
        objs = scene.objects
        if scene.is_group:
            return _np(objs[0], rng, count=len(objs), p_size=0.5)
        sep = rng.choice((" ", " and ", ", "))
        return sep.join(_np(o, rng, det=False, p_size=0.4) for o in objs)
    body = _fill(rng.choice(_human_templates(scene)), scene, rng)
    wrapper = rng.choice(("{x}", "{x} - vector illustration", "stock image of {x}", "{x}, flat design icon",
                          "beautiful {x} | free download", "cute {x} clip art", "{x} wallpaper hd"))
    return wrapper.format(x=body)


def unrelated_caption(scene: Scene, rng: random.Random) -> str:
    """The web caption of another random scene, one that does not happen to describe ``scene``."""
    while True:
        caption = web_caption(sample_scene(rng), rng)
        if not caption_matches(scene, caption, require_all=False):
            return caption


def boilerplate_caption(rng: random.Random) -> str:
    """Content-free alt text such as ``IMG_2041.jpg`` or ``click to enlarge``."""
    return rng.choice(_BOILERPLATE).format(n1=rng.randint(1, 9), n3=rng.randint(100, 999),
                                           n4=rng.randint(1000, 9999), n5=rng.randint(10000, 99999),
                                           year=rng.randint(2005, 2023))


def wrong_attribute_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one object's colour or shape changed (a group changes as a whole)."""
    return wrong_attribute_change(scene, rng)[0]


def wrong_attribute_change(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """:func:`wrong_attribute_scene` and the attribute it changed: ``"color"`` or ``"shape"``."""
    idx = list(range(len(scene.objects))) if scene.is_group else [rng.randrange(len(scene.objects))]
    target = scene.objects[idx[0]]
    used = {(o.shape, o.color) for i, o in enumerate(scene.objects) if i not in idx}
    attr = rng.choice(("color", "shape"))
    if attr == "color":
        options = [c for c in COLORS if c != target.color and (target.shape, c) not in used]
        changes = {"color": rng.choice(options)}
    else:
        options = [s for s in SHAPES if s != target.shape and (s, target.color) not in used]
        changes = {"shape": rng.choice(options)}
    objs = tuple(dataclasses.replace(o, **changes) if i in idx else o for i, o in enumerate(scene.objects))
    return Scene(objs, scene.background, scene.texture), attr


# --------------------------------------------------------------------------------------------------
# Questions and answers (VQA splits)
# --------------------------------------------------------------------------------------------------

VQA_KINDS = ("color", "shape", "count", "exists", "position", "size", "background")
MAX_QUESTIONS = 8
_COUNT_ANSWERS = ("0", "1", "2", "3")
# other forms annotators use for an answer (all but the digit words stay different after normalisation)
_ANSWER_VARIANTS = {"0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",), "gray": ("grey",),
                    "purple": ("violet",), "large": ("big",), "small": ("little",), "left": ("left side",),
                    "right": ("right side",), "square": ("box",), "star": ("asterisk",)}
# the answers of each kind; a wrong annotator answer comes from the family of the right one
_KIND_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "count": _COUNT_ANSWERS, "exists": ("yes", "no"),
    "position": (*COLORS, "left", "right"), "size": SIZES, "background": tuple(BACKGROUNDS),
}
_ANSWER_FAMILIES = (tuple(COLORS), SHAPES, _COUNT_ANSWERS, ("yes", "no"), ("left", "right"), SIZES,
                    tuple(BACKGROUNDS))


def _plural(shape: str) -> str:
    return shape + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _candidate_questions(scene: Scene, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every question of each kind the scene answers unambiguously: ``kind -> [(question, answer), ...]``."""
    objs = scene.objects
    group = scene.is_group
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in VQA_KINDS}
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    for o in objs:
        if group:
            out["color"].append((f"what color are the {_plural(o.shape)}?", o.color))
            out["shape"].append((f"what shape are the {o.color} objects?", o.shape))
            out["size"].append((f"are the {o.color} {_plural(o.shape)} small or large?", o.size))
            break
        if shapes[o.shape] == 1:
            out["color"].append((rng.choice((f"what color is the {o.shape}?", f"which color is the {o.shape}?")),
                                 o.color))
        if colors[o.color] == 1:
            out["shape"].append((rng.choice((f"what shape is the {o.color} object?",
                                             f"what is the shape of the {o.color} object?")), o.shape))
        out["size"].append((f"is the {o.color} {o.shape} small or large?", o.size))
    out["count"].append((rng.choice(("how many shapes are there?", "how many objects are in the picture?")),
                         str(len(objs))))
    shape = rng.choice(SHAPES)
    out["count"].append((f"how many {_plural(shape)} are there?", str(shapes[shape])))
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        out["exists"].append((f"is there {_a(color)} {shape}?", "yes"))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        out["exists"].append((f"is there {_a(color)} {shape}?", "no"))
    if len(objs) > 1 and not group:
        out["position"].append(("what color is the shape on the left?", objs[0].color))
        out["position"].append(("what color is the shape on the right?", objs[-1].color))
        i, j = rng.sample(range(len(objs)), 2)
        a, b = objs[i], objs[j]
        out["position"].append((f"is the {a.color} {a.shape} to the left or to the right of the {b.color} "
                                f"{b.shape}?", "left" if i < j else "right"))
    out["background"].append(("what color is the background?", scene.background))
    return out


def annotator_answers(answer: str, kind: str, rng: random.Random, k: int = 10) -> list[str]:
    """``k`` annotator answers in the VQAv2 style: 0-2 wrong ones (answers of the same kind), up to 3 in
    another form (:data:`_ANSWER_VARIANTS`), the rest ``answer`` itself; at least half are ``answer``."""
    wrong = rng.choices((0, 1, 2), weights=(0.6, 0.3, 0.1))[0]
    variants = _ANSWER_VARIANTS.get(answer, ())
    n_var = rng.choice((0, 0, 1, 2, 3)) if variants else 0
    family = next((f for f in _ANSWER_FAMILIES if answer in f), _KIND_ANSWERS[kind])
    others = [a for a in family if a != answer]
    out = [rng.choice(others) for _ in range(wrong)] + [rng.choice(variants) for _ in range(n_var)]
    out += [answer] * (k - len(out))
    rng.shuffle(out)
    return out


def vqa_questions(scene: Scene, rng: random.Random, k: int = 4) -> list[dict]:
    """``k`` distinct questions about ``scene`` (fewer only if it cannot give ``k``), each
    ``{"question", "answers", "kind"}``, whose right answer follows from the scene.

    Kinds: ``color`` (of a named shape), ``shape`` (of a named colour), ``count`` (all shapes, or one shape,
    0 included), ``exists`` (yes/no, balanced: a drawn or an absent colour and shape with equal chance),
    ``position`` (the colour of the leftmost / rightmost shape, or whether one shape is left or right of
    another), ``size`` (small or large) and ``background`` (its colour). Kinds are drawn without repetition
    until each applicable kind has been asked once.
    """
    pools = _candidate_questions(scene, rng)
    for pool in pools.values():
        rng.shuffle(pool)
    out: list[dict] = []
    while len(out) < k and any(pools.values()):
        kinds = [kd for kd in VQA_KINDS if pools[kd]]
        for kind in rng.sample(kinds, len(kinds)):
            question, answer = pools[kind].pop()
            out.append({"question": question, "answers": annotator_answers(answer, kind, rng), "kind": kind})
            if len(out) == k:
                break
    return out


def vqa_answer_list() -> list[str]:
    """Every answer a toy-web VQA annotator can give: the candidate list of rank-mode answering."""
    seen: dict[str, None] = {}
    for kind in VQA_KINDS:
        for a in _KIND_ANSWERS[kind]:
            seen[a] = None
            for v in _ANSWER_VARIANTS.get(a, ()):
                seen[v] = None
    return list(seen)


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


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyWebSpec:
    """A parsed ``toyweb://`` URI."""

    split: str = "web"
    n: int = 2000
    noise: float = 0.3
    seed: int = 0
    size: int = 64
    captions: int = 5
    mix: tuple[float, float, float] = (1.0, 1.0, 1.0)  # weights of unrelated, boilerplate, wrong_attribute
    questions: int = 4  # questions per image (VQA splits)

    def uri(self) -> str:
        """Canonical URI of this spec."""
        mix = ",".join(f"{k}:{w:g}" for k, w in zip(NOISE_KINDS, self.mix))
        vqa = f"&questions={self.questions}" if self.split in VQA_SPLITS else ""
        return (f"toyweb://?split={self.split}&n={self.n}&noise={self.noise:g}&seed={self.seed}"
                f"&size={self.size}&captions={self.captions}&mix={mix}{vqa}")


def is_toyweb(uri: str) -> bool:
    """True for ``toyweb://`` URIs."""
    return uri.startswith("toyweb:")


def parse_toyweb_uri(uri: str) -> ToyWebSpec:
    """Parse and validate ``toyweb://?split=...&n=...&noise=...&seed=...``; raises :class:`UserError`."""
    parts = urlsplit(uri)
    if parts.scheme != "toyweb":
        raise UserError(f"{uri}: not a toyweb:// URI")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    known = {"split", "n", "noise", "seed", "size", "captions", "mix", "questions"}
    unknown = set(params) - known
    if unknown:
        raise UserError(f"{uri}: unknown parameter(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    split = params.get("split", "web")
    if split not in SPLITS:
        raise UserError(f"{uri}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        n = int(params.get("n", _DEFAULT_N[split]))
        noise = float(params.get("noise", 0.3 if split == "web" else 0.0))
        seed = int(params.get("seed", 0))
        size = int(params.get("size", 64))
        captions = int(params.get("captions", 5))
        questions = int(params.get("questions", 4))
    except ValueError as e:
        raise UserError(f"{uri}: bad number: {e}") from None
    mix = (1.0, 1.0, 1.0)
    if "mix" in params:
        weights = dict.fromkeys(NOISE_KINDS, 0.0)
        for item in params["mix"].split(","):
            name, _, w = item.partition(":")
            if name not in weights:
                raise UserError(f"{uri}: mix names one of {', '.join(NOISE_KINDS)}, got {name!r}")
            try:
                weights[name] = float(w)
            except ValueError:
                raise UserError(f"{uri}: mix weight for {name} is not a number: {w!r}") from None
        mix = tuple(weights[k] for k in NOISE_KINDS)
        if sum(mix) <= 0:
            raise UserError(f"{uri}: mix weights must not all be zero")
    if n < 0 or not 0.0 <= noise <= 1.0 or size < 16 or captions < 1 or not 1 <= questions <= MAX_QUESTIONS:
        raise UserError(f"{uri}: need n >= 0, 0 <= noise <= 1, size >= 16, captions >= 1 and "
                        f"1 <= questions <= {MAX_QUESTIONS}")
    if split != "web" and noise > 0:
        raise UserError(f"{uri}: noise applies to the web split only; the {split} split is clean")
    return ToyWebSpec(split, n, noise, seed, size, captions, mix, questions)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ToySample:
    """One generated sample in the WebDataset layout (``jpg`` bytes, ``txt`` caption, ``json`` metadata).

    A VQA sample has no caption: ``txt`` is empty and ``json["questions"]`` holds its questions."""

    key: str
    jpg: bytes
    txt: str
    json: dict


def generate_sample(spec: ToyWebSpec, index: int, jpeg_quality: int = 95, render: bool = True) -> ToySample:
    """Sample ``index`` of the split described by ``spec`` (deterministic); ``render=False`` leaves ``jpg``
    empty (the captions and json alone, without the cost of drawing and encoding the image)."""
    srng = random.Random(f"toyweb/scene/{spec.split}/{spec.seed}/{index}")
    scene = sample_scene(srng)
    buf = io.BytesIO()
    if render:
        img = render_scene(scene, spec.size, texture_seed=srng.getrandbits(32))
        img.save(buf, format="JPEG", quality=jpeg_quality)
    key = f"{spec.split}-s{spec.seed}-{index:07d}"
    if spec.split in VQA_SPLITS:
        qrng = random.Random(f"toyweb/questions/{spec.split}/{spec.seed}/{index}")
        questions = [{"question_id": f"{key}-q{j}", **q} for j, q in
                     enumerate(vqa_questions(scene, qrng, spec.questions))]
        meta = {"image_id": key, "questions": questions, "source": "human", "noise": None, "split": spec.split,
                "seed": spec.seed, "scene": scene.to_json()}
        return ToySample(key, buf.getvalue(), "", meta)
    crng = random.Random(f"toyweb/captions/{spec.split}/{spec.seed}/{index}")
    noise_kind = noise_detail = None
    if spec.split == "web":
        nrng = random.Random(f"toyweb/noise/{spec.seed}/{index}")
        if nrng.random() < spec.noise:
            noise_kind = nrng.choices(NOISE_KINDS, weights=spec.mix)[0]
        if noise_kind == "boilerplate":
            caption = boilerplate_caption(crng)
        elif noise_kind == "unrelated":
            caption = unrelated_caption(scene, crng)
        elif noise_kind == "wrong_attribute":
            wrong, noise_detail = wrong_attribute_change(scene, crng)
            caption = web_caption(wrong, crng)
        else:
            caption = web_caption(scene, crng)
        captions = [caption]
    else:
        captions = human_captions(scene, crng, spec.captions)
    meta = {"image_id": key, "captions": captions, "source": "web" if spec.split == "web" else "human",
            "noise": noise_kind, "split": spec.split, "seed": spec.seed, "scene": scene.to_json()}
    if noise_detail:
        meta["noise_detail"] = noise_detail
    return ToySample(key, buf.getvalue(), captions[0], meta)


def generate(spec: ToyWebSpec | str, start: int = 0, stop: int | None = None) -> Iterator[ToySample]:
    """Yield samples ``start..stop`` (default: all ``n``) of a toy-web split."""
    if isinstance(spec, str):
        spec = parse_toyweb_uri(spec)
    for i in range(start, spec.n if stop is None else min(stop, spec.n)):
        yield generate_sample(spec, i)
