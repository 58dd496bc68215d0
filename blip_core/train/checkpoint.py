"""Training checkpoints: atomic save and exact resume.

A checkpoint is a directory ``<root>/step-XXXXXXXX/`` holding

* ``objective.safetensors``: the training objective's full state (model, momentum encoders, queues); tensors
  shared between the text encoder and decoder are stored once and re-tied on load;
* ``optimizer.safetensors`` + the optimizer's non-tensor state in ``train_state.json``;
* ``train_state.json``: config, global step, epoch, position within the epoch (batches consumed), the
  optimizer's param groups and scalar state, and the RNG scheme (random state is re-derived from
  ``(seed, step, rank)`` at every step, so a resumed run draws the same numbers as an uninterrupted one).

It is written under a temporary name and renamed, and ``<root>/latest.json`` (also replaced atomically)
names the newest complete checkpoint: a run killed mid-write leaves the previous checkpoint current.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

FORMAT_VERSION = 1


@dataclass
class TrainPosition:
    """Where a run is: optimizer steps done, current epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_checkpoint(root: str | Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    position: TrainPosition, config: dict, keep: int = 2, extra: dict | None = None) -> Path:
    """Write a checkpoint of ``objective`` + ``optimizer`` at ``position`` and mark it latest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position.step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest.json", json.dumps({"checkpoint": name, **asdict(position)}))
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none)."""
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    path = Path(root) / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / "train_state.json").is_file() else None


def load_checkpoint_into(path: str | Path, objective: nn.Module,
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
