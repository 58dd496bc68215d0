"""The blip_core checkpoint directory: safetensors weights, a JSON config and a Hugging Face tokenizer.

Layout of a checkpoint directory::

    config.json            {"format": "blip_core", "version": 1, "model": <ModelConfig as a dict>,
                            "architecture": "blip_vqa" for a VQA model (absent: the BLIP model)}
    model.safetensors      BlipModel (or BlipVQA) weights, each shared tensor stored once under its canonical name
    momentum.safetensors   optional: momentum encoders (visual_encoder_m.*, vision_proj_m.*, text_encoder_m.*,
                           text_proj_m.*) and ITC queues (image_queue, text_queue, queue_ptr, idx_queue)
    tokenizer/             optional: Hugging Face tokenizer directory (BlipTokenizer.save)

A checkpoint can be loaded at another image resolution (``load_model_dir(..., image_size=384)``): the model
is built at that size and the ViT position embeddings (student and momentum) are resized as the official
``interpolate_pos_embed`` does (:func:`blip_core.models.vision.interpolate_pos_embed`).

The text encoder shares everything but self-attention with the decoder, and the LM output matrix is tied to
the word embeddings; safetensors refuses aliased tensors, so only the first name of each shared tensor (in
``BlipModel.named_parameters()`` order) is written. A freshly constructed model re-creates the ties, so
loading needs the canonical names only.

Writes are atomic: the directory is assembled under a temporary sibling name and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from blip_core.config import ConfigError, ModelConfig, config_from_dict, to_dict
from blip_core.errors import UserError
from blip_core.io import atomic_directory
from blip_core.models.blip import BlipModel
from blip_core.models.vision import interpolate_pos_embed
from blip_core.models.vqa import BlipVQA
from blip_core.tokenizer import BlipTokenizer

FORMAT = "blip_core"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MOMENTUM_FILE = "momentum.safetensors"
TOKENIZER_DIR = "tokenizer"

MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
FEATURE_QUEUE_KEYS = ("image_queue", "text_queue")
POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
ARCH_BLIP, ARCH_VQA = "blip", "blip_vqa"
ARCHITECTURES: dict[str, type[nn.Module]] = {ARCH_BLIP: BlipModel, ARCH_VQA: BlipVQA}


def architecture_of(model: nn.Module) -> str:
    """The ``architecture`` a model is stored under: ``blip_vqa`` for :class:`BlipVQA`, else ``blip``."""
    return ARCH_VQA if isinstance(model, BlipVQA) else ARCH_BLIP


@dataclass
class Checkpoint:
    """A loaded (or converted) model with its tokenizer and optional momentum/queue state.

    ``notes`` lists what a conversion did beyond a one-to-one copy (initialised or ignored tensors).
    """

    model: BlipModel | BlipVQA
    tokenizer: BlipTokenizer | None = None
    momentum_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)

    def save(self, dst: str | Path) -> Path:
        """Write this checkpoint as a blip_core directory."""
        return save_model_dir(dst, self.model, self.tokenizer, self.momentum_state)


# --------------------------------------------------------------------------------------------------
# Names of shared tensors
# --------------------------------------------------------------------------------------------------


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """Map every state-dict name of ``model`` to its canonical name (the first name of the same tensor)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = id(t)
        aliases[name] = canonical.setdefault(key, name)
    persistent = set(model.state_dict().keys())
    return {k: v for k, v in aliases.items() if k in persistent}


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its canonical name."""
    aliases = tensor_aliases(model)
    sd = model.state_dict()
    return {name: sd[name] for name, canon in aliases.items() if name == canon}


def load_canonical(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a canonical state dict into ``model``; any missing, unexpected or mis-shaped key is an error."""
    expected = canonical_state_dict(model)
    _check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k])


def load_canonical_file(model: nn.Module, path: Path, *, resize_pos_embed: bool = False) -> list[str]:
    """Stream a canonical safetensors file into ``model`` one tensor at a time (no second full copy).

    With ``resize_pos_embed``, a ViT position embedding stored for another token grid is interpolated to the
    model's (:func:`fit_pos_embed`) instead of being a shape mismatch. Returns notes on what was resized.
    """
    expected = canonical_state_dict(model)
    notes: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            resized = set()
            if resize_pos_embed:
                for k in POS_EMBED_KEYS:
                    if k in shapes and k in expected and _resizable(shapes[k], tuple(expected[k].shape)):
                        resized.add(k)
                        shapes[k] = tuple(expected[k].shape)
            _check_keys(expected, shapes, str(path))
            with torch.no_grad():
                for k, t in expected.items():
                    v = f.get_tensor(k)
                    if k in resized:
                        v, note = fit_pos_embed(k, v, t.shape[1] - 1)
                        notes += [note] if note else []
                    t.copy_(v)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None
    return notes


def _resizable(stored: tuple, wanted: tuple) -> bool:
    """Whether two position-embedding shapes ``(1, 1+N, D)`` differ only in their number of tokens."""
    return len(stored) == len(wanted) == 3 and stored[0] == wanted[0] and stored[2] == wanted[2]


