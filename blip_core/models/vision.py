"""ViT image encoder: timm's ``VisionTransformer`` with BLIP's settings.

LayerNorm eps 1e-6, qkv bias, no pooling and no head: the encoder returns every token ``(B, 1+N, D)``,
token 0 being the global ([CLS]) image feature. Gradient checkpointing applies to the last ``k`` blocks, as
the official ``vit_grad_ckpt`` / ``vit_ckpt_layer`` flags. Position embeddings are interpolated bicubically
(CLS position untouched) when a checkpoint of another resolution is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_core.config import ConfigError, VisionConfig


class ImageEncoder(nn.Module):
    """A timm ViT returning all tokens; parameter names follow timm (and thus the official BLIP layout)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="",
            drop_path_rate=cfg.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps),
        )
        # Keep only what BLIP uses, under timm's names.
        self.patch_embed = vit.patch_embed if cfg.stem == "patch" else ConvStem(cfg.patch_size, cfg.width)
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grad_ckpt_layers = cfg.grad_ckpt_layers

    @property
    def width(self) -> int:
        return self.cfg.width

    def set_grad_checkpointing(self, last_k: int) -> None:
        """Recompute activations of the last ``last_k`` blocks in backward (0 turns it off)."""
        self.grad_ckpt_layers = max(0, min(last_k, len(self.blocks)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 3, H, W) -> tokens (B, 1 + N, D), after the final LayerNorm."""
        x = self.patch_embed(image)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)
        x = self.pos_drop(x)
        first_ckpt = len(self.blocks) - self.grad_ckpt_layers
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt_layers and i >= first_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def conv_stem_channels(patch_size: int, width: int, channels: Sequence[int] | None = None) -> list[int]:
    """The stage channels of a :class:`ConvStem`: ``channels`` checked (one positive count per 2x2 pooling
    stage), or by default ``width / patch_size``, ``2 * width / patch_size``, ... (at least 16)."""
    stages = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << stages != patch_size:
        raise ConfigError(f"model.vision.stem: conv needs a power-of-two patch_size >= 2, got {patch_size}")
    if channels is None:
        return [max(width >> (stages - i), 16) for i in range(stages)]
    if len(channels) != stages or min(channels) < 1:
        raise ConfigError(f"a conv stem for patch_size {patch_size} needs {stages} positive channel counts, "
                          f"got {list(channels)}")
    return list(channels)


class ConvStem(nn.Module):
    """A convolutional patch embedding with the linear patchify's token grid.

    ``log2(patch_size)`` stages of [3x3 conv (stride 1), batch norm, ReLU, 2x2 max pool], with
    ``width / patch_size``, ``2 * width / patch_size``, ... channels (at least 16; ``channels`` sets them
    instead), then a 3x3 conv, batch norm and ReLU to ``width``: one token per ``patch_size`` x ``patch_size``
    cell, as the patchify gives. Early convolutions give the ViT the local inductive bias it lacks (Xiao et
    al., 2021, "Early convolutions help transformers see better"): trained from scratch, supervised, on a few
    thousand toy-web images, the demo's ViT with a linear patchify learns colours but not shapes; with this
    stem it learns both (``benchmarks/vision_probe.py``).
    """

    def __init__(self, patch_size: int, width: int, channels: Sequence[int] | None = None):
        super().__init__()
        layers, ch = [], 3
        for out in conv_stem_channels(patch_size, width, channels):
            layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            ch = out
        layers += [nn.Conv2d(ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.proj = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 3, H, W) -> patch tokens (B, (H/p) * (W/p), D), row-major as the patchify."""
        # channels-last runs these small convolutions and poolings about 1.4x faster on CPU (and suits GPUs)
        x = self.proj(image.contiguous(memory_format=torch.channels_last))  # (B, D, H/p, W/p)
        return x.permute(0, 2, 3, 1).flatten(1, 2)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position embedding ``(1, 1+N_old, D)`` to ``(1, 1+num_patches, D)``.

    The CLS position is kept as is; patch positions are reshaped to their square grid (row-major) and resized
    with bicubic interpolation (``align_corners=False``), as the official ``interpolate_pos_embed`` of BLIP's
    checkpoint loader and HF's runtime path do. float32/float64 are computed in their own precision (as the
    official function); half-precision inputs are computed in float32 and cast back.
    """
    n_old = pos_embed.shape[1] - 1
    if n_old == num_patches:
        return pos_embed
    g_old, g_new = math.isqrt(n_old), math.isqrt(num_patches)
    if g_old * g_old != n_old or g_new * g_new != num_patches:
        raise ValueError(f"position embeddings must cover square grids, got {n_old} -> {num_patches} patches")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, g_old, g_old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
    grid = F.interpolate(work, size=(g_new, g_new), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, dim).to(pos_embed.dtype)  # (1, N', D)
    return torch.cat([cls_pos, patch_pos], dim=1)
