"""Image-text retrieval as BLIP evaluates it: ITC top-k candidates re-ranked by ITM.

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

At COCO size (5,000 images x 25,000 captions, ``k = 256``) :func:`retrieval_scores` works in blocks of rows:
the cosines of one block are computed, their top ``k`` kept and the block re-ranked by ITM, so neither the
cosine matrix nor any ITM input for all pairs is held at once. The rows of each direction can be split among
ranks (each re-ranks its share, a reduce function sums them, as the official code does) and finished blocks
can be saved to a directory so an interrupted evaluation resumes where it stopped.

Metrics (:func:`blip_core.eval.retrieval.recall_at_k`): TR@K counts an image as retrieved when the best-ranked
of its ground-truth captions is in the top K; IR@K uses the rank of each text's image. Values are percentages,
as in the paper.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from blip_core.models.blip import BlipModel
from blip_core.objectives import with_first_token

log = logging.getLogger(__name__)

OUTSIDE_TOP_K = -100.0  # score of every pair that is not among a row's k ITC candidates
# Row blocks and rank shares start at multiples of this (and of the ITM step): CPU GEMM kernels treat the
# rows of a matrix in small groups, and a block that starts mid-group can round the cosines differently.
_ROW_ALIGN = 16


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
    sim: torch.Tensor | None  # (N_img, N_txt) ITC cosine (from retrieval_scores only with with_sim=True)


def _device(model: BlipModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def itc_features(model: BlipModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 batch_size: int = 64, embeds_device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_embeds, image_feats, text_feats)`` encoded ``batch_size`` at a time.

    ``image_embeds`` (the ViT tokens the ITM re-rank reads) are kept on ``embeds_device`` (default: the
    model's device); ``"cpu"`` keeps accelerator memory bounded when there are many images.
    """
    dev = _device(model)
    keep = torch.device(embeds_device) if embeds_device is not None else dev
    embeds, img_feats, txt_feats = [], [], []
    for s in range(0, images.shape[0], batch_size):
        emb = model.encode_image(images[s:s + batch_size].to(dev, non_blocking=True))  # (b, 1+N, D)
        img_feats.append(model.image_features(emb))
        embeds.append(emb.to(keep))
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size].to(dev, non_blocking=True)
        mask = attention_mask[s:s + batch_size].to(dev, non_blocking=True)
        txt_feats.append(model.text_features(model.encode_text(ids, mask)))
    return torch.cat(embeds), torch.cat(img_feats), torch.cat(txt_feats)


@torch.no_grad()
def itc_similarity(model: BlipModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 64) -> ItcOutput:
    """ITC cosine matrix of ``images`` ``(N_img, 3, H, W)`` against texts ``(N_txt, L)`` (``[CLS]`` first).

    Images and texts are encoded ``batch_size`` at a time on the model's device. Returns an :class:`ItcOutput`
    (a tuple ``(sim, image_embeds, image_feats, text_feats)``).
    """
    embeds, image_feats, text_feats = itc_features(model, images, input_ids, attention_mask, batch_size)
    return ItcOutput(image_feats @ text_feats.T, embeds, image_feats, text_feats)


