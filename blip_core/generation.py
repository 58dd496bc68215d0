"""Caption generation (greedy, beam search, nucleus sampling) and ITM/ITC scoring of texts against an image.

Semantics follow the official BLIP captioner, which runs Hugging Face ``generate`` on its decoder:

* The prompt is tokenised to ``[CLS] a picture of [SEP]``; ``[CLS]`` becomes ``[DEC]`` and the trailing
  ``[SEP]`` is dropped. ``max_length`` / ``min_length`` count the prompt tokens. ``[SEP]`` ends a caption.
  After decoding (special tokens skipped) the prompt text is cut off the front.
* Repetition penalty divides positive and multiplies negative scores of every token already in the sequence
  (prompt included); min length bans ``[SEP]`` while the sequence is shorter. Beam search applies both to
  log-probabilities. Finished hypotheses are ranked by a length-normalised score, by one of two rules
  (``length_norm``):

  - ``current`` (default): ``sum_logprob / generated_len ** length_penalty``, where ``generated_len`` counts
    the generated tokens including the final ``[SEP]`` (not the prompt), with the stopping heuristic of
    today's ``transformers`` (``early_stopping=False``), so tokens equal ``generate``'s;
  - ``hf415``: the rule of ``transformers`` 4.15, which the official BLIP code ran for the published numbers:
    a hypothesis ending in ``[SEP]`` scores ``sum_logprob / len ** length_penalty`` with ``len`` the whole
    sequence *before* ``[SEP]``, prompt included; at ``max_length`` the open beams are added with
    ``len = max_length``; a row stops once its best candidate, ``best_sum_logprob / cur_len **
    length_penalty``, cannot beat its worst finished hypothesis. Longer prompts therefore damp the
    preference between short and long captions, and the two rules can pick different captions.
* Nucleus sampling applies repetition penalty (1.1 by default, hard-coded in the official sampler),
  temperature, top-k (50, the ``generate`` default the official sampler inherits; 0 disables) and top-p.

Image keys/values are computed once per image (:meth:`BlipModel.cross_kv`). The ``num_beams`` (or
``num_return``) rows of one image are kept consecutive, so the decoder reads each image's K/V in place
instead of copying image embeddings per beam. The self-attention KV cache is reordered as beams move.
The same loops decode VQA answers (:mod:`blip_core.vqa`): ``generate_ids(..., cross=...)`` takes a question's
keys/values instead of an image's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict, Unpack

import torch
import torch.nn.functional as F

from blip_core.constants import DEFAULT_PROMPT
from blip_core.models.blip import BlipModel
from blip_core.models.text import CrossKV, KVCache

Decoding = Literal["greedy", "beam", "nucleus"]
LengthNorm = Literal["current", "hf415"]


class DecodingOptions(TypedDict, total=False):
    """The decoding keywords :func:`generate_captions` passes on to :func:`generate_ids`."""

    decoding: Decoding
    num_beams: int
    max_length: int
    min_length: int
    top_p: float
    top_k: int
    temperature: float
    repetition_penalty: float | None
    length_penalty: float
    length_norm: LengthNorm
    num_return: int
    generator: torch.Generator | None
LENGTH_NORMS: tuple[str, ...] = ("current", "hf415")
NEG_INF = float("-inf")
_BEAM_NEG = -1.0e9


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """``[DEC]`` followed by the prompt's tokens (no ``[SEP]``), as the official captioner feeds the decoder."""
    if not prompt:
        return [tokenizer.dec_id]
    ids, _ = tokenizer([prompt], max_length=512)
    ids = ids[0].tolist()
    if ids and ids[-1] == tokenizer.sep_id:
        ids = ids[:-1]
    return [tokenizer.dec_id, *ids[1:]]


def strip_prompt(text: str, prompt: str) -> str:
    """Remove the prompt from the front of a decoded caption (the official ``caption[len(prompt):]``)."""
    if prompt and text.startswith(prompt):
        return text[len(prompt):].strip()
    stripped = prompt.strip()
    if stripped and text.startswith(stripped):
        return text[len(stripped):].strip()
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Score processing
# --------------------------------------------------------------------------------------------------


def _repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token present in ``seqs`` (B, L): divide positive scores, multiply negative ones."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seqs)  # (B, L)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seqs, picked)


def _ban_eos(scores: torch.Tensor, eos_id: int, cur_len: int, min_length: int) -> torch.Tensor:
    if cur_len < min_length:
        scores[:, eos_id] = NEG_INF
    return scores


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (at least one token)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1)  # ascending
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


# --------------------------------------------------------------------------------------------------
# Decoding loops
# --------------------------------------------------------------------------------------------------


