"""blip_core: BLIP (ViT + MED) models, objectives and data, in pure PyTorch."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from blip_core.config import Config, ModelConfig, load_config, model_preset

if TYPE_CHECKING:
    from blip_core.models.blip import BlipModel

__all__ = ["BlipModel", "Config", "ModelConfig", "build_model", "load_config", "load_model_dir", "model_preset",
           "save_model_dir"]


def __getattr__(name: str) -> Any:
    # The model code (torch, timm) is imported on first use: the data and ingest side of the library starts
    # in a fraction of a second without it.
    if name == "BlipModel":
        from blip_core.models.blip import BlipModel

        return BlipModel
    raise AttributeError(f"module 'blip_core' has no attribute {name!r}")


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> BlipModel:
    """Build a randomly initialised :class:`BlipModel`; ``vocab_size`` fills ``text.vocab_size`` when it is 0."""
    from blip_core.models.blip import BlipModel

    if vocab_size is not None and cfg.text.vocab_size <= 0:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    return BlipModel(cfg)


def load_model_dir(dir, *, with_momentum: bool = True, image_size: int | None = None):
    """Load a blip_core checkpoint directory; see :func:`blip_core.checkpoint_io.load_model_dir`."""
    from blip_core.checkpoint_io import load_model_dir as _load

    return _load(dir, with_momentum=with_momentum, image_size=image_size)


def save_model_dir(dst, model, tokenizer=None, momentum_state=None):
    """Write a blip_core checkpoint directory; see :func:`blip_core.checkpoint_io.save_model_dir`."""
    from blip_core.checkpoint_io import save_model_dir as _save

    return _save(dst, model, tokenizer, momentum_state)
