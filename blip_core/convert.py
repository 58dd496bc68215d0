"""Conversion between blip_core checkpoints, Hugging Face BLIP directories and official salesforce/BLIP files.

* :func:`load_hf` reads a ``save_pretrained`` directory of ``BlipForConditionalGeneration`` (caption),
  ``BlipForImageTextRetrieval`` (retrieval) or ``BlipForQuestionAnswering`` (vqa, into a
  :class:`~blip_core.models.vqa.BlipVQA`); :func:`save_hf` writes one that ``transformers`` loads with no
  missing and no unexpected keys.
* :func:`load_official` reads a released ``.pth`` (weights under ``'model'``) with ``weights_only=True``,
  interpolates position embeddings to the target resolution and keeps momentum encoders and queues; a VQA file
  (``visual_encoder``, ``text_encoder`` and ``text_decoder`` only, as ``model_vqa.pth``) becomes a ``BlipVQA``.
  :func:`official_state_dict` / :func:`save_official` write the same layout back.

blip_core parameter names are the official ones, so official <-> blip_core is one-to-one; Hugging Face renames
the ViT (blip-reference 6.2) and leaves text keys unchanged. Every key is accounted for: an unexpected,
mis-shaped or missing key is a :class:`UserError` naming it, except for whole modules a source legitimately
lacks (a caption model has no text-encoder self-attention, projections or ITM head; a retrieval model has no
decoder self-attention or LM head). Those are initialised as listed in the returned ``Checkpoint.notes``.

Convention differences with Hugging Face, both reproducible through explicit options:

* ``BlipTextConfig`` defaults differ from BLIP's (8 heads, vision LayerNorm eps 1e-5, label smoothing 0):
  configs are mapped field by field both ways, never from defaults; :func:`save_hf` writes
  ``label_smoothing`` (0.1 = BLIP training) explicitly.
* HF's ITM path keeps ``[CLS]`` where official training and evaluation use ``[ENC]``: see
  ``itm_first_token`` in :func:`blip_core.generation.itm_scores`. Its VQA processor likewise leaves ``[CLS]``
  first in the question, where the official model (and :func:`blip_core.vqa.question_tokens`) puts ``[ENC]``.
* HF's VQA answer decoder reads question states through cross-attention keys/values of the *vision* width
  (``BlipConfig`` sets one ``encoder_hidden_size`` for both text stacks); the official one (and ``BlipVQA``)
  uses the text width. The two agree only when both widths are equal (``base``), the only VQA models that
  convert to or from HF.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from blip_core.checkpoint_io import (
    MOMENTUM_PREFIXES,
    Checkpoint,
    _names,
    atomic_directory,
    fit_pos_embed,
    tensor_aliases,
    with_image_size,
)
from blip_core.config import MODEL_PRESETS, ModelConfig, TextConfig, VisionConfig, model_preset
from blip_core.errors import UserError, load_failure
from blip_core.models.blip import BlipModel
from blip_core.models.momentum import FeatureQueue, MomentumEncoders
from blip_core.models.vqa import BlipVQA
from blip_core.tokenizer import BlipTokenizer

HF_CAPTION = "BlipForConditionalGeneration"
HF_RETRIEVAL = "BlipForImageTextRetrieval"
HF_VQA = "BlipForQuestionAnswering"
HF_TASKS = {"caption": HF_CAPTION, "retrieval": HF_RETRIEVAL, "vqa": HF_VQA}
OFFICIAL_TASKS = ("caption", "retrieval", "pretrain", "vqa")
VQA_PREFIXES = ("visual_encoder.", "text_encoder.", "text_decoder.")
DEFAULT_LABEL_SMOOTHING = 0.1

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


def _assign_state(model: BlipModel | BlipVQA, state: dict[str, torch.Tensor], source: str) -> list[str]:
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
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched, 6)}")
    if conflicts:
        problems.append("tied tensors differ (this checkpoint does not share encoder/decoder weights as "
                        "BLIP pre-training does; a VQA model is read as one only when it holds nothing but "
                        "visual_encoder, text_encoder and text_decoder; NLVR2 models are not supported): "
                        f"{_names(conflicts, 6)}")
    if still_missing:
        problems.append(f"missing keys: {_names(still_missing)}")
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
    if t.attention_probs_dropout_prob != t.hidden_dropout_prob:
        notes.append(f"text attention dropout {t.attention_probs_dropout_prob} replaced by the hidden dropout "
                     f"{t.hidden_dropout_prob} (blip_core uses one rate for both)")
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
                        dropout=float(t.hidden_dropout_prob), init_std=float(t.initializer_range)),
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
                layer_norm_eps=t.ln_eps, hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.dropout,
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
             *_assign_state(model, renamed, str(src))]
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


def _check_task(model: BlipModel | BlipVQA, task: str, tasks) -> None:
    if task not in tasks:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(tasks)}")
    if (task == "vqa") != isinstance(model, BlipVQA):
        raise UserError("only a VQA model exports as the vqa task" if task == "vqa" else
                        f"a VQA model exports only as the vqa task, not {task!r}")


def hf_state_dict(model: BlipModel | BlipVQA, task: str) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``model`` for ``task`` (caption, retrieval or vqa), tied copies omitted."""
    _check_task(model, task, HF_TASKS)
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

    _check_task(model, task, HF_TASKS)
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


