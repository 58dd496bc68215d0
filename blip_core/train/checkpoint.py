"""Training checkpoints: atomic save and exact resume.

A checkpoint is a directory ``<root>/step-XXXXXXXX/`` holding

* ``objective.safetensors``: the training objective's full state (model, momentum encoders, queues); tensors
  shared between the text encoder and decoder are stored once and re-tied on load;
* ``optimizer.safetensors`` + the optimizer's non-tensor state in ``train_state.json``;
* ``train_state.json``: config, global step, epoch, position within the epoch (batches consumed), the
  optimizer's param groups and scalar state, and the RNG scheme (random state is re-derived from
  ``(seed, step, rank)`` at every step, so a resumed run draws the same numbers as an uninterrupted one).

Crash safety: a checkpoint is written into ``<root>/.step-XXXXXXXX.tmp-<tag>/``, every file and the directory
are fsynced, and only then is it renamed to ``step-XXXXXXXX`` (an existing directory of that name is first
renamed aside to ``.step-XXXXXXXX.old-<tag>``, and deleted only after the new one is in place).
``<root>/latest.json`` is replaced atomically last, and names the newest complete checkpoint. Whatever the
moment a run is killed, :func:`latest_checkpoint` finds a complete checkpoint: the one ``latest.json`` names,
else (a crash between the steps) the newest complete ``step-*`` directory, restoring one that was renamed
aside. When ``latest.json`` names a checkpoint that is gone and no other exists it raises
:class:`CheckpointMissing` instead of letting the run start again from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from blip_core.errors import UserError
from blip_core.io import atomic_directory, atomic_write

FORMAT_VERSION = 1
LATEST = "latest.json"
_FILES = ("objective.safetensors", "optimizer.safetensors", "train_state.json")  # train_state.json last

log = logging.getLogger(__name__)


class CheckpointMissing(UserError):
    """``latest.json`` names a checkpoint that is gone and no other complete checkpoint exists."""


@dataclass
class TrainPosition:
    """Where a run is: optimizer steps done, current epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory holding every file of a checkpoint."""
    return path.is_dir() and all((path / f).is_file() for f in _FILES)


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(root: str | Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    position: TrainPosition, config: dict, keep: int = 2, extra: dict | None = None) -> Path:
    """Write a checkpoint of ``objective`` + ``optimizer`` at ``position`` and mark it latest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position.step:08d}"
    final = root / name
    for stale in root.glob(".step-*.tmp-*"):  # left by a save that was killed (only rank 0 writes here)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(final) as tmp:  # an existing step directory is renamed aside until this one is in
        save_model(objective, str(tmp / "objective.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "format_version": FORMAT_VERSION,
            "position": asdict(position),
            "optimizer": opt_meta,
            "config": config,
            "rng": "per-step: torch/python seeded from (train.seed, step, rank)",
            "extra": extra or {},
        }
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
    with atomic_write(root / LATEST, "w") as f:
        f.write(json.dumps({"checkpoint": name, **asdict(position)}))
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_aside(root: Path) -> None:
    """Rename back a checkpoint left aside by a crash between replacing it and deleting the old copy."""
    for aside in sorted(root.glob(".step-*.old-*")):
        name = aside.name[1:].split(".old-", 1)[0]
        if not (root / name).exists() and is_complete(aside):
            os.replace(aside, root / name)
            log.warning("restored checkpoint %s left aside by an interrupted save", root / name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none).

    Normally the one ``latest.json`` names. After a crash between the steps of a save it is the newest
    complete ``step-*`` directory (with a warning); when ``latest.json`` names a checkpoint that is gone and
    there is no other, :class:`CheckpointMissing` is raised: a run never silently restarts from step 0.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    _restore_aside(root)
    pointer = root / LATEST
    named: str | None = None
    if pointer.is_file():
        try:
            named = str(json.loads(pointer.read_text())["checkpoint"])
        except (ValueError, KeyError, TypeError):
            named = "(unreadable latest.json)"
        if "/" not in named and is_complete(root / named):
            return root / named
    complete = sorted(p for p in root.glob("step-*") if is_complete(p))
    if complete:
        if named is not None:
            log.warning("%s names %s, which is missing or incomplete; resuming from %s instead",
                        pointer, named, complete[-1].name)
        else:
            log.warning("%s has checkpoints but no %s (interrupted save); resuming from %s", root, LATEST,
                        complete[-1].name)
        return complete[-1]
    if named is not None:
        raise CheckpointMissing(f"{pointer} names checkpoint {named}, which is missing or incomplete, and no "
                                f"other complete checkpoint is in {root}; restore it, or start over without "
                                "resuming (delete that directory)")
    return None


def load_training_state(path: str | Path, objective: nn.Module,
                         optimizer: torch.optim.Optimizer | None = None) -> tuple[TrainPosition, dict]:
    """Restore ``objective`` (and ``optimizer``) from a checkpoint; returns its position and state JSON."""
    path = Path(path)
    state = json.loads((path / "train_state.json").read_text())
    missing, unexpected = load_model(objective, str(path / "objective.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:10]}, "
                         f"unexpected {sorted(unexpected)[:10]}")
    if optimizer is not None:
        _optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    return TrainPosition(**state["position"]), state
