"""VQA inference with :class:`~blip_core.models.vqa.BlipVQA`: open-ended generation and answer-list ranking.

* :func:`question_tokens`: ``pre_question`` cleaning, at most 35 tokens, ``[ENC]`` at position 0.
* :func:`answer_tokens`: ``[DEC] answer [SEP]``.
* :func:`generate_answers`: the official ``inference='generate'``: the decoder starts from ``[DEC]`` alone and
  runs :func:`blip_core.generation.generate_ids` (beam 3, max length 10, min length 1; lengths count the
  ``[DEC]`` token, as ``blip caption``'s count its prompt).
* :func:`rank_answers`: the official ``rank_answer``: the first-token probability of every candidate from the
  decoder's first step, the top ``k`` candidates re-scored by minus their label-smoothed sequence loss (the
  training loss, so the smoothing term is part of the score), the best one returned with its score.

Each question's decoder cross-attention keys/values are computed once and read in place by its beams and by
its ``k`` candidates. One image can be asked many questions (``image`` of batch 1): its ViT tokens and keys/values
are then computed once too.

Padding of the questions: the official ``generate`` and ``transformers`` give the answer decoder an all-ones
question mask, so in a batch of questions of different lengths an answer also attends to its question's padding
and depends on the longest question of the batch. ``generate_answers`` masks the padding by default (an answer
is the same in any batch); ``mask_question_padding=False`` reproduces the official behaviour. Ranking always
masks it, as the official ``rank_answer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from blip_core.constants import QUESTION_MAX_TOKENS
from blip_core.generation import generate_ids
from blip_core.losses import LABEL_SMOOTHING
from blip_core.models.vqa import BlipVQA
from blip_core.tokenizer import pre_question

RANK_ROWS = 256  # candidate rows decoded at once when ranking (k candidates per question)


def question_tokens(tokenizer, questions: Sequence[str], max_length: int = QUESTION_MAX_TOKENS,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned, tokenised questions ``(ids, mask)``, each ``(Q, L)``, with ``[ENC]`` at position 0."""
    ids, mask = tokenizer([pre_question(q) for q in questions], max_length=max_length)
    ids[:, 0] = tokenizer.enc_id
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def answer_tokens(tokenizer, answers: Sequence[str], device: torch.device | str | None = None, *,
                  max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised answers ``(ids, mask)``, each ``(A, L)``: ``[DEC] answer [SEP]``, padded to the longest."""
    ids, mask = tokenizer(list(answers), max_length=max_length)
    ids[:, 0] = tokenizer.dec_id
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def _question_states(model: BlipVQA, tokenizer, image: torch.Tensor, questions: Sequence[str]):
    if not isinstance(model, BlipVQA):
        raise TypeError(f"VQA needs a BlipVQA model, got {type(model).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.shape[0] not in (1, len(questions)):
        raise ValueError(f"{image.shape[0]} images for {len(questions)} questions: give one image per question "
                         "or one image for all")
    ids, mask = question_tokens(tokenizer, questions, device=image.device)
    return model.encode_question(image, ids, mask), mask  # (Q, L_q, H), (Q, L_q)


@torch.no_grad()
def generate_answers(model: BlipVQA, tokenizer, image: torch.Tensor, questions: Sequence[str], *,
                     decoding: Literal["greedy", "beam"] = "beam", num_beams: int = 3, max_length: int = 10,
                     min_length: int = 1, mask_question_padding: bool = True) -> list[str]:
    """Answer each question about its image (``image`` ``(Q, 3, H, W)``, or one image ``(1, 3, H, W)`` /
    ``(3, H, W)`` for all questions); returns ``Q`` strings. See the module docstring for the options."""
    if decoding not in ("greedy", "beam"):
        raise ValueError(f"decoding must be greedy or beam, got {decoding!r}")
    if not questions:
        return []
    states, mask = _question_states(model, tokenizer, image, questions)
    cross = model.question_cross(states, mask if mask_question_padding else None)
    ids = generate_ids(model, None, [tokenizer.dec_id], eos_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
                       decoding=decoding, num_beams=num_beams, max_length=max_length, min_length=min_length,
                       cross=cross)
    return [tokenizer.decode(row) for row in ids]


@torch.no_grad()
def rank_answers(model: BlipVQA, tokenizer, image: torch.Tensor, questions: Sequence[str],
                 answer_list: Sequence[str], *, k: int = 128,
                 label_smoothing: float = LABEL_SMOOTHING) -> list[tuple[str, float]]:
    """Pick each question's answer from ``answer_list`` as the official ``rank_answer``; returns
    ``(answer, score)`` per question, the score being minus the label-smoothed sequence loss (higher is better).

    ``k`` (clamped to the list's length) candidates per question pass the first-token filter.
    """
    if not answer_list:
        raise ValueError("answer_list is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not questions:
        return []
    states, mask = _question_states(model, tokenizer, image, questions)
    cross = model.question_cross(states, mask)  # the official ranking masks the question's padding
    n_q = states.shape[0]
    a_ids, a_mask = answer_tokens(tokenizer, answer_list, states.device,
                                  max_length=min(512, model.cfg.text.max_position))
    k = min(k, a_ids.shape[0])

    # First-token filter: the decoder's first step from [DEC] alone.
    start = a_ids[:1, :1].expand(n_q, 1)  # (Q, 1) [DEC]
    logits, _ = model.decode(start, torch.ones_like(start), cross)
    first = logits[:, 0].float().softmax(dim=-1).index_select(1, a_ids[:, 1])  # (Q, A)
    top = first.topk(k, dim=1).indices  # (Q, k)

    # Re-score the k candidates of each question, a block of questions at a time; the k rows of a question
    # read its keys/values in place.
    scores = torch.empty(n_q, k, device=states.device)
    step = max(1, RANK_ROWS // k)
    for q0 in range(0, n_q, step):
        q1 = min(n_q, q0 + step)
        cand = top[q0:q1].reshape(-1)  # ((q1-q0)*k,)
        losses = model.answer_losses(a_ids[cand], a_mask[cand], cross.narrow(q0, q1 - q0),
                                     label_smoothing=label_smoothing)
        scores[q0:q1] = -losses.view(q1 - q0, k)
    best = scores.argmax(dim=1)  # the first of equal scores, as the official argmax
    best_score = scores.gather(1, best[:, None]).squeeze(1)
    picked = top.gather(1, best[:, None]).squeeze(1)
    return [(answer_list[int(i)], float(s)) for i, s in zip(picked.tolist(), best_score.tolist())]
