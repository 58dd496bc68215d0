"""BLIP: ViT image encoder + MED text transformer (encoder and decoder) + projections and ITM head.

The text encoder and the text decoder share every parameter except self-attention, as the paper's
chosen configuration (Table 3, 252M parameters for ViT-B/16): the embeddings, all cross-attention blocks and
all feed-forward blocks are the *same modules* in both, so they share storage and gradients. The LM head's
output matrix is tied to the word embeddings, so a single ``vocab x hidden`` matrix serves encoder input,
decoder input and LM output.

The model has no I/O, no tokenisation and no distributed code. Token 0 of ``input_ids`` is set by the caller:
``[CLS]`` for the unimodal encoder (ITC), ``[ENC]`` for the image-grounded encoder (ITM), ``[DEC]`` for the
decoder (LM, captioning).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.config import ModelConfig
from blip_core.models.text import CrossKV, KVCache, LMHead, TextTransformer, init_bert_weights
from blip_core.models.vision import ImageEncoder

TEMP_MIN, TEMP_MAX = 0.001, 0.5


class _Predictions(nn.Module):
    def __init__(self, head: LMHead):
        super().__init__()
        self.predictions = head


class TextDecoder(nn.Module):
    """Image-grounded text decoder: the MED stack (``bert``) with a tied LM head (``cls.predictions``).

    ``encoder_width`` is the width of what its cross-attention reads: the image tokens (default, the ViT width)
    or, in the VQA answer decoder, the question states (the text hidden size).
    """

    def __init__(self, cfg: ModelConfig, encoder_width: int | None = None):
        super().__init__()
        self.bert = TextTransformer(cfg.text, cfg.vision.width if encoder_width is None else encoder_width)
        self.cls = _Predictions(LMHead(cfg.text, self.bert.embeddings.word_embeddings))

    def forward(self, input_ids, attention_mask, cross: CrossKV | None, past: KVCache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        hidden, cache = self.bert(input_ids, attention_mask, cross, is_causal=True, past=past, use_cache=use_cache)
        return self.cls.predictions(hidden), cache


def require_vocab(cfg: ModelConfig) -> ModelConfig:
    """``cfg``, checked to have its vocabulary size set (it comes from the tokenizer)."""
    if cfg.text.vocab_size <= 0:
        raise ValueError("model.text.vocab_size must be set (e.g. to len(tokenizer)) before building a model")
    return cfg


def init_text_weights(cfg: ModelConfig, *modules: nn.Module) -> None:
    """BERT initialisation (std ``model.text.init_std``) of text modules."""
    for module in modules:
        module.apply(partial(init_bert_weights, std=cfg.text.init_std))


def tie_encoder_to_decoder(encoder: TextTransformer, decoder: TextTransformer) -> None:
    """Make the encoder use the decoder's modules for everything except self-attention."""
    encoder.embeddings = decoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        enc_layer.crossattention = dec_layer.crossattention
        enc_layer.intermediate = dec_layer.intermediate
        enc_layer.output = dec_layer.output


class BlipModel(nn.Module):
    """The BLIP model (no momentum copies or queues: those belong to the training objectives).

    Attribute names follow the official checkpoint layout: ``visual_encoder``, ``text_encoder``,
    ``text_decoder.{bert,cls}``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = require_vocab(cfg)
        self.visual_encoder = ImageEncoder(cfg.vision)
        self.text_decoder = TextDecoder(cfg)
        self.text_encoder = TextTransformer(cfg.text, cfg.vision.width)
        init_text_weights(cfg, self.text_encoder, self.text_decoder)
        tie_encoder_to_decoder(self.text_encoder, self.text_decoder.bert)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

    # ------------------------------------------------------------------ encoders
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> image tokens ``(B, 1+N, D_img)``."""
        return self.visual_encoder(image)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image feature ``(B, E)`` from the [CLS] image token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder (no cross-attention); ``input_ids[:, 0]`` should be [CLS]."""
        return self.text_encoder(input_ids, attention_mask)[0]

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text feature ``(B, E)`` from the [CLS] text token."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def cross_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Cross-attention keys/values of every layer, computed once per image.

        The encoder and decoder share their cross-attention modules, so one ``CrossKV`` serves ITM and LM.
        """
        return self.text_decoder.bert.cross_kv(image_embeds)

    def encode_multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          cross: CrossKV) -> torch.Tensor:
        """Image-grounded text encoder; ``input_ids[:, 0]`` should be [ENC]. Returns ``(B, L, H)``."""
        return self.text_encoder(input_ids, attention_mask, cross)[0]

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cross: CrossKV) -> torch.Tensor:
        """ITM logits ``(B, 2)`` (class 1 = match) from the image-grounded encoder's first token."""
        return self.itm_head(self.encode_multimodal(input_ids, attention_mask, cross)[:, 0])

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cross: CrossKV,
               past: KVCache | None = None, use_cache: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        """Image-grounded causal decoder; ``input_ids[:, 0]`` should be [DEC]. Returns logits ``(B, L, V)``."""
        return self.text_decoder(input_ids, attention_mask, cross, past=past, use_cache=use_cache)

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def clamp_temp(self) -> None:
        """Clamp the learnable ITC temperature to [0.001, 0.5] (called after each optimizer step)."""
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def set_grad_checkpointing(self, last_k: int) -> None:
        """Gradient checkpointing of the last ``last_k`` ViT blocks."""
        self.visual_encoder.set_grad_checkpointing(last_k)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (position/class embeddings, temp)."""
        return {"visual_encoder.pos_embed", "visual_encoder.cls_token", "temp"}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of unique parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
