"""Toy-web: determinism, splits, noise rate, and captions that parse back to the drawn scene."""

from __future__ import annotations

import io
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from blip_core.data import toyweb, toyweb_scenes, toyweb_vqa
from blip_core.data.toyweb import generate, generate_sample, parse_toyweb_uri
from blip_core.data.toyweb_grammar import Mention, caption_matches, parse_caption
from blip_core.data.toyweb_scenes import COLORS, Scene
from blip_core.errors import UserError


def test_deterministic_per_seed():
    a = list(generate("toyweb://?split=web&n=40&seed=3"))
    b = list(generate("toyweb://?split=web&n=40&seed=3"))
    c = list(generate("toyweb://?split=web&n=40&seed=4"))
    assert [(s.key, s.jpg, s.txt, s.json) for s in a] == [(s.key, s.jpg, s.txt, s.json) for s in b]
    assert sum(x.jpg == y.jpg for x, y in zip(a, c)) == 0
    # sample i does not depend on n, and images do not depend on the noise rate
    spec = parse_toyweb_uri("toyweb://?split=web&n=1000&seed=3&noise=0.9")
    assert generate_sample(spec, 17).jpg == a[17].jpg
    # the image alone, and the captions alone, are those of the whole sample
    assert toyweb.sample_jpeg(spec, 17) == a[17].jpg
    bare = generate_sample(spec, 17, render=False)
    assert bare.jpg == b"" and bare.json == generate_sample(spec, 17).json
    vqa = parse_toyweb_uri("toyweb://?split=vqa_train&n=5&seed=0")
    assert toyweb.sample_jpeg(vqa, 4) == generate_sample(vqa, 4).jpg


def test_splits_are_disjoint_and_shaped_as_documented():
    web = list(generate("toyweb://?split=web&n=60"))
    human = list(generate("toyweb://?split=human&n=60"))
    test = list(generate("toyweb://?split=test&n=60"))
    images = [s.jpg for s in web + human + test]
    assert len(set(images)) == len(images)
    assert len({s.key for s in web + human + test}) == 180
    for s in web:
        assert s.json["source"] == "web" and len(s.json["captions"]) == 1 and s.txt == s.json["captions"][0]
    for s in human + test:
        assert s.json["source"] == "human" and s.json["noise"] is None
        assert len(s.json["captions"]) == 5 and len(set(s.json["captions"])) == 5
        assert s.txt == s.json["captions"][0]
    img = Image.open(io.BytesIO(web[0].jpg))
    assert img.size == (64, 64) and img.mode == "RGB"
    big = generate_sample(parse_toyweb_uri("toyweb://?size=96"), 0)
    assert Image.open(io.BytesIO(big.jpg)).size == (96, 96)


@pytest.mark.parametrize("noise", [0.0, 0.3, 0.6])
def test_noise_rate_matches_request(noise):
    samples = list(generate(f"toyweb://?split=web&n=1500&noise={noise}&seed=1"))
    kinds = Counter(s.json["noise"] for s in samples)
    rate = 1 - kinds[None] / len(samples)
    assert abs(rate - noise) < 0.03, (rate, kinds)
    if noise:
        for k in toyweb.NOISE_KINDS:  # equal mix by default
            assert abs(kinds[k] / (rate * len(samples)) - 1 / 3) < 0.06, kinds


def test_noise_mix_weights():
    samples = list(generate("toyweb://?n=400&noise=0.5&mix=boilerplate:1"))
    assert {s.json["noise"] for s in samples} == {None, "boilerplate"}


