"""Official salesforce/BLIP ``.pth`` files <-> blip_core (see :mod:`blip_core.convert`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from blip_core.checkpoint_io import (
    MOMENTUM_PREFIXES,
    Checkpoint,
    _names,
    compare_keys,
    fit_pos_embed,
    key_problems,
)
from blip_core.config import MODEL_PRESETS, model_preset
from blip_core.convert.keys import VQA_PREFIXES, assign_state, check_task
from blip_core.errors import UserError, load_failure
from blip_core.models.blip import BlipModel
from blip_core.models.momentum import FeatureQueue, MomentumEncoders
from blip_core.models.vqa import BlipVQA

OFFICIAL_TASKS = ("caption", "retrieval", "pretrain", "vqa")

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
    notes += assign_state(model, model_state, str(src))
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
        missing, unexpected, wrong = compare_keys({k: t.shape for k, t in expected.items()},
                                                  {k: t.shape for k, t in encoders.items()})
        problems += key_problems([("missing momentum keys", missing, 12), ("unexpected momentum keys", unexpected, 12),
                                  ("momentum shape mismatches", wrong, 12)])
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
    check_task(model, task, OFFICIAL_TASKS)
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
