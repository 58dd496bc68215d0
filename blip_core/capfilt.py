"""CapFilt as pure batch functions: the captioner writes synthetic captions, the filter scores every caption.

* :func:`caption_batch`: ``k`` synthetic captions per image from the captioner (nucleus sampling with top-p
  0.9 by default, or beam search for the ablation).
* :func:`filter_batch`: the ITM match probability of each image's candidate captions (web and synthetic),
  with each image's cross-attention keys/values computed once and shared by all its candidates.
* :func:`decide`: keep a caption when its match probability reaches the threshold (0.5: the ITM argmax).

No I/O here: :mod:`components.capfilt` reads shards, calls these, and writes outputs and provenance.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} lists of texts")
    flat = [t for group in texts for t in group]
    if not flat:
        return [[] for _ in texts]
    rows = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=images.device)
    ids, mask = tokenizer(flat, max_length=max_length)
    ids, mask = ids.to(images.device), mask.to(images.device)
    ids[:, 0] = tokenizer.enc_id
    cross = model.cross_kv(model.encode_image(images)).select(rows)  # each text reads its image's K/V
    probs = model.itm_logits(ids, mask, cross).softmax(dim=-1)[:, 1].tolist()
    out, pos = [], 0
    for group in texts:
        out.append(probs[pos:pos + len(group)])
        pos += len(group)
    return out


def decide(score: float, threshold: float) -> bool:
    """Keep a caption whose ITM match probability is at least ``threshold``."""
    return score >= threshold
