"""Key names and state assignment shared by the Hugging Face and official converters: the official <-> HF
ViT key renaming and :func:`assign_state`, which loads a named state into a model accounting for every key.
"""

from __future__ import annotations

import re

import torch

from blip_core.checkpoint_io import (
    key_problems,
    tensor_aliases,
)
from blip_core.errors import UserError
from blip_core.models.blip import BlipModel
from blip_core.models.vqa import BlipVQA

VQA_PREFIXES = ("visual_encoder.", "text_encoder.", "text_decoder.")

# --------------------------------------------------------------------------------------------------
# Key renaming (blip-reference 6.2)
# --------------------------------------------------------------------------------------------------

# The official -> HF rules, applied in order as substring replacements to ViT keys.
_OFFICIAL_TO_HF_RULES = (
    ("visual_encoder", "vision_model.encoder"),
    ("blocks", "layers"),
    ("attn", "self_attn"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("encoder.norm", "post_layernorm"),
    ("encoder.patch_embed.proj", "embeddings.patch_embedding"),
    ("encoder.pos_embed", "embeddings.position_embedding"),
    ("encoder.cls_token", "embeddings.class_embedding"),
    ("self_attn.proj", "self_attn.projection"),
)

_HF_VISION_FIXED = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",
    "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
}
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_PARTS = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj", "layer_norm1": "norm1",
                   "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def official_to_hf_key(key: str) -> str:
    """Rename one official (= blip_core) key to the Hugging Face layout; text keys are unchanged."""
    if not key.startswith("visual_encoder."):
        return key
    for old, new in _OFFICIAL_TO_HF_RULES:
        key = key.replace(old, new)
    return key


def hf_to_official_key(key: str) -> str:
    """Rename one Hugging Face key to the official (= blip_core) layout; text keys are unchanged."""
    if not key.startswith("vision_model."):
        return key
    if key in _HF_VISION_FIXED:
        return _HF_VISION_FIXED[key]
    m = _HF_LAYER.match(key)
    if m:
        part, _, leaf = m.group(2).rpartition(".")
        if part in _HF_LAYER_PARTS:
            return f"visual_encoder.blocks.{m.group(1)}.{_HF_LAYER_PARTS[part]}.{leaf}"
    return key  # left as is: reported as unexpected


# --------------------------------------------------------------------------------------------------
# Assigning a named state into a model
# --------------------------------------------------------------------------------------------------

_TEXT_ENC_SA = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.attention\.(.+)$")
_TEXT_DEC_SA = re.compile(r"^text_decoder\.bert\.encoder\.layer\.(\d+)\.attention\.(.+)$")

# Whole modules a source may lack, with how they are filled.
_OPTIONAL_GROUPS = (
    ("text_encoder_sa", lambda k: bool(_TEXT_ENC_SA.match(k)),
     "text encoder self-attention initialised from the decoder's causal self-attention (the source has no "
     "text encoder; fine-tune before using ITC/ITM)"),
    ("decoder_sa", lambda k: bool(_TEXT_DEC_SA.match(k)),
     "decoder self-attention initialised from the text encoder's self-attention (the source has no decoder; "
     "fine-tune before captioning)"),
    ("lm_head", lambda k: k.startswith("text_decoder.cls."),
     "LM head transform and bias left at their random initialisation (the source has no decoder)"),
    ("itc_itm_heads", lambda k: k.split(".")[0] in ("vision_proj", "text_proj", "itm_head"),
     "vision_proj, text_proj and itm_head left at their random initialisation (the source has no "
     "retrieval heads; ITC/ITM scores are meaningless until fine-tuned)"),
    ("temp", lambda k: k == "temp", "temp set to the config's initial value (the source has no temperature)"),
)


def assign_state(model: BlipModel | BlipVQA, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy ``state`` (any alias names) into ``model``; return notes on whole modules the source lacked.

    Raises :class:`UserError` naming every unexpected key, shape mismatch, tied pair with different values,
    and missing key that is not part of a wholly absent optional module (a VQA model has none: every key must
    be there).
    """
    optional_groups = () if isinstance(model, BlipVQA) else _OPTIONAL_GROUPS
    aliases = tensor_aliases(model)
    targets = model.state_dict()
    unexpected = sorted(k for k in state if k not in aliases)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(targets[k].shape)}"
                        for k in state if k in aliases and tuple(state[k].shape) != tuple(targets[k].shape))
    filled: dict[str, str] = {}
    conflicts = []
    for k in sorted(state, key=lambda n: (aliases.get(n) != n, n)):  # canonical names first
        if k not in aliases or tuple(state[k].shape) != tuple(targets[k].shape):
            continue
        canon = aliases[k]
        if canon in filled:
            if not torch.equal(state[k].to(targets[canon].dtype), targets[canon]):
                conflicts.append(f"{k} != {filled[canon]}")
            continue
        with torch.no_grad():
            targets[canon].copy_(state[k])
        filled[canon] = k
    missing = sorted(set(aliases.values()) - set(filled))
    notes = []
    still_missing = list(missing)
    for group, member, text in optional_groups:
        in_group = [k for k in set(aliases.values()) if member(k)]
        absent = [k for k in in_group if k not in filled]
        if in_group and len(absent) == len(in_group):
            notes.append(f"{text} [{len(absent)} tensors]")
            still_missing = [k for k in still_missing if not member(k)]
            _fill_group(model, group, targets)
    problems = key_problems([
        ("unexpected keys", unexpected, 12), ("shape mismatches", mismatched, 6),
        ("tied tensors differ (this checkpoint does not share encoder/decoder weights as BLIP pre-training does; "
         "a VQA model is read as one only when it holds nothing but visual_encoder, text_encoder and "
         "text_decoder; NLVR2 models are not supported)", conflicts, 6),
        ("missing keys", still_missing, 12)])
    if problems:
        raise UserError(f"{source}: cannot load into a BLIP model: {'; '.join(problems)}")
    return notes


def _fill_group(model: BlipModel, group: str, targets: dict[str, torch.Tensor]) -> None:
    enc_layers, dec_layers = model.text_encoder.layers, model.text_decoder.bert.layers
    with torch.no_grad():
        if group == "text_encoder_sa":
            for e, d in zip(enc_layers, dec_layers):
                e.attention.load_state_dict(d.attention.state_dict())
        elif group == "decoder_sa":
            for e, d in zip(enc_layers, dec_layers):
                d.attention.load_state_dict(e.attention.state_dict())
        elif group == "temp":
            model.temp.fill_(float(model.cfg.temp))


def check_task(model: BlipModel | BlipVQA, task: str, tasks) -> None:
    if task not in tasks:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(tasks)}")
    if (task == "vqa") != isinstance(model, BlipVQA):
        raise UserError("only a VQA model exports as the vqa task" if task == "vqa" else
                        f"a VQA model exports only as the vqa task, not {task!r}")
