"""The VQA training loader: :func:`make_vqa_loader` over VQA data sets (one image per sample, its questions in
``json["questions"]``; see :mod:`blip_core.data.webdataset_io`), one item per *question*.

It runs the machinery of :mod:`blip_core.data.loader` (the split over ranks and workers, epochs, seeding,
shuffling and the counting of skipped and lost samples) with questions in place of pairs. Its batches are
described at :class:`VQAStream`; :func:`blip_core.data.splits.load_vqa_split` loads a VQA split for evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from blip_core.constants import ANSWER_MAX_TOKENS, QUESTION_MAX_TOKENS, QUESTION_MAX_WORDS
from blip_core.data.loader import BlipLoader, PairStream
from blip_core.data.samples import (
    NO_KIND,
    ShardRef,
    answer_weights,
    image_index,
    open_datasets,
    sample_questions,
)
from blip_core.data.webdataset_io import decode_json
from blip_core.errors import UserError
from blip_core.tokenizer import BlipTokenizer, pre_question


class VQAStream(PairStream):
    """The VQA batches of one rank: one item per question, split, shuffled and counted as :class:`PairStream`.

    A batch of ``B`` questions is a dict: ``image`` float ``(B, 3, S, S)`` (each question its own augmented
    copy of its image in training; a horizontal flip swaps ``left`` and ``right`` in the question and its
    answers), ``question_ids`` / ``question_mask`` ``(B, Lq)`` (``pre_question``, ``[ENC]`` at position 0,
    padded to the longest), ``answer_ids`` / ``answer_mask`` ``(sum n, La)`` (``[DEC] answer [SEP]``, the unique
    answers of question 0, then question 1, ...), ``weights`` float ``(sum n,)`` (:func:`answer_weights`: for
    VQAv2 count / number of answers, so they sum to 1 per question), ``n`` long ``(B,)`` (unique answers per
    question), and the lists ``question_id``, ``question`` (cleaned), ``kind`` and ``image_id`` with
    ``image_idx`` long ``(B,)``. A question without answers (a test split) is skipped and counted.
    """

    ITEMS = "questions"

    def __init__(self, shards: Sequence[ShardRef], tokenizer: BlipTokenizer, *, question_max_length: int,
                 answer_max_length: int, **kwargs: Any) -> None:
        self.answer_max_length = answer_max_length
        super().__init__(shards, tokenizer, max_words=QUESTION_MAX_WORDS, max_length=question_max_length, prompt="",
                         expand_captions=True, **kwargs)

    def _shard_items(self, shard: ShardRef) -> int:
        return shard.questions

    def _sample_items(self, sample: dict[str, Any]) -> tuple[list[Any], str]:
        meta = decode_json(sample.get("json"))
        if "questions" not in meta and meta.get("captions"):  # a caption sample holds no question
            return [], str(meta.get("image_id") or sample["__key__"])
        qs, image_id = sample_questions(sample)
        return [q if answer_weights(q)[0] else None for q in qs], image_id

    def _collate(self, items: list[tuple[Image.Image, dict, str]], rng: random.Random) -> dict[str, Any]:
        images, questions, answers, weights, counts = [], [], [], [], []
        for img, q, _ in items:
            unique, w = answer_weights(q)
            text = "\n".join([pre_question(q["question"], self.max_words), *unique])
            tensor, text = self.transform(img, text, rng)  # the flip swaps left/right in all of them
            question, *unique = text.split("\n")
            images.append(tensor)
            questions.append(question)
            answers += unique
            weights += w
            counts.append(len(unique))
        tok = self.tokenizer
        question_ids, question_mask = tok(questions, max_length=self.max_length, padding="longest")
        question_ids[:, 0] = tok.enc_id
        answer_ids, answer_mask = tok(answers, max_length=self.answer_max_length, padding="longest")
        answer_ids[:, 0] = tok.dec_id
        ids = [image_id for _, _, image_id in items]
        return {
            "image": torch.stack(images),  # (B, 3, S, S)
            "question_ids": question_ids,  # (B, Lq)
            "question_mask": question_mask,  # (B, Lq)
            "answer_ids": answer_ids,  # (sum n, La)
            "answer_mask": answer_mask,  # (sum n, La)
            "weights": torch.tensor(weights, dtype=torch.float32),  # (sum n,)
            "n": torch.tensor(counts, dtype=torch.long),  # (B,)
            "question_id": [str(q["question_id"]) for _, q, _ in items],
            "question": questions,
            "kind": [str(q.get("kind") or NO_KIND) for _, q, _ in items],
            "image_id": ids,
            "image_idx": torch.tensor([image_index(i) for i in ids], dtype=torch.long),  # (B,)
        }


def make_vqa_loader(data_uris: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int, batch_size: int,
                    train: bool, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                    epoch: int = 0, shuffle_buffer: int = 1000, question_max_length: int = QUESTION_MAX_TOKENS,
                    answer_max_length: int = ANSWER_MAX_TOKENS, pin_memory: bool = False, allow_partial: bool = False,
                    verify_sha256: bool = False, min_scale: float = 0.5, randaugment: bool = True) -> BlipLoader:
    """A loader of VQA batches (one item per question, see :class:`VQAStream`) from VQA data sets.

    Everything else is :func:`make_loader`'s: ``train`` (BLIP's train transform with crop scale
    ``(min_scale, 1)``, flip and RandAugment, shard shuffling and a shuffle buffer; otherwise the eval
    transform in stored order), ranks, workers, seeding per ``(seed, epoch, stream)``, ``pin_memory``,
    ``allow_partial`` and ``verify_sha256``. A data set without questions is refused.
    """
    if isinstance(data_uris, str):
        data_uris = [data_uris]
    shards, lost = open_datasets(data_uris, allow_partial=allow_partial, verify_sha256=verify_sha256)
    if not any(s.questions for s in shards) and not any(x.samples for x in lost):
        raise UserError(f"{', '.join(data_uris)}: no VQA questions: not a VQA data set (ingest a VQA source: "
                        "toyweb://?split=vqa_train or an official VQA annotation file)")
    stream = VQAStream(shards, tokenizer, image_size=image_size, batch_size=batch_size, train=train,
                       min_scale=min_scale, randaugment=randaugment, question_max_length=question_max_length,
                       answer_max_length=answer_max_length, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                       allow_partial=allow_partial)
    return BlipLoader(stream, num_workers, pin_memory, lost)
