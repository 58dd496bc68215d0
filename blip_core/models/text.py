"""MED text transformer: post-LN BERT layers with cross-attention to image tokens.

One class serves BLIP's three text roles through explicit arguments instead of mode strings:

* unimodal text encoder: ``is_causal=False``, no image (cross-attention skipped in every layer);
* image-grounded text encoder: ``is_causal=False`` with ``cross_kv`` (image keys/values);
* image-grounded text decoder: ``is_causal=True`` with ``cross_kv``, optional self-attention KV cache.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``. Cross-attention keys and
values are computed once per image (:meth:`TextTransformer.cross_kv`) and can be shared by many texts of
that image: several ITM pairs, the LM pass, or the beams of a beam search, without copying image embeddings.

Parameter names follow the official ``med.py`` (BERT) layout, so checkpoints map key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_core.config import TextConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (K, V), each (B, heads, L_past, head_dim)


@dataclass
class CrossKV:
    """Image keys/values for every layer's cross-attention, each ``(B_img, heads, N_img, head_dim)``.

    ``index`` (optional, ``(B_text,)`` long) maps each text row to its image row. Without an index, a text
    batch that is ``r`` times the image batch is read as ``r`` consecutive texts per image.

    ``mask`` (optional, ``(B_img, N_img)``, 1 = attend) hides padded source positions; image tokens need none,
    the question states the VQA answer decoder reads do.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> CrossKV:
        """The same keys/values addressed by ``index`` (composed with any existing index)."""
        if self.index is not None:
            index = self.index[index]
        return CrossKV(self.kv, index, self.mask)

    def narrow(self, start: int, length: int) -> CrossKV:
        """Source rows ``start .. start + length - 1`` (a view; only for a CrossKV without an index)."""
        if self.index is not None:
            raise ValueError("narrow needs a CrossKV without an index")
        kv = [(k.narrow(0, start, length), v.narrow(0, start, length)) for k, v in self.kv]
        return CrossKV(kv, None, None if self.mask is None else self.mask.narrow(0, start, length))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, h, N, d_h)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)  # (B, N, D)


class SelfAttentionCore(nn.Module):
    """Query/key/value projections (``attention.self``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class CrossAttentionCore(nn.Module):
    """Query from text, key/value from image tokens of width ``encoder_width`` (``crossattention.self``)."""

    def __init__(self, hidden: int, encoder_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(encoder_width, hidden)
        self.value = nn.Linear(encoder_width, hidden)


class AddNorm(nn.Module):
    """Output projection + dropout + residual + LayerNorm (BERT's post-LN ``*.output``)."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, core: nn.Module, cfg: TextConfig):
        super().__init__()
        self.self = core
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.ln_eps, cfg.dropout)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Self-attention -> cross-attention (only with image K/V) -> feed-forward, each post-LN."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.heads = cfg.num_heads
        self.attn_dropout = cfg.attention_rate
        self.attention = Attention(SelfAttentionCore(cfg.hidden_size), cfg)
        self.crossattention = Attention(CrossAttentionCore(cfg.hidden_size, encoder_width), cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.ln_eps, cfg.dropout)

    def image_kv(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.crossattention.self
        return _split_heads(core.key(image_embeds), self.heads), _split_heads(core.value(image_embeds), self.heads)

    def _self_attention(self, x, mask, past, is_causal=False):
        core = self.attention.self
        q = _split_heads(core.query(x), self.heads)  # (B, h, L, d_h)
        k = _split_heads(core.key(x), self.heads)
        v = _split_heads(core.value(x), self.heads)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, h, L_past + L, d_h)
            v = torch.cat([past[1], v], dim=2)
        p = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        return self.attention.output(_merge_heads(ctx), x), (k, v)

    def _cross_attention(self, x, k, v, index, key_mask=None):
        q = _split_heads(self.crossattention.self.query(x), self.heads)  # (B_t, h, L, d_h)
        p = self.attn_dropout if self.training else 0.0
        b_t, b_i = q.shape[0], k.shape[0]
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B_i, 1, 1, N)
        if index is not None:
            k, v = k.index_select(0, index), v.index_select(0, index)
            mask = None if mask is None else mask.index_select(0, index)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif b_t == b_i:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            # r texts per image: fold them into the query length so each image's K/V is read once.
            if b_t % b_i:
                raise ValueError(f"text batch {b_t} is not a multiple of image batch {b_i}; pass an index")
            r, (h, L, dh) = b_t // b_i, q.shape[1:]
            qf = q.view(b_i, r, h, L, dh).transpose(1, 2).reshape(b_i, h, r * L, dh)  # (B_i, h, r*L, d_h)
            ctx = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, dropout_p=p)
            ctx = ctx.view(b_i, h, r, L, dh).transpose(1, 2).reshape(b_t, h, L, dh)  # (B_t, h, L, d_h)
        return self.crossattention.output(_merge_heads(ctx), x)

    def forward(self, x, mask, cross: tuple[torch.Tensor, torch.Tensor] | None, index, past, is_causal=False,
                cross_mask=None):
        x, kv = self._self_attention(x, mask, past, is_causal)
        if cross is not None:
            x = self._cross_attention(x, cross[0], cross[1], index, cross_mask)
        x = self.output(self.intermediate(x), x)
        return x, kv