def _pairs_per_step(batch_size: int, k: int) -> int:
    """Rows (images or texts) per ITM forward so that one forward holds about ``batch_size`` pairs."""
    return max(1, batch_size // max(k, 1))


def _itm_i2t(model: BlipModel, image_embeds: torch.Tensor, first: int, top_idx: torch.Tensor,
             enc_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM match logits ``(b, k)`` of images ``first .. first+b`` against their candidate texts ``top_idx``."""
    dev = _device(model)
    b, k = top_idx.shape
    flat = top_idx.reshape(-1).cpu()  # (b*k,) the k candidates of each image, consecutive
    cross = model.cross_kv(image_embeds[first:first + b].to(dev))  # K/V once per image, read by its k texts
    logits = model.itm_logits(enc_ids[flat].to(dev, non_blocking=True),
                              attention_mask[flat].to(dev, non_blocking=True), cross)  # (b*k, 2)
    return logits[:, 1].view(b, k)


def _itm_t2i(model: BlipModel, image_embeds: torch.Tensor, first: int, top_idx: torch.Tensor,
             enc_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM match logits ``(b, k)`` of texts ``first .. first+b`` against their candidate images ``top_idx``."""
    dev = _device(model)
    b, k = top_idx.shape
    uniq, inverse = torch.unique(top_idx.reshape(-1), return_inverse=True)  # (u,), (b*k,)
    cross = model.cross_kv(image_embeds[uniq.to(image_embeds.device)].to(dev)).select(inverse.to(dev))
    rows = torch.arange(first, first + b).repeat_interleave(k)  # (b*k,) text of each pair
    logits = model.itm_logits(enc_ids[rows].to(dev, non_blocking=True),
                              attention_mask[rows].to(dev, non_blocking=True), cross)  # (b*k, 2)
    return logits[:, 1].view(b, k)


@torch.no_grad()
def rerank_i2t(model: BlipModel, image_embeds: torch.Tensor, sim: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, *, enc_id: int, k: int, batch_size: int = 64) -> torch.Tensor:
    """Image-to-text scores ``(N_img, N_txt)``: ITM match logit + cosine on each image's top-k, -100 elsewhere.

    ``batch_size`` is the number of image-text pairs per ITM forward (at least one image's ``k`` candidates).
    This is the unblocked form (the whole ``sim`` in memory); :func:`retrieval_scores` computes the same
    scores block by block.
    """
    return _rerank_rows(model, image_embeds, sim, with_first_token(input_ids, enc_id), attention_mask, k=k,
                        batch_size=batch_size, itm=_itm_i2t)


@torch.no_grad()
def rerank_t2i(model: BlipModel, image_embeds: torch.Tensor, sim: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, *, enc_id: int, k: int, batch_size: int = 64) -> torch.Tensor:
    """Text-to-image scores ``(N_txt, N_img)``: ITM match logit + cosine on each text's top-k, -100 elsewhere.

    The K/V of the distinct candidate images of a chunk of texts are computed once and selected by index.
    """
    return _rerank_rows(model, image_embeds, sim.T, with_first_token(input_ids, enc_id), attention_mask, k=k,
                        batch_size=batch_size, itm=_itm_t2i)


def _rerank_rows(model: BlipModel, image_embeds: torch.Tensor, sim_rows: torch.Tensor, enc_ids: torch.Tensor,
                 attention_mask: torch.Tensor, *, k: int, batch_size: int, itm) -> torch.Tensor:
    """Scores ``(rows, cols)`` of one direction: each row's ITC top-k (of ``sim_rows``) re-ranked with
    ``itm(model, image_embeds, first_row, top_idx, enc_ids, attention_mask)``, -100 elsewhere."""
    n_rows, n_cols = sim_rows.shape
    k = min(k, n_cols)
    scores = torch.full((n_rows, n_cols), OUTSIDE_TOP_K, device=sim_rows.device, dtype=sim_rows.dtype)
    step = _pairs_per_step(batch_size, k)
    for s in range(0, n_rows, step):
        top_sim, top_idx = sim_rows[s:s + step].topk(k, dim=1)  # (b, k)
        logits = itm(model, image_embeds, s, top_idx, enc_ids, attention_mask)
        scores[s:s + top_idx.shape[0]].scatter_(1, top_idx, logits.to(sim_rows.dtype) + top_sim)
    return scores


# --------------------------------------------------------------------------------------------------
# Blocked, rank-split and resumable re-ranking (COCO size: 5,000 images x 25,000 captions, k = 256)
# --------------------------------------------------------------------------------------------------


def rank_rows(n: int, rank: int, world_size: int, unit: int = 1) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``rank``: ``n`` rows split evenly among ranks in whole ``unit``-row steps."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    units = -(-n // unit)
    per_rank = -(-units // world_size)
    start = min(n, rank * per_rank * unit)
    return start, min(n, start + per_rank * unit)


class _Direction(NamedTuple):
    name: str  # "i2t" or "t2i"
    row_feats: torch.Tensor  # (N_rows, E)
    col_feats: torch.Tensor  # (N_cols, E)
    itm: Callable[..., torch.Tensor]


def _fingerprint(model: BlipModel, image_feats: torch.Tensor, text_feats: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, enc_id: int, k: int) -> str:
    """A digest of everything a saved block depends on: weights, features, texts, ``enc_id`` and ``k``."""
    h = hashlib.sha256(f"{enc_id}:{k}:{tuple(image_feats.shape)}:{tuple(text_feats.shape)}".encode())
    for t in (*model.state_dict().values(), image_feats, text_feats, input_ids, attention_mask):
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _load_block(path: Path, rows: int, k: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        idx, val = blob["idx"], blob["val"]
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged partial result is recomputed, never trusted
        log.warning("retrieval: ignoring unreadable partial block %s (%s)", path.name, e)
        return None
    ok = (isinstance(idx, torch.Tensor) and isinstance(val, torch.Tensor) and idx.shape == val.shape == (rows, k)
          and not idx.is_floating_point() and val.is_floating_point()
          and bool(((idx >= 0) & (idx < n_cols)).all()))
    if not ok:
        log.warning("retrieval: ignoring partial block %s of the wrong shape or content", path.name)
        return None
    return idx.long(), val


def _save_block(path: Path, idx: torch.Tensor, val: torch.Tensor) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"idx": idx.cpu(), "val": val.cpu()}, tmp)
    os.replace(tmp, path)  # atomic: a block is there whole or not at all


def _densify(idx: torch.Tensor, val: torch.Tensor, n_cols: int, rows: tuple[int, int] | None) -> torch.Tensor:
    """``(N_rows, n_cols)`` scores: ``val`` at ``idx`` and ``-100`` elsewhere on ``rows`` (all if None), 0 off them."""
    if rows is None:
        rows = (0, idx.shape[0])
    out = torch.zeros(idx.shape[0], n_cols, dtype=val.dtype)
    lo, hi = rows
    out[lo:hi] = OUTSIDE_TOP_K
    out[lo:hi].scatter_(1, idx[lo:hi], val[lo:hi])
    return out


@torch.no_grad()
def retrieval_scores(model: BlipModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     *, enc_id: int, k: int = 256, batch_size: int = 64, itm_batch_size: int | None = None,
                     block_rows: int = 1024, rank: int = 0, world_size: int = 1,
                     reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     partial_dir: str | Path | None = None, progress: bool = False,
                     embeds_device: torch.device | str | None = None, with_sim: bool = False) -> RetrievalScores:
    """Both directions' fused scores for a test split: ITC, then ITM re-rank of the top ``k``, in blocks.

    ``batch_size`` images or texts per encoder forward; ``itm_batch_size`` (default ``batch_size``) image-text
    pairs per ITM forward. Memory stays bounded at any split size: the ITC cosines are computed
    ``block_rows`` rows at a time and only each row's top ``k`` (indices and fused scores) is kept; only the
    two dense score matrices of the result are ``N_img x N_txt`` (on the CPU). ``with_sim`` also returns the
    dense ITC cosine matrix (else ``sim`` is None).

    Multi-process (as the official evaluation): every rank computes all features, then re-ranks only its
    share of the rows (:func:`rank_rows`); ``reduce_fn`` (e.g. an all-reduce sum over ranks, called on the
    ``(N, k)`` index and score tensors of each direction) combines them. Without ``reduce_fn`` a rank returns
    its partial result, zero outside its rows, so the ranks' results sum to the full one. Rows are assigned in
    whole ITM steps (and 16-row multiples), so the result is the same at any ``world_size`` and ``block_rows``
    (bit for bit on the CPU).

    ``partial_dir``: each finished block of rows is saved there atomically, under a digest of the model,
    features and texts, and a re-run with the same inputs loads it instead of recomputing it. ``progress``
    shows a progress bar (tqdm, when installed) over the rows this rank re-ranks.
    """
    emb, image_feats, text_feats = itc_features(model, images, input_ids, attention_mask, batch_size,
                                                embeds_device)
    enc_ids = with_first_token(input_ids, enc_id)
    pairs = itm_batch_size or batch_size
    directions = (_Direction("i2t", image_feats, text_feats, _itm_i2t),
                  _Direction("t2i", text_feats, image_feats, _itm_t2i))
    plans = []
    for d in directions:
        kk = min(k, d.col_feats.shape[0])
        step = _pairs_per_step(pairs, kk)
        unit = math.lcm(step, _ROW_ALIGN)  # blocks and rank shares start on the same ITM steps and GEMM rows
        plans.append((d, kk, step, unit, rank_rows(d.row_feats.shape[0], rank, world_size, unit)))
    folder = None
    if partial_dir is not None:
        folder = Path(partial_dir) / _fingerprint(model, image_feats, text_feats, input_ids, attention_mask,
                                                  enc_id, k)
        folder.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(sum(hi - lo for *_, (lo, hi) in plans), progress)
    results = {}
    try:
        for d, kk, step, unit, (lo, hi) in plans:
            n_rows, n_cols = d.row_feats.shape[0], d.col_feats.shape[0]
            block = max(unit, block_rows // unit * unit)
            idx = torch.zeros(n_rows, kk, dtype=torch.long)
            val = torch.zeros(n_rows, kk, dtype=image_feats.dtype)
            for b0 in range(lo, hi, block):
                b1 = min(hi, b0 + block)
                path = folder / f"{d.name}_{b0:08d}_{b1:08d}.pt" if folder is not None else None
                saved = _load_block(path, b1 - b0, kk, n_cols) if path is not None else None
                if saved is None:
                    saved = _rerank_block(model, d, b0, b1, kk, step, emb, enc_ids, attention_mask)
                    if path is not None:
                        _save_block(path, *saved)
                idx[b0:b1], val[b0:b1] = saved
                if bar is not None:
                    bar.update(b1 - b0)
            if reduce_fn is not None:
                idx, val = reduce_fn(idx), reduce_fn(val)
            results[d.name] = _densify(idx, val, n_cols, None if reduce_fn is not None else (lo, hi))
    finally:
        if bar is not None:
            bar.close()
    sim = (image_feats @ text_feats.T).cpu() if with_sim else None
    return RetrievalScores(results["i2t"], results["t2i"], sim)


def _rerank_block(model: BlipModel, d: _Direction, b0: int, b1: int, k: int, step: int, image_embeds: torch.Tensor,
                  enc_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` column indices ``(b, k)`` and fused scores (ITM logit + cosine) of rows ``b0 .. b1``."""
    sim = d.row_feats[b0:b1] @ d.col_feats.T  # (b, N_cols): one block of the cosine matrix
    top_sim, top_idx = sim.topk(k, dim=1)
    del sim
    fused = torch.empty_like(top_sim)
    for s in range(0, b1 - b0, step):
        logits = d.itm(model, image_embeds, b0 + s, top_idx[s:s + step], enc_ids, attention_mask)
        fused[s:s + step] = logits.to(top_sim.dtype) + top_sim[s:s + step]
    return top_idx.cpu(), fused.cpu()


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="retrieval re-rank", unit=" rows", dynamic_ncols=True, mininterval=1.0)
