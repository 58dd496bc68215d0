"""Image-text retrieval as BLIP evaluates it: ITC top-k candidates re-ranked by ITM, and recall@K.

Inference (official ``evaluation`` of ``train_retrieval.py``):

1. ITC features: ViT -> ``vision_proj([CLS])`` -> L2 normalise, and the unimodal text encoder ->
   ``text_proj([CLS])`` -> L2 normalise; the cosine matrix ``sim = I @ T.T`` (no temperature).
2. Image-to-text: for each image, the ``k`` texts with the highest cosine go through the image-grounded
   encoder (first token ``[ENC]``); ``score = itm_head(...)[:, 1] + cosine`` (the raw match logit, no softmax).
   Every other entry of the row is ``-100``.
3. Text-to-image is symmetric: each text's ``k`` best images by cosine are re-ranked the same way.

Each image's cross-attention keys/values are computed once and read by all of its candidates: image-to-text
folds an image's ``k`` candidate texts onto that image's K/V; text-to-image computes the K/V of the distinct
candidate images of a text chunk once and addresses them by index (:meth:`CrossKV.select`).

Metrics (:func:`recall_at_k`): TR@K counts an image as retrieved when the best-ranked of its ground-truth
captions is in the top K; IR@K uses the rank of each text's image. Values are percentages, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from blip_core.models.blip import BlipModel
from blip_core.objectives import with_first_token

OUTSIDE_TOP_K = -100.0  # score of every pair that is not among a row's k ITC candidates


class ItcOutput(NamedTuple):
    """ITC similarities and the encodings the ITM re-rank needs."""

    sim: torch.Tensor  # (N_img, N_txt) cosine similarities
    image_embeds: torch.Tensor  # (N_img, 1+N, D_img) ViT tokens
    image_feats: torch.Tensor  # (N_img, E) normalised ITC image features
    text_feats: torch.Tensor  # (N_txt, E) normalised ITC text features


class RetrievalScores(NamedTuple):
    """Fused ITM + ITC scores of both directions (``-100`` outside the ITC top-k)."""

    i2t: torch.Tensor  # (N_img, N_txt)
    t2i: torch.Tensor  # (N_txt, N_img)
    sim: torch.Tensor  # (N_img, N_txt) ITC cosine


def _device(model: BlipModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def itc_similarity(model: BlipModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 64) -> ItcOutput:
    """ITC cosine matrix of ``images`` ``(N_img, 3, H, W)`` against texts ``(N_txt, L)`` (``[CLS]`` first).

    Images and texts are encoded ``batch_size`` at a time on the model's device. Returns an :class:`ItcOutput`
    (a tuple ``(sim, image_embeds, image_feats, text_feats)``).
    """
    dev = _device(model)
    embeds, img_feats, txt_feats = [], [], []
    for s in range(0, images.shape[0], batch_size):
        emb = model.encode_image(images[s:s + batch_size].to(dev, non_blocking=True))  # (b, 1+N, D)
        embeds.append(emb)
        img_feats.append(model.image_features(emb))
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size].to(dev, non_blocking=True)
        mask = attention_mask[s:s + batch_size].to(dev, non_blocking=True)
        txt_feats.append(model.text_features(model.encode_text(ids, mask)))
    image_feats, text_feats = torch.cat(img_feats), torch.cat(txt_feats)
    return ItcOutput(image_feats @ text_feats.T, torch.cat(embeds), image_feats, text_feats)


def _pairs_per_step(batch_size: int, k: int) -> int:
    """Rows (images or texts) per ITM forward so that one forward holds about ``batch_size`` pairs."""
    return max(1, batch_size // max(k, 1))


@torch.no_grad()
def rerank_i2t(model: BlipModel, image_embeds: torch.Tensor, sim: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, *, enc_id: int, k: int, batch_size: int = 64) -> torch.Tensor:
    """Image-to-text scores ``(N_img, N_txt)``: ITM match logit + cosine on each image's top-k, -100 elsewhere.

    ``batch_size`` is the number of image-text pairs per ITM forward (at least one image's ``k`` candidates).
    """
    dev = _device(model)
    n_img, n_txt = sim.shape
    k = min(k, n_txt)
    scores = torch.full((n_img, n_txt), OUTSIDE_TOP_K, device=sim.device, dtype=sim.dtype)
    enc_ids = with_first_token(input_ids, enc_id)
    step = _pairs_per_step(batch_size, k)
    for s in range(0, n_img, step):
        top_sim, top_idx = sim[s:s + step].topk(k, dim=1)  # (b, k)
        b = top_idx.shape[0]
        flat = top_idx.reshape(-1).cpu()  # (b*k,) the k candidates of each image, consecutive
        cross = model.cross_kv(image_embeds[s:s + b].to(dev))  # K/V once per image, read by its k texts
        logits = model.itm_logits(enc_ids[flat].to(dev, non_blocking=True),
                                 attention_mask[flat].to(dev, non_blocking=True), cross)  # (b*k, 2)
        fused = logits[:, 1].view(b, k).to(sim.dtype) + top_sim  # (b, k)
        scores[s:s + b].scatter_(1, top_idx, fused)
    return scores


@torch.no_grad()
def rerank_t2i(model: BlipModel, image_embeds: torch.Tensor, sim: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, *, enc_id: int, k: int, batch_size: int = 64) -> torch.Tensor:
    """Text-to-image scores ``(N_txt, N_img)``: ITM match logit + cosine on each text's top-k, -100 elsewhere.

    The K/V of the distinct candidate images of a chunk of texts are computed once and selected by index.
    """
    dev = _device(model)
    sim_t = sim.T  # (N_txt, N_img)
    n_txt, n_img = sim_t.shape
    k = min(k, n_img)
    scores = torch.full((n_txt, n_img), OUTSIDE_TOP_K, device=sim.device, dtype=sim.dtype)
    enc_ids = with_first_token(input_ids, enc_id)
    step = _pairs_per_step(batch_size, k)
    for s in range(0, n_txt, step):
        top_sim, top_idx = sim_t[s:s + step].topk(k, dim=1)  # (b, k)
        b = top_idx.shape[0]
        uniq, inverse = torch.unique(top_idx.reshape(-1), return_inverse=True)  # (u,), (b*k,)
        cross = model.cross_kv(image_embeds[uniq.to(image_embeds.device)].to(dev)).select(inverse.to(dev))
        rows = torch.arange(s, s + b).repeat_interleave(k)  # (b*k,) text of each pair
        logits = model.itm_logits(enc_ids[rows].to(dev, non_blocking=True),
                                 attention_mask[rows].to(dev, non_blocking=True), cross)  # (b*k, 2)
        fused = logits[:, 1].view(b, k).to(sim.dtype) + top_sim  # (b, k)
        scores[s:s + b].scatter_(1, top_idx, fused)
    return scores


@torch.no_grad()
def retrieval_scores(model: BlipModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     *, enc_id: int, k: int = 256, batch_size: int = 64,
                     itm_batch_size: int | None = None) -> RetrievalScores:
    """Both directions' fused scores for a test split: ITC, then ITM re-rank of the top ``k``.

    ``batch_size`` images or texts per encoder forward; ``itm_batch_size`` (default ``batch_size``) image-text
    pairs per ITM forward.
    """
    itc = itc_similarity(model, images, input_ids, attention_mask, batch_size)
    pairs = itm_batch_size or batch_size
    i2t = rerank_i2t(model, itc.image_embeds, itc.sim, input_ids, attention_mask, enc_id=enc_id, k=k,
                     batch_size=pairs)
    t2i = rerank_t2i(model, itc.image_embeds, itc.sim, input_ids, attention_mask, enc_id=enc_id, k=k,
                     batch_size=pairs)
    return RetrievalScores(i2t, t2i, itc.sim)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def retrieval_ranks(scores_i2t, scores_t2i, img2txt: Sequence[Sequence[int]],
                    txt2img: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: per image, of its best-ranked caption; per text, of its image.

    A rank counts the *other* (non-ground-truth) entries scored at least as high, so ties are resolved
    against the ground truth: a constant score matrix gets no hits, and ``-100`` entries outside the top-k
    never count as retrieved ahead of the rest.
    """
    s_i2t = torch.as_tensor(scores_i2t, dtype=torch.float64).cpu()
    s_t2i = torch.as_tensor(scores_t2i, dtype=torch.float64).cpu()
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be (N_txt, N_img) = {(n_txt, n_img)}, got {tuple(s_t2i.shape)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError("img2txt needs one entry per image and txt2img one per text")
    gt = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, caps in enumerate(img2txt):
        if not len(caps):
            raise ValueError(f"image {i} has no ground-truth caption")
        gt[i, list(caps)] = True
    best = s_i2t.masked_fill(~gt, float("-inf")).amax(dim=1, keepdim=True)  # (N_img, 1) best GT caption score
    tr_ranks = ((s_i2t >= best) & ~gt).sum(dim=1)  # (N_img,)
    target = torch.as_tensor(list(txt2img), dtype=torch.long)
    own = s_t2i.gather(1, target[:, None])  # (N_txt, 1)
    ir_ranks = (s_t2i >= own).sum(dim=1) - 1  # (N_txt,) minus the ground-truth image itself
    return tr_ranks, ir_ranks


def recall_at_k(scores_i2t, scores_t2i, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text and image retrieval recall@K in percent.

    Returns ``tr_r{K}`` and ``ir_r{K}`` for each K, ``tr_mean`` / ``ir_mean`` (mean over the Ks), ``r_mean``
    (their mean, the official model-selection metric) and ``mean_r1 = (tr_r1 + ir_r1) / 2``.
    """
    tr_ranks, ir_ranks = retrieval_ranks(scores_i2t, scores_t2i, img2txt, txt2img)
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (tr_ranks < k).double().mean().item()
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * (ir_ranks < k).double().mean().item()
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    if 1 in ks:
        out["mean_r1"] = (out["tr_r1"] + out["ir_r1"]) / 2
    return out
