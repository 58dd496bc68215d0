"""Initialise a fresh BLIP from unimodal pre-trained weights, as the paper does before pre-training.

* :func:`load_vit_weights`: the ViT from an ImageNet timm ``VisionTransformer`` state dict (``.pth``/``.pt``
  read with ``weights_only=True``, or ``.safetensors``; a ``{"model": ...}`` or ``{"state_dict": ...}``
  wrapper is accepted). Position embeddings are interpolated to the model's resolution; a classification
  head is ignored; every other key must match.
* :func:`load_bert_weights`: the text encoder and decoder from a Hugging Face BERT directory
  (``save_pretrained`` of ``BertModel``, ``BertForMaskedLM`` or ``BertLMHeadModel``). As the official code:
  both the encoder's and the decoder's self-attention start from BERT's self-attention; the shared
  embeddings and feed-forward blocks from BERT's; the word embeddings grow by the added ``[DEC]``/``[ENC]``
  rows; the LM head from BERT's MLM head when present; cross-attention stays freshly initialised.

Missing and unexpected tensors are reported by name, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip_core.errors import UserError, load_failure
from blip_core.models.blip import BlipModel
from blip_core.models.vision import interpolate_pos_embed

_VIT_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.", "pre_logits.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{path}: not a readable PyTorch state dict ({load_failure(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_vit_weights(model: BlipModel, path: str | Path) -> list[str]:
    """Copy a timm ViT state dict into ``model.visual_encoder``; returns the ignored (head) keys."""
    state = _read_state_dict(Path(path))
    vit = model.visual_encoder
    own = vit.state_dict()
    ignored = sorted(k for k in state if k.startswith(_VIT_IGNORED_PREFIXES))
    state = {k: v for k, v in state.items() if k not in ignored}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], own["pos_embed"].shape[1] - 1)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    stems = {"patch" if "patch_embed.proj.weight" in keys else "conv" for keys in (state, own)}
    if len(stems) == 2:
        raise UserError(f"{path}: its patch embedding is not the model's: the model has "
                        f"model.vision.stem={model.cfg.vision.stem}; set the stem the weights were trained with")
    if missing or unexpected or bad_shape:
        raise UserError(f"{path}: does not fit the ViT ({model.cfg.vision.width} wide, depth "
                        f"{model.cfg.vision.depth}): missing {missing[:8]}, unexpected {unexpected[:8]}, "
                        f"shape mismatch {bad_shape[:8]}")
    vit.load_state_dict(state)
    return ignored


def _bert_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_dir():
        raise UserError(f"BERT directory not found: {path}")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin (not a save_pretrained directory)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_state_dict(f))
    # Normalise prefixes: BertModel keys are bare, BertForMaskedLM/LMHeadModel put them under "bert.".
    return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}


def load_bert_weights(model: BlipModel, path: str | Path) -> list[str]:
    """Initialise the text stack from a Hugging Face BERT directory; returns the BERT keys not used."""
    path = Path(path)
    state = _bert_state(path)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        hf_cfg = json.loads(cfg_file.read_text())
        tcfg = model.cfg.text
        for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                             ("intermediate_size", "intermediate_size")):
            if theirs in hf_cfg and hf_cfg[theirs] != getattr(tcfg, ours):
                raise UserError(f"{path}: BERT {theirs}={hf_cfg[theirs]} but model.text.{ours}="
                                f"{getattr(tcfg, ours)}")
    used: set[str] = set()
    encoder, decoder = model.text_encoder, model.text_decoder.bert

    def copy(dst: torch.Tensor, key: str) -> None:
        if key not in state:
            raise UserError(f"{path}: BERT weights lack {key}")
        src = state[key]
        with torch.no_grad():
            if key.endswith("word_embeddings.weight") or key == "cls.predictions.bias":
                n = min(src.shape[0], dst.shape[0])  # BERT's vocabulary, then the added special tokens
                if src.shape[1:] != dst.shape[1:]:
                    raise UserError(f"{path}: {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst[:n].copy_(src[:n])
            else:
                if src.shape != dst.shape:
                    raise UserError(f"{path}: {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src)
        used.add(key)

    for name, p in decoder.named_parameters():
        if ".crossattention." in name:
            continue  # new in BLIP
        copy(p, name)
    for name, p in encoder.named_parameters():
        if ".attention." in name:  # the encoder's own self-attention, also from BERT
            copy(p, name)
    head = model.text_decoder.cls.predictions
    if any(k.startswith("cls.predictions.") for k in state):
        copy(head.transform.dense.weight, "cls.predictions.transform.dense.weight")
        copy(head.transform.dense.bias, "cls.predictions.transform.dense.bias")
        copy(head.transform.LayerNorm.weight, "cls.predictions.transform.LayerNorm.weight")
        copy(head.transform.LayerNorm.bias, "cls.predictions.transform.LayerNorm.bias")
        copy(head.bias, "cls.predictions.bias")
    return sorted(k for k in state if k not in used)
