"""Caption metrics without a model: BLEU-4 and CIDEr-D, grammar match on toy-web scenes, distinct-n.

BLEU-4 and CIDEr-D come from pycocoevalcap (the captioning-metrics package of the ``workflow`` extra), imported
only when :func:`caption_scores` runs, so ``import blip_core`` does not need it.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from blip_core.data.toyweb_grammar import caption_matches
from blip_core.data.toyweb_scenes import Scene

_PUNCT = re.compile(r"[^\w\s]")


def caption_tokens(text: str) -> str:
    """Lowercase, replace punctuation by spaces and collapse whitespace (stands in for the Java PTB tokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap), both x100, of one candidate per image against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references) or not candidates:
        raise ValueError("caption_scores needs one candidate and a list of references per image")
    res = {i: [caption_tokens(c)] for i, c in enumerate(candidates)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


def grammar_match(captions: Sequence[str], samples: Sequence[dict]) -> float | None:
    """Percentage of captions that describe their toy-web scene exactly; None when no sample has a scene."""
    hits = total = 0
    for caption, sample in zip(captions, samples, strict=True):
        scene = sample.get("scene")
        if not isinstance(scene, dict):
            continue
        total += 1
        hits += caption_matches(Scene.from_json(scene), caption)
    return 100.0 * hits / total if total else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct-n: unique n-grams over all n-grams of the (tokenised) texts; None when there are none."""
    grams: Counter[tuple[str, ...]] = Counter()
    for t in texts:
        words = caption_tokens(t).split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None
