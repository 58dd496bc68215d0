"""Toy-web questions and answers (the ``vqa_train`` and ``vqa_test`` splits): questions about a drawn scene with
ten annotator answers each in the VQAv2 style, and the answer list they can hold.
"""

from __future__ import annotations

import random
from collections import Counter

from blip_core.data.toyweb_scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
)

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
