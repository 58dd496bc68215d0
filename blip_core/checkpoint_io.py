"""The blip_core checkpoint directory: safetensors weights, a JSON config and a Hugging Face tokenizer.

Layout of a checkpoint directory::

    config.json            {"format": "blip_core", "version": 1, "model": <ModelConfig as a dict>}
    model.safetensors      BlipModel weights, each shared tensor stored once under its canonical name
    momentum.safetensors   optional: momentum encoders (visual_encoder_m.*, vision_proj_m.*, text_encoder_m.*,
                           text_proj_m.*) and ITC queues (image_queue, text_queue, queue_ptr, idx_queue)
    tokenizer/             optional: Hugging Face tokenizer directory (BlipTokenizer.save)

The text encoder shares everything but self-attention with the decoder, and the LM output matrix is tied to
the word embeddings; safetensors refuses aliased tensors, so only the first name of each shared tensor (in
``BlipModel.named_parameters()`` order) is written. A freshly constructed model re-creates the ties, so
loading needs the canonical names only.

Writes are atomic: the directory is assembled under a temporary sibling name and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from blip_core.config import ConfigError, ModelConfig, config_from_dict, to_dict
from blip_core.errors import UserError
from blip_core.models.blip import BlipModel
from blip_core.tokenizer import BlipTokenizer

FORMAT = "blip_core"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MOMENTUM_FILE = "momentum.safetensors"
TOKENIZER_DIR = "tokenizer"

MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


@dataclass
class Checkpoint:
    """A loaded (or converted) model with its tokenizer and optional momentum/queue state.

    ``notes`` lists what a conversion did beyond a one-to-one copy (initialised or ignored tensors).
    """

    model: BlipModel
    tokenizer: BlipTokenizer | None = None
    momentum_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)

    def save(self, dst: str | Path) -> Path:
        """Write this checkpoint as a blip_core directory."""
        return save_checkpoint(dst, self.model, self.tokenizer, self.momentum_state)


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


def load_canonical_file(model: nn.Module, path: Path) -> None:
    """Stream a canonical safetensors file into ``model`` one tensor at a time (no second full copy)."""
    expected = canonical_state_dict(model)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            _check_keys(expected, shapes, str(path))
            with torch.no_grad():
                for k, t in expected.items():
                    t.copy_(f.get_tensor(k))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None


def _check_keys(expected: dict[str, torch.Tensor], shapes: dict[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        problems.append("shape mismatches: " + ", ".join(
            f"{k} {shapes[k]} vs model {tuple(expected[k].shape)}" for k in wrong[:10]))
    if problems:
        raise UserError(f"{source}: weights do not match the model config ({'; '.join(problems)})")


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
    """Restore momentum encoders and/or queues from ``state`` (as returned by :func:`momentum_state_dict`)."""
    if momentum_encoders is not None:
        enc = {k: v for k, v in state.items() if k.startswith(MOMENTUM_PREFIXES)}
        result = momentum_encoders.load_state_dict(enc, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"momentum state does not match the momentum encoders (missing: "
                            f"{_names(result.missing_keys)}; unexpected: {_names(result.unexpected_keys)})")
    if queue is not None:
        q = {k: v for k, v in state.items() if k in QUEUE_KEYS}
        own = queue.state_dict()
        if set(q) != set(own):
            raise UserError(f"queue state has keys {sorted(q)}, the queue expects {sorted(own)}")
        for k, v in q.items():
            if v.shape != own[k].shape:
                raise UserError(f"queue tensor {k} has shape {tuple(v.shape)}, the queue expects "
                                f"{tuple(own[k].shape)} (model.queue_size differs?)")
        queue.load_state_dict(q)


# --------------------------------------------------------------------------------------------------
# Atomic directory writes
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``dst`` when the block succeeds.

    An existing ``dst`` is moved aside first and deleted only after the new directory is in place.
    On failure the temporary directory is removed and ``dst`` is left as it was.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        if not dst.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{dst} exists and is not a directory")
        old = dst.parent / f".{dst.name}.old-{tag}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def save_checkpoint(dst: str | Path, model: BlipModel, tokenizer: BlipTokenizer | None = None,
                    momentum_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and optionally its tokenizer and momentum/queue state) as a checkpoint directory."""
    dst = Path(dst)
    with atomic_directory(dst) as tmp:
        header = {"format": FORMAT, "version": VERSION, "model": model_config_to_dict(model.cfg)}
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
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None


def load_checkpoint(src: str | Path, *, with_momentum: bool = True) -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint` (or ``BlipModel.save``).

    Returns a :class:`Checkpoint` with the model in eval mode, the tokenizer (None when the directory has
    none) and the momentum/queue state (None when absent or ``with_momentum`` is False).
    """
    src = Path(src)
    header = read_header(src)
    cfg = model_config_from_dict(header["model"], str(src / CONFIG_FILE))
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{src}: {WEIGHTS_FILE} is missing")
    try:
        model = BlipModel(cfg)
    except ValueError as e:
        raise UserError(f"{src}: cannot build the model: {e}") from None
    load_canonical_file(model, weights)
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
    return Checkpoint(model=model, tokenizer=tokenizer, momentum_state=momentum)


def is_checkpoint_dir(path: str | Path) -> bool:
    """True when ``path`` holds a blip_core ``config.json``."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
