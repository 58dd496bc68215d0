"""BLIP model code: pure PyTorch modules, no I/O and no distributed code."""

from blip_core.models.blip import BlipModel, count_parameters
from blip_core.models.momentum import FeatureQueue, MomentumEncoders
from blip_core.models.text import CrossKV, TextTransformer
from blip_core.models.vision import ImageEncoder, interpolate_pos_embed
from blip_core.models.vqa import BlipVQA, is_vqa

__all__ = [
    "BlipModel", "BlipVQA", "CrossKV", "FeatureQueue", "ImageEncoder", "MomentumEncoders", "TextTransformer",
    "count_parameters", "interpolate_pos_embed", "is_vqa",
]