# --------------------------------------------------------------------------------------------------
# Official salesforce/BLIP checkpoints
# --------------------------------------------------------------------------------------------------


def _read_official(src: Path) -> dict[str, torch.Tensor]:
    if not src.is_file():
        raise UserError(f"official checkpoint not found: {src}")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise UserError(f"{src}: cannot read as a PyTorch checkpoint ({load_failure(e)})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"{src}: expected a dict of tensors under 'model'")
    return dict(ckpt)


def load_official(src: str | Path, preset: str = "base", *, image_size: int | None = None) -> Checkpoint:
    """Load a released salesforce/BLIP ``.pth`` into a ``preset`` architecture (``base`` or ``large`` for
    released files; any preset of :mod:`blip_core.config` for tests).

    A file holding only ``visual_encoder``, ``text_encoder`` and ``text_decoder`` weights (the official
    ``BLIP_VQA`` layout of ``model_vqa.pth``) is loaded into a :class:`~blip_core.models.vqa.BlipVQA`; any other
    into a :class:`BlipModel`.

    Position embeddings (``visual_encoder.pos_embed`` and its momentum copy) are interpolated to
    ``image_size`` (default: the checkpoint's own resolution). The vocabulary size follows the checkpoint.
    Momentum encoders and queues, when present, are returned in ``Checkpoint.momentum_state`` (retrieval's
    ``ptr_queue`` is renamed ``queue_ptr``) and ``model.queue_size`` follows the stored queues.
    """
    if preset not in MODEL_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    src = Path(src)
    state = _read_official(src)
    notes = [f"source: official BLIP checkpoint {src.name} ({len(state)} tensors), preset {preset}"]
    cfg = model_preset(preset)
    patch = cfg.vision.patch_size
    pos = state.get("visual_encoder.pos_embed")
    if pos is None:
        raise UserError(f"{src}: visual_encoder.pos_embed is missing: not a BLIP checkpoint")
    own_grid = math.isqrt(pos.shape[1] - 1)
    size = image_size or own_grid * patch
    if size <= 0 or size % patch:
        raise UserError(f"image size {size} is not a positive multiple of the patch size {patch}")
    words = state.get("text_decoder.bert.embeddings.word_embeddings.weight",
                      state.get("text_encoder.embeddings.word_embeddings.weight"))
    text = cfg.text if words is None else dataclasses.replace(cfg.text, vocab_size=int(words.shape[0]))
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=size), text=text)

    n_patches = (size // patch) ** 2
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and state[key].dim() == 3:
            state[key], note = fit_pos_embed(key, state[key], n_patches)
            notes += [note] if note else []

    model_state, momentum, dropped = {}, {}, []
    for k, t in state.items():
        if k.endswith("embeddings.position_ids"):
            if not torch.equal(t.view(-1), torch.arange(t.numel(), dtype=t.dtype)):
                raise UserError(f"{src}: {k} is not 0..n-1; refusing to ignore it")
            dropped.append(k)
        elif k.startswith(MOMENTUM_PREFIXES):
            momentum[k] = t
        elif k in ("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue"):
            momentum["queue_ptr" if k == "ptr_queue" else k] = t
        else:
            model_state[k] = t
    if dropped:
        notes.append(f"ignored {len(dropped)} position_ids buffers (constant 0..n-1)")
    if "image_queue" in momentum:
        cfg = dataclasses.replace(cfg, queue_size=int(momentum["image_queue"].shape[1]))
    vqa = is_official_vqa(state)
    if vqa:
        notes.append("VQA layout (visual_encoder, text_encoder, text_decoder only): loaded as BlipVQA")
    model = BlipVQA(cfg) if vqa else BlipModel(cfg)
    notes += _assign_state(model, model_state, str(src))
    model.eval()
    momentum_state = _check_momentum(model, momentum, str(src)) if momentum else None
    if momentum_state:
        notes.append(f"kept momentum encoders and queues ({len(momentum_state)} tensors, queue size "
                     f"{cfg.queue_size})" if "image_queue" in momentum_state else
                     f"kept momentum encoders ({len(momentum_state)} tensors)")
    return Checkpoint(model=model, tokenizer=None, momentum_state=momentum_state, notes=notes)


def is_official_vqa(state: dict[str, torch.Tensor]) -> bool:
    """Whether an official state dict has the ``BLIP_VQA`` layout: a text encoder and a decoder, and nothing
    outside ``visual_encoder``, ``text_encoder`` and ``text_decoder`` (no projections, ITM head, temperature,
    momentum copies or queues, which every pre-trained file has)."""
    return (all(k.startswith(VQA_PREFIXES) for k in state)
            and any(k.startswith("text_encoder.") for k in state)
            and any(k.startswith("text_decoder.") for k in state))


def _check_momentum(model: BlipModel, momentum: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Validate momentum/queue tensors against freshly built momentum modules; return them."""
    problems = []
    encoders = {k: v for k, v in momentum.items() if k.startswith(MOMENTUM_PREFIXES)}
    if encoders:
        expected = MomentumEncoders(model).state_dict()
        missing = sorted(set(expected) - set(encoders))
        unexpected = sorted(set(encoders) - set(expected))
        wrong = sorted(k for k in set(expected) & set(encoders) if expected[k].shape != encoders[k].shape)
        if missing:
            problems.append(f"missing momentum keys: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected momentum keys: {_names(unexpected)}")
        if wrong:
            problems.append(f"momentum shape mismatches: {_names(wrong)}")
    queues = {k: v for k, v in momentum.items() if not k.startswith(MOMENTUM_PREFIXES)}
    if queues:
        with_ids = "idx_queue" in queues
        expected_q = FeatureQueue(model.cfg.embed_dim, model.cfg.queue_size, with_ids=with_ids).state_dict()
        if set(queues) != set(expected_q):
            problems.append(f"queue keys {sorted(queues)}, expected {sorted(expected_q)}")
        else:
            wrong = [k for k in queues if queues[k].shape != expected_q[k].shape]
            if wrong:
                problems.append(f"queue shape mismatches: {_names(wrong)}")
    if problems:
        raise UserError(f"{source}: {'; '.join(problems)}")
    return {k: v.contiguous() for k, v in momentum.items()}


def official_state_dict(model: BlipModel | BlipVQA, task: str = "pretrain",
                        momentum_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The official ``state_dict`` layout for ``task`` (caption, retrieval, pretrain, or vqa for a ``BlipVQA``).

    Includes the tied copies and ``position_ids`` buffers the official modules save. Momentum encoders and
    queues are added for retrieval and pretrain when given (retrieval names the pointer ``ptr_queue``).
    """
    _check_task(model, task, OFFICIAL_TASKS)
    parts = {"vqa": VQA_PREFIXES, "caption": ("visual_encoder.", "text_decoder."),
             "retrieval": ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.", "temp"),
             "pretrain": ("visual_encoder.", "text_encoder.", "text_decoder.", "vision_proj.", "text_proj.",
                          "itm_head.", "temp")}[task]
    out: dict[str, torch.Tensor] = {}
    position_ids = torch.arange(model.cfg.text.max_position).unsqueeze(0)  # (1, max_position)
    for k, t in model.state_dict().items():
        if k.startswith(parts):
            out[k] = t.detach().clone()
    for prefix in ("text_encoder.", "text_decoder.bert."):
        if any(k.startswith(prefix) for k in out):
            out[f"{prefix}embeddings.position_ids"] = position_ids.clone()
    if momentum_state and task not in ("caption", "vqa"):
        for k, t in momentum_state.items():
            name = "ptr_queue" if (k == "queue_ptr" and task == "retrieval") else k
            out[name] = t.detach().clone()
    return out


def save_official(model: BlipModel | BlipVQA, dst: str | Path, task: str = "pretrain",
                  momentum_state: dict[str, torch.Tensor] | None = None) -> Path:
    """``torch.save({'model': official_state_dict(...)}, dst)``, written to a temporary name then renamed."""
    from blip_core.io import atomic_path

    dst = Path(dst)
    with atomic_path(dst) as tmp:
        torch.save({"model": official_state_dict(model, task, momentum_state)}, tmp)
    return dst
