"""Hugging Face BLIP directories <-> blip_core (see :mod:`blip_core.convert`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from blip_core.checkpoint_io import Checkpoint, fit_pos_embed, with_image_size
from blip_core.config import ModelConfig, TextConfig, VisionConfig, model_preset
from blip_core.convert.keys import assign_state, check_task, hf_to_official_key, official_to_hf_key
from blip_core.errors import UserError
from blip_core.io import atomic_directory
from blip_core.models.blip import BlipModel
from blip_core.models.vqa import BlipVQA
from blip_core.tokenizer import BlipTokenizer

HF_CAPTION = "BlipForConditionalGeneration"
HF_RETRIEVAL = "BlipForImageTextRetrieval"
HF_VQA = "BlipForQuestionAnswering"
HF_TASKS = {"caption": HF_CAPTION, "retrieval": HF_RETRIEVAL, "vqa": HF_VQA}
DEFAULT_LABEL_SMOOTHING = 0.1

# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf_config) -> tuple[ModelConfig, list[str]]:
    """Map a ``transformers.BlipConfig`` to a :class:`ModelConfig`, field by field."""
    v, t = hf_config.vision_config, hf_config.text_config
    notes = []
    image_size = v.image_size if isinstance(v.image_size, int) else tuple(v.image_size)
    patch_size = v.patch_size if isinstance(v.patch_size, int) else tuple(v.patch_size)
    if not isinstance(image_size, int):
        if image_size[0] != image_size[1]:
            raise UserError(f"non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    if not isinstance(patch_size, int):
        patch_size = patch_size[0]
    for name, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
        if act != "gelu":
            raise UserError(f"{name} hidden_act {act!r} is not supported (BLIP uses exact GELU)")
    if t.encoder_hidden_size != v.hidden_size:
        raise UserError(f"text encoder_hidden_size {t.encoder_hidden_size} != vision hidden_size {v.hidden_size}")
    if getattr(v, "attention_dropout", 0.0):
        notes.append(f"vision attention_dropout {v.attention_dropout} dropped (blip_core's ViT has none)")
    base = model_preset("large" if v.hidden_size == 1024 else "base")
    cfg = dataclasses.replace(
        base,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=v.hidden_size,
                            depth=v.num_hidden_layers, heads=v.num_attention_heads,
                            mlp_ratio=v.intermediate_size / v.hidden_size, ln_eps=v.layer_norm_eps,
                            drop_path_rate=0.0),
        text=TextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_layers=t.num_hidden_layers,
                        num_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                        max_position=t.max_position_embeddings, ln_eps=t.layer_norm_eps,
                        dropout=float(t.hidden_dropout_prob),
                        attention_dropout=float(t.attention_probs_dropout_prob),
                        init_std=float(t.initializer_range)),
        embed_dim=hf_config.image_text_hidden_size,
    )
    if int(cfg.vision.width * cfg.vision.mlp_ratio) != v.intermediate_size:
        raise UserError(f"vision intermediate_size {v.intermediate_size} is not representable as an MLP ratio")
    smoothing = getattr(t, "label_smoothing", 0.0)
    if smoothing != DEFAULT_LABEL_SMOOTHING:
        notes.append(f"the source's label_smoothing is {smoothing}; blip_core's LM loss uses "
                     f"{DEFAULT_LABEL_SMOOTHING} as BLIP training")
    return cfg, notes


def config_to_hf(cfg: ModelConfig, tokenizer: BlipTokenizer | None = None,
                 label_smoothing: float = DEFAULT_LABEL_SMOOTHING):
    """Build a ``transformers.BlipConfig`` equal to ``cfg`` in every field that BLIP uses."""
    from transformers import BlipConfig

    v, t = cfg.vision, cfg.text
    if v.stem != "patch":
        raise UserError(f"model.vision.stem is {v.stem!r}: the transformers BLIP port has only the linear patch "
                        "embedding, so this model cannot be written in its layout")
    if tokenizer is not None:
        bos, sep, pad = tokenizer.dec_id, tokenizer.sep_id, tokenizer.pad_id
    else:  # BlipTokenizer appends [DEC] and [ENC] after the base vocabulary
        bos, sep, pad = t.vocab_size - 2, 102, 0
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.width,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, max_position_embeddings=t.max_position, hidden_act="gelu",
                layer_norm_eps=t.ln_eps, hidden_dropout_prob=t.dropout,
                attention_probs_dropout_prob=t.attention_rate,
                bos_token_id=bos, sep_token_id=sep, pad_token_id=pad, label_smoothing=label_smoothing,
                initializer_range=t.init_std)
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.ln_eps, hidden_act="gelu")
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=cfg.embed_dim,
                      label_smoothing=label_smoothing)


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = src / "model.safetensors"
    index = src / "model.safetensors.index.json"
    if single.is_file():
        return dict(load_file(str(single)))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(src / f)))
        return out
    pt = src / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise UserError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _hf_task(arch: list[str] | None, keys: set[str], src: Path) -> str:
    names = set(arch or [])
    if HF_CAPTION in names:
        return "caption"
    if HF_RETRIEVAL in names:
        return "retrieval"
    if HF_VQA in names:
        return "vqa"
    if names:
        raise UserError(f"{src}: architecture {sorted(names)} is not supported (supported: "
                        f"{', '.join(HF_TASKS.values())})")
    has_dec = any(k.startswith("text_decoder.") for k in keys)
    has_enc = any(k.startswith("text_encoder.") for k in keys)
    if has_dec and not has_enc:
        return "caption"
    if has_enc and not has_dec:
        return "retrieval"
    if has_enc and has_dec and not any(k.startswith("itm_head.") for k in keys):
        return "vqa"
    raise UserError(f"{src}: cannot tell the model class (no 'architectures' in config.json)")


def _check_vqa_widths(cfg: ModelConfig, source: str) -> None:
    if cfg.vision.width != cfg.text.hidden_size:
        raise UserError(f"{source}: the transformers VQA decoder reads question states through keys/values of the "
                        f"vision width ({cfg.vision.width}), the official model through the text width "
                        f"({cfg.text.hidden_size}): only VQA models with equal widths convert between the two")


def load_hf(src: str | Path, *, image_size: int | None = None) -> Checkpoint:
    """Load a Hugging Face ``save_pretrained`` directory of a BLIP caption, retrieval or VQA model (a VQA
    model becomes a :class:`~blip_core.models.vqa.BlipVQA`).

    The tokenizer is loaded when the directory holds tokenizer files. ``Checkpoint.notes`` lists the modules
    the source lacks and how they were initialised, and any config field that could not be kept. With
    ``image_size`` (default: the config's) the position embeddings are interpolated to that resolution.
    """
    from transformers import BlipConfig

    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: not a Hugging Face model directory (config.json is missing)")
    raw = json.loads((src / "config.json").read_text())
    if raw.get("model_type") != "blip":
        raise UserError(f"{src}: model_type is {raw.get('model_type')!r}, expected 'blip'")
    hf_config = BlipConfig.from_pretrained(str(src))
    cfg, notes = config_from_hf(hf_config)
    cfg = with_image_size(cfg, image_size, str(src))
    state = _read_hf_weights(src)
    task = _hf_task(raw.get("architectures"), set(state), src)
    renamed: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k.endswith("embeddings.position_ids"):
            notes.append(f"ignored {k} (a constant index buffer)")
            continue
        renamed[hf_to_official_key(k)] = t
    pos = renamed.get("visual_encoder.pos_embed")
    if pos is not None and pos.dim() == 3:
        renamed["visual_encoder.pos_embed"], note = fit_pos_embed(
            "visual_encoder.pos_embed", pos, (cfg.vision.image_size // cfg.vision.patch_size) ** 2)
        notes += [note] if note else []
    if task == "vqa":
        _check_vqa_widths(cfg, str(src))
    model = BlipVQA(cfg) if task == "vqa" else BlipModel(cfg)
    notes = [f"source: Hugging Face {HF_TASKS[task]}", *notes,
             *assign_state(model, renamed, str(src))]
    model.eval()
    tokenizer = None
    if (src / "vocab.txt").is_file() or (src / "tokenizer.json").is_file():
        tokenizer = BlipTokenizer.from_dir(src)
        t = hf_config.text_config
        got = (tokenizer.dec_id, tokenizer.sep_id, tokenizer.pad_id)
        want = (t.bos_token_id, t.sep_token_id, t.pad_token_id)
        if got != want:
            notes.append(f"tokenizer ids ([DEC], [SEP], [PAD]) = {got} differ from the config's {want}")
        if len(tokenizer) > cfg.text.vocab_size:
            raise UserError(f"{src}: the tokenizer has {len(tokenizer)} tokens, the model only "
                            f"{cfg.text.vocab_size}")
    else:
        notes.append("no tokenizer files in the source: the checkpoint has no tokenizer")
    return Checkpoint(model=model, tokenizer=tokenizer, momentum_state=None, notes=notes)


def hf_state_dict(model: BlipModel | BlipVQA, task: str) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``model`` for ``task`` (caption, retrieval or vqa), tied copies omitted."""
    check_task(model, task, HF_TASKS)
    keep = {"caption": ("text_decoder.",), "retrieval": ("text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
            "vqa": ("text_encoder.", "text_decoder.")}[task]
    tied = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")
    out = {}
    for k, t in model.state_dict().items():
        if k.startswith("visual_encoder.") or (k.startswith(keep) and k not in tied):
            out[official_to_hf_key(k)] = t.detach().contiguous().cpu()
    return out


def save_hf(model: BlipModel | BlipVQA, dst: str | Path, task: str, tokenizer: BlipTokenizer | None = None, *,
            label_smoothing: float = DEFAULT_LABEL_SMOOTHING) -> Path:
    """Write ``model`` as a ``transformers`` directory (``caption``, ``retrieval`` or ``vqa``), atomically.

    The caption export holds the ViT and the decoder; the retrieval export holds the ViT, the text encoder,
    projections and ITM head (HF has no learnable temperature); the vqa export (of a ``BlipVQA`` whose ViT and
    text widths are equal) holds the ViT, the question encoder and the answer decoder. ``transformers`` loads
    each with zero missing and zero unexpected keys.
    """
    from safetensors.torch import save_file

    check_task(model, task, HF_TASKS)
    if task == "vqa":
        _check_vqa_widths(model.cfg, "vqa export")
    hf_config = config_to_hf(model.cfg, tokenizer, label_smoothing)
    hf_config.architectures = [HF_TASKS[task]] if task in HF_TASKS else None
    state = hf_state_dict(model, task)
    dst = Path(dst)
    with atomic_directory(dst) as tmp:
        hf_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return dst
