"""Builders for the Hugging Face parity tests: a small corpus tokenizer and small non-default BLIP configs."""

from __future__ import annotations

import functools

import torch
from transformers import BlipConfig

CORPUS = [
    "a picture of a dog running on the grass",
    "a red circle to the left of a blue square",
    "two cats sleeping on a couch next to a window",
    "a man riding a bike down the street",
    "a plate of food with a fork and a knife",
] * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_dir():
    """A BERT vocabulary written in a fixed order (WordPiece training may order tied tokens differently)."""
    import tempfile
    from pathlib import Path

    words = sorted({w for line in CORPUS for w in line.split()})
    filler = [f"tok{i}" for i in range(60)]  # more candidates for the decoder to choose from
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *filler, "##s", "##ing"]
    d = Path(tempfile.mkdtemp(prefix="blip_hf_tok_"))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(d)


def make_tokenizer():
    """A WordPiece tokenizer trained on ``CORPUS`` with [DEC]/[ENC] appended (a fresh object per call)."""
    from blip_core.tokenizer import BlipTokenizer

    return BlipTokenizer.from_dir(_tokenizer_dir())


def small_hf_config(tok, *, image_size: int = 32, label_smoothing: float = 0.1, text_heads: int = 4,
                    vision_eps: float = 1e-6) -> BlipConfig:
    """A small BLIP config whose heads, eps and smoothing differ from ``BlipConfig``'s defaults."""
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=text_heads, max_position_embeddings=64, layer_norm_eps=1e-12,
                bos_token_id=tok.dec_id, sep_token_id=tok.sep_id, pad_token_id=tok.pad_id,
                label_smoothing=label_smoothing)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, layer_norm_eps=vision_eps)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16,
                      label_smoothing=label_smoothing)


def tiny_preset_hf_config(vocab_size: int, tok) -> BlipConfig:
    """The HF config equal to blip_core's ``tiny`` preset (for official-layout round trips)."""
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, layer_norm_eps=1e-12,
                bos_token_id=tok.dec_id, sep_token_id=tok.sep_id, pad_token_id=tok.pad_id)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, layer_norm_eps=1e-6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


@torch.no_grad()
def randomize(model, text_std: float = 0.1, vision_std: float = 0.2, seed: int = 0) -> None:
    """Give every weight (LayerNorms excepted) a visible random value, so outputs are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "LayerNorm" in name or "layer_norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
            continue
        std = vision_std if name.startswith("vision_model") else text_std
        p.copy_(std * torch.randn(p.shape, generator=g))


def build_hf(cls, tok, seed: int = 0, **cfg_kw):
    """A randomly initialised HF BLIP model of class ``cls`` from :func:`small_hf_config`."""
    torch.manual_seed(seed)
    model = cls(small_hf_config(tok, **cfg_kw)).eval()
    randomize(model, seed=seed)
    return model


def hf_to_official(key: str) -> str:
    """HF -> official key (the inverse of blip-reference 6.2), written independently of blip_core.convert."""
    if not key.startswith("vision_model."):
        return key
    key = key.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
    key = key.replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
    key = key.replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
    key = key.replace("vision_model.post_layernorm", "visual_encoder.norm")
    key = key.replace("vision_model.encoder.layers", "visual_encoder.blocks")
    key = key.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
    return key.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
