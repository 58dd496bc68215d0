"""Momentum (EMA) encoders and the ITC feature queues.

The momentum copies of the image encoder, text encoder and both projections produce the targets of ITC with
momentum distillation. They receive no gradient; :func:`ema_update` is called by the training step after each
optimizer step (equivalent to the official update at the start of the next forward, since the copies start
equal to the student). Queues hold the most recent momentum features of all ranks.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.models.blip import BlipModel


class MomentumEncoders(nn.Module):
    """EMA copies: ``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m``, ``text_proj_m``."""

    def __init__(self, model: BlipModel):
        super().__init__()
        self.visual_encoder_m = copy.deepcopy(model.visual_encoder)
        self.vision_proj_m = copy.deepcopy(model.vision_proj)
        self.text_encoder_m = copy.deepcopy(model.text_encoder)
        self.text_proj_m = copy.deepcopy(model.text_proj)
        self.visual_encoder_m.set_grad_checkpointing(0)  # momentum encoders never checkpoint
        for p in self.parameters():
            p.requires_grad_(False)

    def pairs(self, model: BlipModel) -> list[tuple[nn.Module, nn.Module]]:
        """(student, momentum) module pairs in a fixed order."""
        return [
            (model.visual_encoder, self.visual_encoder_m),
            (model.vision_proj, self.vision_proj_m),
            (model.text_encoder, self.text_encoder_m),
            (model.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        embeds = self.visual_encoder_m(image)  # (B, 1+N, D)
        return F.normalize(self.vision_proj_m(embeds[:, 0]), dim=-1)

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder_m(input_ids, attention_mask)[0]
        return F.normalize(self.text_proj_m(hidden[:, 0]), dim=-1)

    @torch.no_grad()
    def update(self, model: BlipModel, momentum: float) -> None:
        """theta_m <- momentum * theta_m + (1 - momentum) * theta, for every paired parameter."""
        student, teacher = [], []
        for s_mod, t_mod in self.pairs(model):
            for (ns, ps), (nt, pt) in zip(s_mod.named_parameters(), t_mod.named_parameters(), strict=True):
                assert ns == nt, (ns, nt)
                student.append(ps.detach())
                teacher.append(pt)
        ema_update(teacher, student, momentum)


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """In place: ``t <- momentum * t + (1 - momentum) * s`` for each pair."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


class FeatureQueue(nn.Module):
    """Circular queues of normalised image and text features ``(E, Q)`` (and image ids, for retrieval).

    Any queue size works with any batch size: a batch that crosses the end wraps around, a short final batch
    is written as it is, and a batch larger than the queue keeps its last ``Q`` entries.
    """

    def __init__(self, embed_dim: int, size: int, with_ids: bool = False):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.with_ids = with_ids
        if with_ids:
            self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Write ``(n, E)`` features (already gathered from all ranks) at the pointer, wrapping around."""
        n = image_feat.shape[0]
        if text_feat.shape[0] != n:
            raise ValueError("image and text feature batches differ in size")
        ptr = int(self.queue_ptr)
        keep = min(n, self.size)
        start = (ptr + n - keep) % self.size
        cols = (start + torch.arange(keep, device=self.image_queue.device)) % self.size
        self.image_queue[:, cols] = image_feat[n - keep:].T.to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feat[n - keep:].T.to(self.text_queue.dtype)
        if self.with_ids:
            if idx is None:
                raise ValueError("this queue stores image ids: pass idx")
            self.idx_queue[0, cols] = idx.view(-1)[n - keep:]
        self.queue_ptr[0] = (ptr + n) % self.size
