"""VQAv2 accuracy, per-kind reports and the majority-answer baseline.

A predicted answer scores ``min(#annotators who gave it / 3, 1)``, averaged over the ten subsets that leave
one annotator out (with 10 answers: 0 matches 0.0, 1 match 0.3, 2 matches 0.6, 3 matches 0.9, 4 or more
1.0). Before matching, the prediction and every annotator answer are normalised with the rules of the VQA
evaluation (:func:`normalize_answer`): lower case; punctuation other than apostrophes and colons replaced by
a space (or deleted where it touches a space, and a comma between digits deleted); periods deleted unless
a digit follows; number words up to ten turned into digits; the articles ``a``, ``an``, ``the`` dropped;
common contractions written without their apostrophe restored (``dont`` -> ``don't``). Unlike the official
script, which normalises only when the annotators disagree, answers are always normalised, so ``"two"`` and
``"2"`` always match.

Accuracies of :func:`vqa_accuracy` are fractions in ``[0, 1]``; the reports give percentages, as VQA
results are quoted.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't", "he's",
    "i'd", "i'll", "i'm", "i've", "isn't", "let's", "mightn't", "mustn't", "shouldn't", "that's", "there's",
    "they'd", "they'll", "they're", "they've", "wasn't", "we're", "we've", "weren't", "what's", "where's",
    "who's", "won't", "wouldn't", "you'd", "you'll", "you're", "you've", "y'all", "ma'am", "o'clock")}


def normalize_answer(answer: str) -> str:
    """An answer in the form VQA accuracy compares (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    for p in _PUNCTUATION:
        if p not in text:
            continue
        touches_space = f"{p} " in text or f" {p}" in text
        text = text.replace(p, "" if touches_space else " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of ``prediction`` against the annotators' ``answers`` (a fraction in ``[0, 1]``).

    ``min(matches / 3, 1)`` averaged over the subsets that leave out one annotator each; with a single
    answer, the plain ``min(matches / 3, 1)``. A question without answers cannot be scored (``ValueError``).
    """
    if not answers:
        raise ValueError("a question without annotator answers cannot be scored")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return min(hits[0] / 3, 1.0)
    total = sum(hits)
    return sum(min((total - h) / 3, 1.0) for h in hits) / len(hits)


def _summary(scores: Sequence[float], kinds: Sequence[str] | None) -> dict:
    out: dict = {"accuracy": 100.0 * sum(scores) / len(scores) if scores else 0.0, "questions": len(scores)}
    if kinds is not None:
        by_kind: dict[str, list[float]] = defaultdict(list)
        for s, k in zip(scores, kinds, strict=True):
            by_kind[k].append(s)
        out["per_kind"] = {k: {"accuracy": 100.0 * sum(v) / len(v), "questions": len(v)}
                           for k, v in sorted(by_kind.items())}
    return out


def vqa_report(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               kinds: Sequence[str] | None = None) -> dict:
    """Overall and per-kind VQA accuracy in percent.

    Returns ``{"accuracy", "questions", "per_kind": {kind: {"accuracy", "questions"}}}`` (``per_kind`` only
    with ``kinds``). Questions without annotator answers (a test split without them) are left out and counted
    in ``"unanswered"``.
    """
    if len(predictions) != len(answers) or (kinds is not None and len(kinds) != len(answers)):
        raise ValueError("predictions, answers and kinds must have one entry per question")
    keep = [i for i, a in enumerate(answers) if a]
    scores = [vqa_accuracy(predictions[i], answers[i]) for i in keep]
    out = _summary(scores, None if kinds is None else [kinds[i] for i in keep])
    out["unanswered"] = len(answers) - len(keep)
    return out


def most_frequent_answer(answers: Sequence[Sequence[str]]) -> str:
    """The most frequent normalised answer over every annotator answer (ties: alphabetical)."""
    counts = Counter(normalize_answer(a) for ans in answers for a in ans)
    if not counts:
        raise ValueError("no answers")
    return min(counts, key=lambda a: (-counts[a], a))


def majority_answer_baseline(train_answers: Sequence[Sequence[str]], test_answers: Sequence[Sequence[str]],
                             test_kinds: Sequence[str] | None = None,
                             train_kinds: Sequence[str] | None = None) -> dict:
    """The accuracy of always answering the most frequent training answer, and a per-kind prior.

    Returns :func:`vqa_report`'s dict for the constant answer plus ``"answer"``; with ``train_kinds`` and
    ``test_kinds`` also ``"per_kind_prior"``: the report of answering each test question with the most
    frequent training answer of its kind (the overall one for a kind unseen in training), with the answer
    chosen per kind in ``"answers"``.
    """
    answer = most_frequent_answer(train_answers)
    out = vqa_report([answer] * len(test_answers), test_answers, test_kinds)
    out["answer"] = answer
    if train_kinds is not None and test_kinds is not None:
        by_kind: dict[str, list[Sequence[str]]] = defaultdict(list)
        for a, k in zip(train_answers, train_kinds, strict=True):
            by_kind[k].append(a)
        per_kind = {k: most_frequent_answer(v) for k, v in sorted(by_kind.items()) if any(v)}
        prior = vqa_report([per_kind.get(k, answer) for k in test_kinds], test_answers, test_kinds)
        prior["answers"] = per_kind
        out["per_kind_prior"] = prior
    return out
