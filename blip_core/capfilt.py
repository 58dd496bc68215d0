"""CapFilt as pure batch functions: the captioner writes synthetic captions, the filter scores every caption.

* :func:`caption_batch`: ``k`` synthetic captions per image from the captioner (nucleus sampling with top-p
  0.9 by default, or beam search for the ablation).
* :func:`filter_batch`: the ITM match probability of each image's candidate captions (web and synthetic),
  with each image's cross-attention keys/values computed once and shared by all its candidates;
  :func:`filter_scores` adds each pair's ITC cosine (the CLIP-style score of the usual filtering baseline).
* :func:`decide`: keep a caption when its match probability reaches the threshold (0.5: the ITM argmax).
* :func:`choose_threshold`: the threshold that drops the most wrong captions of a labelled calibration
  sample while the dropped ones stay at least ``target_precision`` wrong.
* :func:`threshold_for_share`: the threshold at which a score keeps a given number of captions (to compare
  two filters that keep the same share).

No I/O here: :mod:`components.capfilt` reads shards, calls these, and writes outputs and provenance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blip_core.config import CapFiltConfig
from blip_core.generation import generate_captions
from blip_core.models.blip import BlipModel


@torch.no_grad()
def caption_batch(model: BlipModel, tokenizer, images: torch.Tensor, cfg: CapFiltConfig,
                  generator: torch.Generator | None = None) -> list[list[str]]:
    """``cfg.num_captions`` synthetic captions for each image of ``images`` ``(B, 3, H, W)``."""
    if cfg.decoding == "nucleus":
        flat = generate_captions(model, tokenizer, images, decoding="nucleus", top_p=cfg.top_p,
                                 max_length=cfg.max_length, min_length=cfg.min_length,
                                 repetition_penalty=cfg.repetition_penalty, prompt=cfg.prompt,
                                 generator=generator, num_return=cfg.num_captions)
    else:
        flat = generate_captions(model, tokenizer, images, decoding="beam", num_beams=cfg.num_beams,
                                 max_length=cfg.max_length, min_length=cfg.min_length, prompt=cfg.prompt,
                                 num_return=cfg.num_captions)
    k = cfg.num_captions
    return [flat[i * k:(i + 1) * k] for i in range(images.shape[0])]


@torch.no_grad()
def filter_batch(model: BlipModel, tokenizer, images: torch.Tensor, texts: Sequence[Sequence[str]],
                 max_length: int = 35) -> list[list[float]]:
    """ITM match probability of every text in ``texts[i]`` against image ``i``; same nesting as ``texts``."""
    return _filter(model, tokenizer, images, texts, max_length, with_itc=False)[0]


@torch.no_grad()
def filter_scores(model: BlipModel, tokenizer, images: torch.Tensor, texts: Sequence[Sequence[str]],
                  max_length: int = 35) -> tuple[list[list[float]], list[list[float]]]:
    """``(itm, itc)``: :func:`filter_batch`'s ITM match probabilities and the ITC cosine of the same pairs
    (unimodal [CLS] text feature against the image's [CLS] feature), both nested as ``texts``."""
    itm, itc = _filter(model, tokenizer, images, texts, max_length, with_itc=True)
    assert itc is not None
    return itm, itc


def _filter(model: BlipModel, tokenizer, images: torch.Tensor, texts: Sequence[Sequence[str]], max_length: int,
            with_itc: bool) -> tuple[list[list[float]], list[list[float]] | None]:
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} lists of texts")
    flat = [t for group in texts for t in group]
    if not flat:
        return [[] for _ in texts], ([[] for _ in texts] if with_itc else None)
    rows = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=images.device)
    ids, mask = tokenizer(flat, max_length=max_length)
    ids, mask = ids.to(images.device, non_blocking=True), mask.to(images.device, non_blocking=True)
    enc_ids = ids.clone()
    enc_ids[:, 0] = tokenizer.enc_id
    image_embeds = model.encode_image(images)
    cross = model.cross_kv(image_embeds).select(rows)  # each text reads its image's K/V
    probs = model.itm_logits(enc_ids, mask, cross).float().softmax(dim=-1)[:, 1].tolist()  # fp32 under autocast
    cosines = None
    if with_itc:
        text_feat = model.text_features(model.encode_text(ids, mask)).float()  # [CLS] first, as in ITC
        image_feat = model.image_features(image_embeds).float()
        cosines = (text_feat * image_feat[rows]).sum(dim=-1).tolist()
    return _nest(probs, texts), (_nest(cosines, texts) if cosines is not None else None)