def test_clean_captions_describe_the_scene_and_noisy_ones_do_not():
    details = defaultdict(set)
    for s in generate("toyweb://?split=web&n=600&noise=0.5&seed=2"):
        scene = Scene.from_json(s.json["scene"])
        if s.json["noise"] is None:
            assert caption_matches(scene, s.txt), s.txt
        else:
            assert not caption_matches(scene, s.txt), (s.json["noise"], s.txt)
            if s.json["noise"] == "boilerplate":
                assert parse_caption(s.txt).mentions == ()
        details[s.json["noise"]].add(s.json.get("noise_detail"))
        if s.json.get("noise_detail"):  # the other attribute is untouched: every mention keeps it
            kept = "shape" if s.json["noise_detail"] == "color" else "color"
            assert {getattr(m, kept) for m in parse_caption(s.txt).mentions} <= \
                {getattr(o, kept) for o in scene.objects}, (s.json["noise_detail"], s.txt)
    assert details == {None: {None}, "unrelated": {None}, "boilerplate": {None},
                       "wrong_attribute": {"color", "shape"}}


def test_human_captions_parse_back_to_the_drawn_scene():
    """Every caption names exactly the drawn objects, and the pixels show those colours where they are."""
    for s in generate("toyweb://?split=test&n=150&seed=5"):
        scene = Scene.from_json(s.json["scene"])
        for cap in s.json["captions"]:
            parsed = parse_caption(cap)
            assert caption_matches(scene, parsed), cap
            named = Counter()
            for m in parsed.mentions:
                named[(m.color, m.shape)] += m.count
            assert named == Counter((o.color, o.shape) for o in scene.objects), cap
        pixels = np.asarray(Image.open(io.BytesIO(s.jpg)), dtype=np.float32)
        palette = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLORS.items()}
        for o in scene.objects:
            px = pixels[int(o.y * 64), int(o.x * 64)]
            nearest = min(palette, key=lambda n: float(np.abs(palette[n] - px).sum()))
            assert nearest == o.color, (o, px)


def test_parser_reads_the_grammar():
    p = parse_caption("A small red circle to the left of a big blue square.")
    assert p.mentions == (Mention(1, "small", "red", "circle"), Mention(1, "large", "blue", "square"))
    assert p.relations == ((0, "left_of", 1),)
    p = parse_caption("from left to right: a green star, an orange diamond and three purple triangles")
    assert [m.count for m in p.mentions] == [1, 1, 3]
    assert p.relations == ((0, "left_of", 1), (1, "left_of", 2))
    assert parse_caption("IMG_2041.jpg").mentions == ()
    assert parse_caption("yellow triangle blue circle").mentions[1] == Mention(1, None, "blue", "circle")


def test_wrong_relation_or_attribute_does_not_match():
    rng = random.Random(0)
    for _ in range(200):
        scene = toyweb_scenes.sample_scene(rng)
        if len(scene.objects) != 2 or scene.is_group:
            continue
        a, b = scene.objects
        good = f"a {a.color} {a.shape} to the left of a {b.color} {b.shape}"
        bad = f"a {a.color} {a.shape} to the right of a {b.color} {b.shape}"
        assert caption_matches(scene, good) and not caption_matches(scene, bad)
        assert not caption_matches(scene, f"a {a.color} {a.shape}")  # b is not mentioned
        assert caption_matches(scene, f"a {a.color} {a.shape}", require_all=False)
        wrong = toyweb.wrong_attribute_scene(scene, rng)
        assert not caption_matches(scene, toyweb.web_caption(wrong, rng))


def test_uri_validation():
    spec = parse_toyweb_uri("toyweb://?split=human&n=10&seed=2&size=32&captions=3")
    assert (spec.split, spec.n, spec.noise, spec.seed, spec.size, spec.captions) == ("human", 10, 0.0, 2, 32, 3)
    assert parse_toyweb_uri(spec.uri()) == spec
    assert parse_toyweb_uri("toyweb://").n == 2000
    for bad in ("toyweb://?split=train", "toyweb://?n=abc", "toyweb://?colour=red", "toyweb://?split=test&noise=0.2",
                "toyweb://?noise=1.5", "toyweb://?mix=typo:1"):
        with pytest.raises(UserError):
            parse_toyweb_uri(bad)


# --------------------------------------------------------------------------------------------------
# VQA splits
# --------------------------------------------------------------------------------------------------