def fit_pos_embed(key: str, pos_embed: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, str | None]:
    """``pos_embed`` resized to ``num_patches`` patch positions, and a note saying so (None when unchanged)."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed, None
    try:
        out = interpolate_pos_embed(pos_embed, num_patches)
    except ValueError as e:
        raise UserError(f"{key}: {e}") from None
    g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
    return out, f"{key} interpolated from {g_old}x{g_old} to {g_new}x{g_new} patches"


def _check_keys(expected: dict[str, torch.Tensor], shapes: dict[str, tuple], source: str) -> None:
    missing, unexpected, wrong = compare_keys({k: tuple(t.shape) for k, t in expected.items()}, shapes)
    shown = [f"{k} {shapes[k]} vs model {tuple(expected[k].shape)}" for k in wrong]
    problems = key_problems([("missing keys", missing, 12), ("unexpected keys", unexpected, 12),
                             ("shape mismatches", shown, 10)])
    if problems:
        raise UserError(f"{source}: weights do not match the model config ({'; '.join(problems)})")


def compare_keys(expected: dict[str, tuple], given: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """The missing, unexpected and mis-shaped keys of ``given`` against ``expected`` (key -> shape), each sorted."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(given) & set(expected) if tuple(given[k]) != tuple(expected[k]))
    return missing, unexpected, wrong


def key_problems(groups: list[tuple[str, list[str], int]]) -> list[str]:
    """``"<label>: <keys>"`` for each ``(label, keys, limit)`` group that has keys, naming at most ``limit``."""
    return [f"{label}: {_names(keys, limit)}" for label, keys, limit in groups if keys]


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------
# Momentum encoders and queues
# --------------------------------------------------------------------------------------------------


def momentum_state_dict(momentum_encoders: nn.Module | None, queue: nn.Module | None) -> dict[str, torch.Tensor]:
    """Flat state of :class:`MomentumEncoders` and :class:`FeatureQueue`, in the checkpoint's key layout."""
    state: dict[str, torch.Tensor] = {}
    if momentum_encoders is not None:
        state.update(momentum_encoders.state_dict())
    if queue is not None:
        state.update(queue.state_dict())
    return state


def load_momentum_state(state: dict[str, torch.Tensor], momentum_encoders: nn.Module | None = None,
                        queue: nn.Module | None = None) -> None:
    """Restore momentum encoders and/or queues from ``state`` (as returned by :func:`momentum_state_dict`).

    The feature queues always carry over. The pointer and the image ids carry over only between queues of the
    same kind: a pre-training queue (no image ids) loaded into a retrieval/filter queue keeps its features,
    while the ids start unknown (-100) and the pointer at 0, as the official retrieval model loading a
    pre-trained checkpoint (its ``idx_queue``/``ptr_queue`` are not in the pre-trained file).
    """
    if momentum_encoders is not None:
        enc = {k: v for k, v in state.items() if k.startswith(MOMENTUM_PREFIXES)}
        result = momentum_encoders.load_state_dict(enc, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"momentum state does not match the momentum encoders (missing: "
                            f"{_names(result.missing_keys)}; unexpected: {_names(result.unexpected_keys)})")
    if queue is not None:
        q = {k: v for k, v in state.items() if k in QUEUE_KEYS}
        own = queue.state_dict()
        if ("idx_queue" in q) != ("idx_queue" in own) and all(k in q for k in FEATURE_QUEUE_KEYS):
            q = {k: q[k] for k in FEATURE_QUEUE_KEYS}  # another kind of queue: features only
            with torch.no_grad():
                queue.queue_ptr.zero_()
                if "idx_queue" in own:
                    queue.idx_queue.fill_(-100)
        elif set(q) != set(own):
            raise UserError(f"queue state has keys {sorted(q)}, the queue expects {sorted(own)}")
        for k, v in q.items():
            if v.shape != own[k].shape:
                raise UserError(f"queue tensor {k} has shape {tuple(v.shape)}, the queue expects "
                                f"{tuple(own[k].shape)} (model.queue_size differs?)")
        with torch.no_grad():
            for k, v in q.items():
                own[k].copy_(v)


def has_queues(state: dict[str, torch.Tensor] | None) -> bool:
    """Whether a momentum state holds the ITC feature queues."""
    return bool(state) and all(k in state for k in FEATURE_QUEUE_KEYS)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """A :class:`ModelConfig` as a plain dict (the ``model`` entry of ``config.json``)."""
    return to_dict(cfg)


def model_config_from_dict(d: dict, source: str = "config") -> ModelConfig:
    """Validate a stored model config through :func:`blip_core.config.config_from_dict`.

    The stored ``preset`` names the starting point and every stored value overrides the preset's.
    """
    if not isinstance(d, dict):
        raise UserError(f"{source}: 'model' must be a mapping")
    try:
        return config_from_dict({"model": d}).model
    except ConfigError as e:
        raise UserError(f"{source}: invalid model config: {e}") from None


