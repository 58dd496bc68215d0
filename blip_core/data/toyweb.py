"""Toy-web: an embedded, procedurally drawn image-text data set with known caption noise.

Every image is a small scene of 1-3 coloured shapes on a plain or lightly textured background. Scenes are
either 1-3 *distinct* objects (no two share colour and shape) placed left to right, or a *group* of 2-3
identical objects ("three small red circles"). Each image comes with captions written in a small grammar that
:func:`blip_core.data.toyweb_grammar.parse_caption` reads back, so evaluation can check whether any caption
(human, web or generated) names the right objects, colours, sizes, counts and left/right relations.

Splits, addressed as ``toyweb://?split=web&n=2000&noise=0.3&seed=0&size=64``:

- ``web``: one web-style caption ("alt text") per image, terse or wordy. With probability ``noise`` the
  caption is replaced by a noisy one of a known kind: ``unrelated`` (the caption of another scene),
  ``boilerplate`` ("IMG_2041.jpg", "click to enlarge") or ``wrong_attribute`` (one object's colour or shape
  changed). The kind is stored in the sample's ``json["noise"]`` (and, for ``wrong_attribute``, the changed
  attribute, ``color`` or ``shape``, in ``json["noise_detail"]``) for evaluation only.
- ``human``: clean, COCO-like: ``captions`` (default 5) human-style captions per image, varied in wording.
- ``test``: like ``human``, held out.
- ``vqa_train`` and ``vqa_test``: visual question answering (see :mod:`blip_core.data.toyweb_vqa`). A sample
  has no captions; its ``json["questions"]`` holds ``questions`` (default 4) questions about the drawn scene,
  each ``{"question_id", "question", "answers", "kind"}`` with ten annotator answers in the VQAv2 style:
  mostly the right answer, some in another form ("2"/"two", "gray"/"grey", "large"/"big") and now and then a
  wrong one, always at least five right ones. :func:`~blip_core.data.toyweb_vqa.vqa_answer_list` lists every
  answer they can hold.

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
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from blip_core.data.toyweb_grammar import caption_matches
from blip_core.data.toyweb_scenes import (
    COLORS,
    SHAPES,
    Scene,
    ToyObject,
    render_scene,
    sample_scene,
)
from blip_core.data.toyweb_vqa import MAX_QUESTIONS, vqa_questions
from blip_core.errors import UserError

NOISE_KINDS = ("unrelated", "boilerplate", "wrong_attribute")
SPLITS = ("web", "human", "test", "vqa_train", "vqa_test")
VQA_SPLITS = ("vqa_train", "vqa_test")
_DEFAULT_N = {"web": 2000, "human": 500, "test": 200, "vqa_train": 1000, "vqa_test": 200}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

_BOILERPLATE = (
    "IMG_{n4}.jpg", "DSC{n5}.JPG", "click to enlarge", "stock photo", "image", "untitled-{n1}.png",
    "photo {n3}", "thumbnail", "view full size", "no description available", "screenshot {n4}",
    "free download", "copyright {year} all rights reserved", "download high resolution",
)



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


def _draw_jpeg(scene: Scene, size: int, texture_seed: int, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    render_scene(scene, size, texture_seed=texture_seed).save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def _scene_rng(spec: ToyWebSpec, index: int) -> random.Random:
    """The random stream of sample ``index``'s scene, then its texture seed."""
    return random.Random(f"toyweb/scene/{spec.split}/{spec.seed}/{index}")


def sample_jpeg(spec: ToyWebSpec, index: int, jpeg_quality: int = 95) -> bytes:
    """The image of sample ``index`` alone: ``generate_sample(spec, index).jpg`` without its captions."""
    srng = _scene_rng(spec, index)
    scene = sample_scene(srng)
    return _draw_jpeg(scene, spec.size, srng.getrandbits(32), jpeg_quality)


def generate_sample(spec: ToyWebSpec, index: int, jpeg_quality: int = 95, render: bool = True) -> ToySample:
    """Sample ``index`` of the split described by ``spec`` (deterministic); ``render=False`` leaves ``jpg``
    empty (the captions and json alone, without the cost of drawing and encoding the image)."""
    srng = _scene_rng(spec, index)
    scene = sample_scene(srng)
    jpg = _draw_jpeg(scene, spec.size, srng.getrandbits(32), jpeg_quality) if render else b""
    key = f"{spec.split}-s{spec.seed}-{index:07d}"
    if spec.split in VQA_SPLITS:
        qrng = random.Random(f"toyweb/questions/{spec.split}/{spec.seed}/{index}")
        questions = [{"question_id": f"{key}-q{j}", **q} for j, q in
                     enumerate(vqa_questions(scene, qrng, spec.questions))]
        meta = {"image_id": key, "questions": questions, "source": "human", "noise": None, "split": spec.split,
                "seed": spec.seed, "scene": scene.to_json()}
        return ToySample(key, jpg, "", meta)
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
    return ToySample(key, jpg, captions[0], meta)


def generate(spec: ToyWebSpec | str, start: int = 0, stop: int | None = None) -> Iterator[ToySample]:
    """Yield samples ``start..stop`` (default: all ``n``) of a toy-web split."""
    if isinstance(spec, str):
        spec = parse_toyweb_uri(spec)
    for i in range(start, spec.n if stop is None else min(stop, spec.n)):
        yield generate_sample(spec, i)
