"""Evaluation splits held in memory: :func:`load_eval_split` (image-text pairs for retrieval and captioning)
and :func:`load_vqa_split` (questions for VQA), every sample of the split in stored order with the eval transform.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from blip_core.constants import CAPTION_MAX_WORDS
from blip_core.data.samples import (
    NO_KIND,
    ShardLost,
    check_count,
    dataset_shards,
    decode_image,
    image_bytes,
    sample_captions,
    sample_questions,
)
from blip_core.data.transforms import EvalTransform
from blip_core.data.webdataset_io import ShardReadError, decode_json, iter_shard
from blip_core.errors import UserError
from blip_core.io import default_opener
from blip_core.tokenizer import pre_caption, pre_question

log = logging.getLogger(__name__)


class EvalSplit(NamedTuple):
    """A small clean split held in memory for retrieval and captioning evaluation."""

    images: torch.Tensor  # (N, 3, S, S)
    texts: list[str]  # every caption, cleaned
    txt2img: list[int]  # text index -> image index
    img2txt: list[list[int]]  # image index -> its text indices
    samples: list[dict]  # each image's json, with "__key__"


def _eval_samples(uris: list[str], what: str, parse: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
    """``parse(sample)`` of every sample of the dataset directories ``uris``, in stored order, for an evaluation.

    A sample ``parse`` raises on is skipped and counted (one warning at the end); ``None`` leaves a sample out
    uncounted. A missing, damaged or unreadable shard raises :class:`ShardLost`: an evaluation never runs
    silently on part of its split.
    """
    skipped = 0
    opener = default_opener()
    for shard in dataset_shards(uris):
        try:
            seen = 0
            for sample in iter_shard(shard.uri, opener):
                seen += 1
                try:
                    item = parse(sample)
                except Exception:  # noqa: BLE001 - skip and count any bad sample
                    skipped += 1
                    continue
                if item is not None:
                    yield item
            check_count(shard, seen)
        except (ShardReadError, OSError) as e:  # an evaluation on part of the split would not say so
            raise ShardLost(f"{shard.uri}: unreadable ({e}); re-run the stage that wrote it") from None
    if skipped:
        log.warning("%s(%s): skipped %d unreadable sample(s)", what, ", ".join(uris), skipped)


def load_eval_split(uri: str | Sequence[str], image_size: int, max_words: int = CAPTION_MAX_WORDS) -> EvalSplit:
    """Load every sample of one or more dataset directories with the eval transform.

    Samples that cannot be decoded are skipped and counted in a warning; a missing, damaged or unreadable
    shard raises :class:`ShardLost` (an evaluation never runs silently on part of its split).
    """
    transform = EvalTransform(image_size)
    images: list[torch.Tensor] = []
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    samples: list[dict] = []
    uris = [uri] if isinstance(uri, str) else list(uri)

    def parse(sample: dict[str, Any]):
        caps, _ = sample_captions(sample)
        caps = [c for c in (pre_caption(c, max_words) for c in caps) if c]
        if not caps:
            raise ValueError("no caption left after cleaning")
        return caps, decode_image(image_bytes(sample)), decode_json(sample.get("json")), sample["__key__"]

    for caps, img, meta, key in _eval_samples(uris, "load_eval_split", parse):
        i = len(images)
        images.append(transform(img)[0])
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        texts += caps
        txt2img += [i] * len(caps)
        samples.append({**meta, "__key__": key})
    if not images:
        raise UserError(f"{', '.join(uris)}: no readable samples")
    return EvalSplit(torch.stack(images), texts, txt2img, img2txt, samples)


class VQASplit(NamedTuple):
    """A VQA split held in memory for evaluation: one entry per question, images stored once."""

    images: torch.Tensor  # (N, 3, S, S)
    image_index: torch.Tensor  # (Q,) long: the image of each question
    questions: list[str]  # cleaned with pre_question
    answers: list[list[str]]  # the annotators' answers (empty where the split has none)
    kinds: list[str]  # the question kinds (NO_KIND where none is given)
    question_ids: list[str]
    image_ids: list[str]  # (N,)


def load_vqa_split(uri: str | Sequence[str], image_size: int) -> VQASplit:
    """Load every question of one or more VQA data sets with the eval transform.

    Samples that cannot be decoded are skipped and counted in a warning; a missing, damaged or unreadable
    shard raises :class:`ShardLost`; a split without questions is a :class:`UserError`.
    """
    transform = EvalTransform(image_size)
    uris = [uri] if isinstance(uri, str) else list(uri)
    images: list[torch.Tensor] = []
    image_ids: list[str] = []
    index: list[int] = []
    questions: list[str] = []
    answers: list[list[str]] = []
    kinds: list[str] = []
    qids: list[str] = []
    def parse(sample: dict[str, Any]):
        if "questions" not in decode_json(sample.get("json")):
            return None
        qs, image_id = sample_questions(sample)
        return qs, image_id, decode_image(image_bytes(sample))

    for qs, image_id, img in _eval_samples(uris, "load_vqa_split", parse):
        i = len(images)
        images.append(transform(img)[0])
        image_ids.append(image_id)
        for q in qs:
            index.append(i)
            questions.append(pre_question(q["question"]))
            answers.append([a for a in q.get("answers", []) if isinstance(a, str)])
            kinds.append(str(q.get("kind") or NO_KIND))
            qids.append(str(q.get("question_id")))
    if not questions:
        raise UserError(f"{', '.join(uris)}: no readable VQA questions")
    return VQASplit(torch.stack(images), torch.tensor(index, dtype=torch.long), questions, answers, kinds, qids,
                    image_ids)