def save_model_dir(dst: str | Path, model: BlipModel | BlipVQA, tokenizer: BlipTokenizer | None = None,
                    momentum_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and optionally its tokenizer and momentum/queue state) as a checkpoint directory.

    A :class:`BlipVQA` is recorded as ``"architecture": "blip_vqa"``; a :class:`BlipModel` has no entry.
    """
    dst = Path(dst)
    with atomic_directory(dst) as tmp:
        header = {"format": FORMAT, "version": VERSION, "model": model_config_to_dict(model.cfg)}
        if architecture_of(model) != ARCH_BLIP:
            header["architecture"] = architecture_of(model)
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")
        save_file(_contiguous(canonical_state_dict(model)), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if momentum_state:
            bad = sorted(k for k in momentum_state if not (k.startswith(MOMENTUM_PREFIXES) or k in QUEUE_KEYS))
            if bad:
                raise ValueError(f"momentum_state has keys outside the momentum/queue layout: {_names(bad)}")
            save_file(_contiguous(momentum_state), str(tmp / MOMENTUM_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
    return dst


def read_header(src: str | Path) -> dict:
    """Read and check ``config.json`` of a checkpoint directory."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"checkpoint directory not found: {src}")
    if not src.is_dir():
        raise UserError(f"{src} is not a directory: a blip_core checkpoint is a directory with {CONFIG_FILE}")
    path = src / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{src} is not a blip_core checkpoint: {CONFIG_FILE} is missing")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{path}: not a blip_core checkpoint config (expected \"format\": \"{FORMAT}\"); "
                        "use 'blip convert' for Hugging Face or official BLIP checkpoints")
    if header.get("version") != VERSION:
        raise UserError(f"{path}: unsupported checkpoint version {header.get('version')!r} (this code reads "
                        f"version {VERSION})")
    if "model" not in header:
        raise UserError(f"{path}: no 'model' entry")
    arch = header.get("architecture", ARCH_BLIP)
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: unknown architecture {arch!r} (this code reads {', '.join(ARCHITECTURES)})")
    return header


def checkpoint_architecture(src: str | Path) -> str:
    """``blip`` or ``blip_vqa``: the architecture recorded in a checkpoint directory's ``config.json``."""
    return read_header(src).get("architecture", ARCH_BLIP)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None


def with_image_size(cfg: ModelConfig, image_size: int | None, source: str = "checkpoint") -> ModelConfig:
    """``cfg`` at ``image_size`` pixels (``None``/0 keeps its own); the size must be a multiple of the patch."""
    if not image_size or image_size == cfg.vision.image_size:
        return cfg
    patch = cfg.vision.patch_size
    if image_size < 0 or image_size % patch:
        raise UserError(f"{source}: image size {image_size} is not a positive multiple of the model's patch size "
                        f"{patch}")
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size))


def load_model_dir(src: str | Path, *, with_momentum: bool = True, image_size: int | None = None) -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_model_dir`.

    Returns a :class:`Checkpoint` with the model (a :class:`BlipModel`, or a :class:`BlipVQA` for a checkpoint
    recorded as ``blip_vqa``) in eval mode, the tokenizer (None when the directory has
    none) and the momentum/queue state (None when absent or ``with_momentum`` is False). With ``image_size``
    (None or 0: the stored one) the model is built for that resolution and the position embeddings of the
    image encoder and its momentum copy are interpolated bicubically; ``Checkpoint.notes`` says so.
    """
    src = Path(src)
    header = read_header(src)
    stored = model_config_from_dict(header["model"], str(src / CONFIG_FILE))
    cfg = with_image_size(stored, image_size, str(src))
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{src}: {WEIGHTS_FILE} is missing")
    try:
        model = ARCHITECTURES[header.get("architecture", ARCH_BLIP)](cfg)
    except ValueError as e:
        raise UserError(f"{src}: cannot build the model: {e}") from None
    notes = load_canonical_file(model, weights, resize_pos_embed=cfg is not stored)
    model.eval()
    tokenizer = None
    tok_dir = src / TOKENIZER_DIR
    if tok_dir.is_dir():
        try:
            tokenizer = BlipTokenizer.from_dir(tok_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"{tok_dir}: cannot load the tokenizer ({e})") from None
        if len(tokenizer) > cfg.text.vocab_size:
            raise UserError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                            f"has {cfg.text.vocab_size} (model.text.vocab_size): token ids past it cannot be "
                            "embedded; use the tokenizer the checkpoint was trained with")
    momentum = None
    if with_momentum and (src / MOMENTUM_FILE).is_file():
        momentum = _read_safetensors(src / MOMENTUM_FILE)
        key = "visual_encoder_m.pos_embed"
        if cfg is not stored and key in momentum:
            want = model.visual_encoder.pos_embed.shape
            if _resizable(tuple(momentum[key].shape), tuple(want)):
                momentum[key], note = fit_pos_embed(key, momentum[key], want[1] - 1)
                notes += [note] if note else []
    return Checkpoint(model=model, tokenizer=tokenizer, momentum_state=momentum, notes=notes)