def _step(model: BlipModel, tokens: torch.Tensor, length: int, cross: CrossKV,
          cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    """Decode ``tokens`` (B, l) given ``cache``; returns last-position logits (B, V) in fp32 and the cache."""
    mask = tokens.new_ones(tokens.shape[0], length)
    decoder = model.text_decoder
    hidden, cache = decoder.bert(tokens, mask, cross, is_causal=True, past=cache, use_cache=True)
    return decoder.cls.predictions(hidden[:, -1]).float(), cache  # LM head on the last position only


def _reorder(cache: KVCache, index: torch.Tensor) -> KVCache:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]


def _greedy_or_sample(model, cross, prompt, n_images, rows_per_image, *, eos_id, pad_id, max_length, min_length,
                      repetition_penalty, sample, top_k, top_p, temperature, generator) -> torch.Tensor:
    rows = n_images * rows_per_image
    seqs = prompt.expand(rows, -1).contiguous()  # (R, P); rows of one image consecutive
    logits, cache = _step(model, seqs, seqs.shape[1], cross, None)
    finished = torch.zeros(rows, dtype=torch.bool, device=seqs.device)
    while True:
        cur_len = seqs.shape[1]
        scores = _repetition_penalty(logits, seqs, repetition_penalty)
        scores = _ban_eos(scores, eos_id, cur_len, min_length)
        if sample:
            if temperature != 1.0:
                scores = scores / temperature
            scores = _top_p(_top_k(scores, top_k), top_p)
            nxt = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == eos_id
        if bool(finished.all()) or seqs.shape[1] >= max_length:
            return seqs
        logits, cache = _step(model, nxt[:, None], seqs.shape[1], cross, cache)