def _expected_answer(scene: Scene, question: str) -> str:
    """The answer to a toy-web question, read from the scene independently of the generator."""
    import re

    objs = scene.objects
    words = question.rstrip("?").split()
    if question == "what color is the background?":
        return scene.background
    if question in ("how many shapes are there?", "how many objects are in the picture?"):
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"what color is the shape on the (left|right)\?", question):
        xs = sorted(objs, key=lambda o: o.x)
        return (xs[0] if m[1] == "left" else xs[-1]).color
    if m := re.fullmatch(r"is the (\w+) (\w+) to the left or to the right of the (\w+) (\w+)\?", question):
        a = next(o for o in objs if (o.color, o.shape) == (m[1], m[2]))
        b = next(o for o in objs if (o.color, o.shape) == (m[3], m[4]))
        return "left" if a.x < b.x else "right"
    if "small or large" in question:
        color, shape = words[2], words[3].removesuffix("s")
        (size,) = {o.size for o in objs if (o.color, o.shape) == (color, shape)}
        return size
    if question.startswith(("what color", "which color")):
        shape = words[-1].removesuffix("s")
        (color,) = {o.color for o in objs if o.shape == shape}
        return color
    if "shape" in question:
        color = words[-2]
        (shape,) = {o.shape for o in objs if o.color == color}
        return shape
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_splits_answers_follow_from_the_scene():
    from blip_core.eval.vqa import normalize_answer, vqa_accuracy

    train = list(generate("toyweb://?split=vqa_train&n=300&seed=2"))
    test = list(generate("toyweb://?split=vqa_test&n=100&seed=2"))
    assert not {s.jpg for s in train} & {s.jpg for s in test}  # train and test scenes differ
    assert not {s.jpg for s in test} & {s.jpg for s in generate("toyweb://?split=test&n=100&seed=2")}
    kinds: Counter[str] = Counter()
    yes_no: Counter[str] = Counter()
    answer_list = set(toyweb_vqa.vqa_answer_list())
    wrong_seen = variants_seen = 0
    for s in train + test:
        assert s.txt == "" and "captions" not in s.json
        qs = s.json["questions"]
        assert len(qs) == 4 and len({q["question"] for q in qs}) == 4
        assert len({q["question_id"] for q in qs}) == 4
        scene = Scene.from_json(s.json["scene"])
        for q in qs:
            right = _expected_answer(scene, q["question"])
            assert len(q["answers"]) == 10 and set(q["answers"]) <= answer_list
            assert Counter(q["answers"])[right] >= 5, q
            assert vqa_accuracy(right, q["answers"]) == 1.0
            wrong = [a for a in q["answers"] if normalize_answer(a) != normalize_answer(right)]
            wrong_seen += len(wrong)
            variants_seen += sum(a != right and normalize_answer(a) == normalize_answer(right) for a in q["answers"])
            kinds[q["kind"]] += 1
            if q["kind"] == "exists":
                yes_no[right] += 1
    assert set(kinds) == set(toyweb_vqa.VQA_KINDS)
    assert min(kinds.values()) > 40
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.2 * sum(yes_no.values())  # balanced
    assert wrong_seen > 0 and variants_seen > 0  # annotators disagree now and then


def test_vqa_split_deterministic_and_validated():
    a = list(generate("toyweb://?split=vqa_test&n=20&seed=1&questions=6"))
    b = list(generate("toyweb://?split=vqa_test&n=20&seed=1&questions=6"))
    assert [(s.jpg, s.json) for s in a] == [(s.jpg, s.json) for s in b]
    assert all(len(s.json["questions"]) >= 5 for s in a)  # a one-object scene still gives 5 kinds or more
    spec = parse_toyweb_uri("toyweb://?split=vqa_train&n=5&questions=2")
    assert parse_toyweb_uri(spec.uri()) == spec and spec.questions == 2
    for bad in ("toyweb://?split=vqa_train&questions=0", "toyweb://?split=vqa_train&noise=0.1",
                "toyweb://?split=vqa_test&questions=99"):
        with pytest.raises(UserError):
            parse_toyweb_uri(bad)