class Embeddings(nn.Module):
    """Word + absolute position embeddings -> LayerNorm -> dropout (no token types)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, past_len: int = 0) -> torch.Tensor:
        length = input_ids.shape[1]
        if past_len + length > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {past_len + length} tokens exceeds max_position "
                             f"{self.position_embeddings.num_embeddings}")
        pos = torch.arange(past_len, past_len + length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg, encoder_width) for _ in range(cfg.num_layers))


def sdpa_mask(attention_mask: torch.Tensor, query_len: int, past_len: int,
              is_causal: bool) -> tuple[torch.Tensor | None, bool]:
    """The cheapest SDPA arguments ``(attn_mask, is_causal)`` equivalent to :func:`build_attention_mask`.

    Without padding no mask tensor is needed: bidirectional attention and single-token decoding steps attend
    to every key, and a causal pass without a cache uses SDPA's built-in causal mask.
    """
    if not bool(attention_mask.bool().all()):
        return build_attention_mask(attention_mask, query_len, past_len, is_causal), False
    if not is_causal or query_len == 1:
        return None, False
    if past_len == 0:
        return None, True
    return build_attention_mask(attention_mask, query_len, past_len, is_causal), False


def build_attention_mask(attention_mask: torch.Tensor, query_len: int, past_len: int,
                         is_causal: bool) -> torch.Tensor:
    """Boolean SDPA mask ``(B, 1, L_q, L_past + L_q)``; True = may attend.

    ``attention_mask`` is ``(B, L_past + L_q)`` with 1 for real tokens and 0 for padding.
    """
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L_k)
    if not is_causal:
        return keys.expand(-1, 1, query_len, -1)
    total = keys.shape[-1]
    q_pos = torch.arange(past_len, past_len + query_len, device=attention_mask.device)[:, None]
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    return keys & (k_pos <= q_pos)[None, None]  # (B, 1, L_q, L_k)


class TextTransformer(nn.Module):
    """The MED BERT stack (``embeddings`` + ``encoder.layer.N``). See the module docstring for the roles."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, encoder_width)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def cross_kv(self, image_embeds: torch.Tensor, mask: torch.Tensor | None = None) -> CrossKV:
        """Project source tokens ``(B, N, D_src)`` (image tokens, or question states for the VQA decoder) to every
        layer's cross-attention keys/values, once. ``mask`` ``(B, N)`` (1 = attend) hides padded positions."""
        if mask is not None and bool(mask.bool().all()):
            mask = None  # nothing padded: no mask tensor needed
        return CrossKV([layer.image_kv(image_embeds) for layer in self.layers], None, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross: CrossKV | None = None,
        is_causal: bool = False,
        past: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Run the stack.

        Args:
            input_ids: ``(B, L)`` token ids (position 0 is [CLS], [ENC] or [DEC] by role).
            attention_mask: ``(B, L_past + L)``, 1 for tokens, 0 for padding.
            cross: image keys/values; None runs text-only (cross-attention skipped).
            is_causal: decoder (causal) self-attention instead of bidirectional.
            past: self-attention cache from earlier decoding steps.
            use_cache: return the updated cache.

        Returns:
            hidden states ``(B, L, H)`` and the new cache (or None).
        """
        past_len = past[0][0].shape[2] if past else 0
        x = self.embeddings(input_ids, past_len)
        mask, causal_flag = sdpa_mask(attention_mask, input_ids.shape[1], past_len, is_causal)
        new_cache: KVCache = []
        first_ckpt = len(self.layers) - self.cfg.grad_ckpt_layers
        recompute = self.cfg.grad_ckpt_layers > 0 and self.training and torch.is_grad_enabled() and not use_cache
        for i, layer in enumerate(self.layers):
            args = (x, mask, cross.kv[i] if cross is not None else None, cross.index if cross is not None else None,
                    past[i] if past else None, causal_flag, cross.mask if cross is not None else None)
            if recompute and i >= first_ckpt:  # the RNG state is restored, so dropout masks replay
                x, kv = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, kv = layer(*args)
            if use_cache:
                new_cache.append(kv)
        return x, (new_cache if use_cache else None)


class LMHead(nn.Module):
    """``cls.predictions``: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (+ bias)."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = self.decoder.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class _Transform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: normal(0, ``std``) weights (BERT: 0.02), zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear | nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