def _beam_search(step, prompt, n_images, *, num_beams, num_return, eos_id, pad_id, max_length, min_length,
                 repetition_penalty, length_penalty, length_norm: LengthNorm = "current") -> torch.Tensor:
    """Beam search over ``n_images`` rows of ``num_beams`` beams; ``step(tokens, length, cache)`` runs the decoder.

    ``step`` returns the last position's logits ``(rows, V)`` and the KV cache (a list of ``(k, v)`` tensors
    with rows first, reordered here as beams move). ``length_norm`` picks how finished hypotheses are scored
    (see the module docstring).
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    hf415 = length_norm == "hf415"
    b, k, p = n_images, num_beams, prompt.shape[1]
    dev = prompt.device
    keep = 2 * k  # candidates kept per image: enough to continue even if k of them end here
    running = torch.full((b, k, max_length), pad_id, dtype=torch.long, device=dev)
    running[:, :, :p] = prompt
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = _BEAM_NEG  # only the first beam expands at step one
    done_seqs = running.clone()
    done_scores = torch.full((b, k), _BEAM_NEG, device=dev)
    done_flags = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    first_k = torch.arange(keep, device=dev) < k  # (2k,)
    offsets = (torch.arange(b, device=dev) * k)[:, None]  # (b, 1)

    def merge(seqs, scores, flags):
        """Keep each image's ``k`` best finished hypotheses among the old ones and ``seqs``/``scores``."""
        nonlocal done_seqs, done_scores, done_flags
        merged_scores = torch.cat([done_scores, scores], dim=1)
        best = merged_scores.topk(k, dim=1).indices
        done_seqs = torch.cat([done_seqs, seqs], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        done_scores = merged_scores.gather(1, best)
        done_flags = torch.cat([done_flags, flags], dim=1).gather(1, best)

    def worst_done() -> torch.Tensor:
        return torch.where(done_flags, done_scores.min(dim=1, keepdim=True).values,
                           torch.full_like(done_scores, _BEAM_NEG))

    logits, cache = step(prompt.expand(b * k, -1), p, None)
    cur_len = p
    while True:
        logp = F.log_softmax(logits, dim=-1)  # (b*k, V)
        logp = _repetition_penalty(logp, running.view(b * k, -1)[:, :cur_len], repetition_penalty)
        logp = _ban_eos(logp, eos_id, cur_len, min_length)
        vocab = logp.shape[-1]
        total = (logp.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
        cand_scores, cand_idx = total.topk(keep, dim=1)  # (b, 2k)
        cand_beam = cand_idx // vocab
        cand_tok = cand_idx % vocab
        cand_seqs = running.gather(1, cand_beam[:, :, None].expand(-1, -1, max_length)).clone()  # (b, 2k, T)
        cand_seqs[:, :, cur_len] = cand_tok
        last = cur_len + 1 >= max_length
        # hf415 ends a hypothesis only at [SEP]; at max_length its open beams are added below instead.
        ends = (cand_tok == eos_id) if hf415 else (cand_tok == eos_id) | last  # (b, 2k)

        # Live beams: the best k candidates that did not end.
        live_scores = cand_scores + ends.float() * _BEAM_NEG
        pick = live_scores.topk(k, dim=1).indices  # (b, k)
        running = cand_seqs.gather(1, pick[:, :, None].expand(-1, -1, max_length))
        running_scores = live_scores.gather(1, pick)
        source_beam = cand_beam.gather(1, pick)  # (b, k) beam each live row continues

        # Finished hypotheses: among the top k candidates that ended, length-normalised.
        just_done = ends & first_k[None]
        norm_len = cur_len if hf415 else cur_len + 1 - p  # hf415: the whole sequence before [SEP]
        fin = cand_scores / (norm_len ** length_penalty)
        fin = fin + (~improvable).float() * _BEAM_NEG + (~just_done).float() * _BEAM_NEG
        merge(cand_seqs, fin, just_done)

        if hf415:
            # transformers 4.15: a row is done once its best candidate of this step (ended or not), scored at
            # the current length, cannot beat its worst finished hypothesis.
            best_possible = cand_scores[:, :1] / (cur_len ** length_penalty)
            improvable = improvable & (best_possible > worst_done()).any(dim=1, keepdim=True)
            if last:  # finalize: the open beams of rows not done, scored at their full length
                open_scores = running_scores / ((cur_len + 1) ** length_penalty)
                open_scores = open_scores + (~improvable).float() * _BEAM_NEG
                merge(running, open_scores, improvable.expand(-1, k))
            cur_len += 1
        else:
            cur_len += 1
            best_possible = running_scores[:, :1] / ((cur_len - p) ** length_penalty)
            improvable = improvable & (best_possible > worst_done()).any(dim=1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()) or last:
            break
        cache = _reorder(cache, (source_beam + offsets).view(-1))
        logits, cache = step(running[:, :, cur_len - 1].reshape(b * k, 1), cur_len, cache)

    out = done_seqs[:, :num_return].reshape(b * num_return, max_length)
    return _crop(out, p, eos_id, pad_id)


def _crop(seqs: torch.Tensor, prompt_len: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """Pad everything after each sequence's first [SEP] and cut the batch to its longest sequence."""
    gen = seqs[:, prompt_len:]
    is_eos = gen == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
    gen = gen.masked_fill(after, pad_id)
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.float().argmax(dim=1) + 1, torch.full_like(has_eos, gen.shape[1],
                                                                                      dtype=torch.long))
    width = int(lengths.max()) if gen.shape[0] else 0
    return torch.cat([seqs[:, :prompt_len], gen[:, :width]], dim=1)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_ids(
    model: BlipModel,
    images: torch.Tensor,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    eos_id: int,
    pad_id: int = 0,
    decoding: Decoding = "beam",
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    repetition_penalty: float | None = None,
    length_penalty: float = 1.0,
    length_norm: LengthNorm = "current",
    num_return: int = 1,
    generator: torch.Generator | None = None,
    image_embeds: torch.Tensor | None = None,
    cross: CrossKV | None = None,
) -> torch.Tensor:
    """Generate token ids for a batch of images; returns ``(B * num_return, L)`` including the prompt.

    Args:
        images: ``(B, 3, H, W)`` normalised pixels (ignored when ``image_embeds`` is given).
        prompt_ids: decoder prompt starting with ``[DEC]`` (see :func:`prompt_token_ids`).
        eos_id: ``[SEP]``; pad_id: fills positions after a sequence's end.
        decoding: ``greedy``, ``beam`` or ``nucleus``.
        max_length, min_length: total lengths, prompt included.
        repetition_penalty: None = 1.0 for greedy/beam, 1.1 for nucleus (the official sampler).
        length_norm: how beam search scores finished hypotheses: ``current`` (today's ``transformers``) or
            ``hf415`` (``transformers`` 4.15, as the official BLIP code ran); see the module docstring.
        num_return: sequences per image (at most ``num_beams`` for beam search).
        generator: random generator for nucleus sampling.
        image_embeds: precomputed ViT tokens ``(B, 1+N, D)``.
        cross: precomputed decoder cross-attention keys/values, one row per source (``images`` and
            ``image_embeds`` are then ignored): an image's (:meth:`BlipModel.cross_kv`) or, for VQA, a
            question's (:meth:`blip_core.models.vqa.BlipVQA.question_cross`); ``model.text_decoder`` decodes.

    Rows ``i * num_return ... (i + 1) * num_return - 1`` belong to image ``i``.
    """
    if decoding not in ("greedy", "beam", "nucleus"):
        raise ValueError(f"decoding must be greedy, beam or nucleus, got {decoding!r}")
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    if cross is None:
        if image_embeds is None:
            image_embeds = model.encode_image(images)  # (B, 1+N, D)
        cross = model.cross_kv(image_embeds)  # once per image
    k0 = cross.kv[0][0]  # (B, heads, N, head_dim)
    prompt = torch.as_tensor(list(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else prompt_ids,
                             dtype=torch.long, device=k0.device).view(1, -1)
    if prompt.shape[1] >= max_length:
        raise ValueError(f"max_length {max_length} must exceed the prompt length {prompt.shape[1]}")
    if repetition_penalty is None:
        repetition_penalty = 1.1 if decoding == "nucleus" else 1.0
    if num_return < 1:
        raise ValueError("num_return must be >= 1")
    n = k0.shape[0]
    if decoding == "beam":
        if num_return > num_beams:
            raise ValueError(f"num_return {num_return} exceeds num_beams {num_beams}")

        def step(tokens, length, cache):
            return _step(model, tokens, length, cross, cache)

        return _beam_search(step, prompt, n, num_beams=num_beams, num_return=num_return, eos_id=eos_id,
                            pad_id=pad_id, max_length=max_length, min_length=min_length,
                            repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                            length_norm=length_norm)
    sample = decoding == "nucleus"
    rows = num_return if sample else 1
    out = _greedy_or_sample(model, cross, prompt, n, rows, eos_id=eos_id, pad_id=pad_id, max_length=max_length,
                            min_length=min_length, repetition_penalty=repetition_penalty, sample=sample,
                            top_k=top_k, top_p=top_p, temperature=temperature, generator=generator)
    out = _crop(out, prompt.shape[1], eos_id, pad_id)
    if not sample and num_return > 1:  # greedy is deterministic: repeat the single answer
        out = out.repeat_interleave(num_return, dim=0)
    return out


@torch.no_grad()
def generate_captions(model: BlipModel, tokenizer, images: torch.Tensor, *, prompt: str = DEFAULT_PROMPT,
                      **options: Unpack[DecodingOptions]) -> list[str]:
    """Caption ``images`` ``(B, 3, H, W)``; returns ``B * num_return`` strings with the prompt removed.

    ``options`` are :func:`generate_ids`'s decoding keywords, with its defaults: the paper's evaluation setting
    (beam 3, max length 20, min length 5; the prompt "a picture of "); CapFilt uses
    ``decoding="nucleus", top_p=0.9``.
    """
    ids = generate_ids(model, images, prompt_token_ids(tokenizer, prompt), eos_id=tokenizer.sep_id,
                       pad_id=tokenizer.pad_id, **options)
    return [strip_prompt(tokenizer.decode(row), prompt) for row in ids]


@torch.no_grad()
def itm_itc(model: BlipModel, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            itm_first_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM logits ``(T, 2)`` and ITC cosine ``(T,)`` of ``T`` texts against one image.

    ``image_embeds`` is ``(1, 1+N, D)``; ``input_ids`` come from the tokenizer (``[CLS]`` first, used as is for
    ITC); position 0 is replaced by ``itm_first_id`` for the image-grounded encoder. The image's keys/values
    are computed once and read by all ``T`` texts.
    """
    if image_embeds.shape[0] != 1:
        raise ValueError("itm_itc scores texts against one image: image_embeds must be (1, 1+N, D)")
    cross = model.cross_kv(image_embeds)  # T texts fold over this one image
    enc_ids = input_ids.clone()
    enc_ids[:, 0] = itm_first_id
    logits = model.itm_logits(enc_ids, attention_mask, cross)  # (T, 2)
    text_feat = model.text_features(model.encode_text(input_ids, attention_mask))  # (T, E)
    image_feat = model.image_features(image_embeds)  # (1, E)
    return logits, (text_feat @ image_feat.T).squeeze(1)


@torch.no_grad()
def itm_scores(model: BlipModel, tokenizer, image: torch.Tensor, texts: Sequence[str], *,
               itm_first_token: Literal["enc", "cls"] = "enc", max_length: int = 35,
               image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match probability and ITC cosine of each text against one image: two ``(T,)`` tensors.

    ``image`` is ``(3, H, W)`` or ``(1, 3, H, W)``. ``itm_first_token="enc"`` follows official training and
    evaluation (``[ENC]`` at position 0 of the ITM input); ``"cls"`` reproduces the official demo class and
    ``transformers``' ``BlipForImageTextRetrieval``.
    """
    if itm_first_token not in ("enc", "cls"):
        raise ValueError(f"itm_first_token must be 'enc' or 'cls', got {itm_first_token!r}")
    if image_embeds is None:
        if image.dim() == 3:
            image = image[None]
        image_embeds = model.encode_image(image)
    ids, mask = tokenizer(list(texts), max_length=max_length)
    ids, mask = ids.to(image_embeds.device, non_blocking=True), mask.to(image_embeds.device, non_blocking=True)
    first = tokenizer.enc_id if itm_first_token == "enc" else tokenizer.cls_id
    logits, cosine = itm_itc(model, image_embeds, ids, mask, first)
    return logits.float().softmax(dim=-1)[:, 1], cosine.float()  # fp32 scores under any autocast