def _nest(values: list[float], texts: Sequence[Sequence[str]]) -> list[list[float]]:
    out, pos = [], 0
    for group in texts:
        out.append(values[pos:pos + len(group)])
        pos += len(group)
    return out


def decide(score: float, threshold: float) -> bool:
    """Keep a caption whose ITM match probability is at least ``threshold``."""
    return score >= threshold


@dataclass(frozen=True)
class ThresholdChoice:
    """A filter threshold chosen on a labelled sample, with what it does on that sample."""

    threshold: float
    precision: float | None  # share of the dropped captions that are wrong (None: nothing dropped)
    recall: float  # share of the wrong captions dropped
    dropped: int
    samples: int
    wrong: int
    met: bool  # whether ``precision >= target_precision`` (with at least one caption dropped)


def choose_threshold(scores: Sequence[float], wrong: Sequence[bool], target_precision: float) -> ThresholdChoice:
    """The threshold with the highest recall of ``wrong`` captions at precision >= ``target_precision``.

    A caption is dropped when its score is below the threshold (:func:`decide`). Candidates lie midway
    between consecutive distinct scores, so a threshold never sits on a sample's own score. Among equal
    recalls the lowest threshold wins (it keeps the most captions). When no threshold reaches the target
    precision, the one with the highest precision is returned (ties: the higher recall) with ``met=False``;
    with no wrong caption in the sample, the threshold drops nothing.
    """
    if len(scores) != len(wrong):
        raise ValueError(f"{len(scores)} scores but {len(wrong)} labels")
    if not scores:
        raise ValueError("choose_threshold needs at least one labelled caption")
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    pairs = sorted(zip((float(s) for s in scores), (bool(w) for w in wrong)))
    n_wrong = sum(w for _, w in pairs)
    lowest = pairs[0][0]
    nothing = ThresholdChoice(lowest, None, 0.0, 0, len(pairs), n_wrong, False)
    if n_wrong == 0:
        return nothing
    best: ThresholdChoice | None = None  # best that meets the target
    fallback = nothing
    dropped = dropped_wrong = 0
    for i, (score, is_wrong) in enumerate(pairs):
        dropped += 1
        dropped_wrong += is_wrong
        if i + 1 < len(pairs) and pairs[i + 1][0] == score:
            continue  # equal scores are dropped together
        threshold = (score + pairs[i + 1][0]) / 2 if i + 1 < len(pairs) else score + 1e-6
        precision, recall = dropped_wrong / dropped, dropped_wrong / n_wrong
        choice = ThresholdChoice(threshold, precision, recall, dropped, len(pairs), n_wrong,
                                 precision >= target_precision)
        if choice.met and (best is None or recall > best.recall):
            best = choice
        if fallback.precision is None or (precision, recall) > (fallback.precision, fallback.recall):
            fallback = choice
    return best if best is not None else fallback


def threshold_for_share(scores: Sequence[float], keep: int) -> float:
    """The threshold at which :func:`decide` keeps the ``keep`` highest of ``scores``.

    As :func:`choose_threshold`, the threshold lies midway between the lowest kept and the highest dropped
    score. Equal scores are kept or dropped together: when a tie straddles the ``keep``-th place, all of it is
    kept (the filter keeps a few more than ``keep``). ``keep`` 0 gives a threshold just above the highest score,
    ``keep == len(scores)`` the lowest score.
    """
    if not scores:
        raise ValueError("threshold_for_share needs at least one score")
    if not 0 <= keep <= len(scores):
        raise ValueError(f"keep must be in [0, {len(scores)}], got {keep}")
    desc = sorted((float(s) for s in scores), reverse=True)
    if keep == 0:
        return math.nextafter(desc[0], math.inf)
    for j in range(keep, len(desc)):  # the first place at or after keep where the score falls
        if desc[j] < desc[j - 1]:
            return (desc[j - 1] + desc[j]) / 2
    return desc[-1]
