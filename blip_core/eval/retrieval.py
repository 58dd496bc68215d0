"""Retrieval recall@K from score matrices: the text-to-image and image-to-text ranks of the true matches.

The scores come from :func:`blip_core.retrieval.retrieval_scores` (or any ``(N_img, N_txt)`` and
``(N_txt, N_img)`` matrices); nothing here needs a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_RANK_ROWS = 1024  # score rows per step of the rank computation


def _as_scores(scores) -> torch.Tensor:
    """A score matrix as a tensor (nested lists as float64, so no two distinct values become equal)."""
    return scores if isinstance(scores, torch.Tensor) else torch.as_tensor(scores, dtype=torch.float64)


def retrieval_ranks(scores_i2t, scores_t2i, img2txt: Sequence[Sequence[int]],
                    txt2img: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: per image, of its best-ranked caption; per text, of its image.

    A rank counts the *other* (non-ground-truth) entries scored at least as high, so ties are resolved
    against the ground truth: a constant score matrix gets no hits, and ``-100`` entries outside the top-k
    never count as retrieved ahead of the rest.
    """
    s_i2t, s_t2i = _as_scores(scores_i2t), _as_scores(scores_t2i)
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be (N_txt, N_img) = {(n_txt, n_img)}, got {tuple(s_t2i.shape)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError("img2txt needs one entry per image and txt2img one per text")
    for i, caps in enumerate(img2txt):
        if not len(caps):
            raise ValueError(f"image {i} has no ground-truth caption")
    tr_ranks = torch.empty(n_img, dtype=torch.long)
    for a in range(0, n_img, _RANK_ROWS):  # row blocks: bounded memory at 5k x 25k
        rows = s_i2t[a:a + _RANK_ROWS].to("cpu", torch.float64)
        gt = torch.zeros(rows.shape, dtype=torch.bool)
        for i, caps in enumerate(img2txt[a:a + _RANK_ROWS]):
            gt[i, list(caps)] = True
        best = rows.masked_fill(~gt, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1) best GT caption score
        tr_ranks[a:a + rows.shape[0]] = ((rows >= best) & ~gt).sum(dim=1)
    target = torch.as_tensor(list(txt2img), dtype=torch.long)
    ir_ranks = torch.empty(n_txt, dtype=torch.long)
    for a in range(0, n_txt, _RANK_ROWS):
        rows = s_t2i[a:a + _RANK_ROWS].to("cpu", torch.float64)
        own = rows.gather(1, target[a:a + rows.shape[0], None])  # (b, 1)
        ir_ranks[a:a + rows.shape[0]] = (rows >= own).sum(dim=1) - 1  # minus the ground-truth image itself
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
