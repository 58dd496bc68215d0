"""The training loop shared by pre-training and both fine-tuning stages.

The loop knows no task: it drives an :class:`~blip_core.objectives.Objective` through its interface only.
Per optimizer step: forward/backward over ``grad_accum`` micro-batches (DDP gradient sync only on the last;
each batch becomes the objective's arguments through ``objective.inputs``, and ``objective.enqueue`` runs after
its backward, e.g. filling the momentum feature queues), optional gradient clipping, optimizer step, then
``objective.after_step`` (the BLIP objectives clamp the temperature and update their momentum encoders there).
Learning rate and the momentum-distillation alpha follow :mod:`blip_core.train.optim`. Random state (dropout, hard negatives) is seeded from ``(seed, step, rank)`` at
every micro-batch, so a run resumed from a checkpoint reproduces an uninterrupted one exactly.

A non-finite loss stops the run with :class:`TrainingDiverged`, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from blip_core.config import TrainConfig
from blip_core.errors import UserError
from blip_core.objectives import Objective
from blip_core.seeding import derive_seed, make_generator
from blip_core.train import distributed as D
from blip_core.train.checkpoint import (
    TrainPosition,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from blip_core.train.optim import alpha_at, learning_rate, set_learning_rate

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class BatchSource(Protocol):
    """Batches for one rank: the same number per epoch on every rank, deterministic per epoch."""

    @property
    def batches_per_epoch(self) -> int: ...

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict]: ...


@dataclass
class TrainResult:
    position: TrainPosition
    last_losses: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    pairs_per_second: float = 0.0
    data_time_share: float = 0.0
    log: list[dict] = field(default_factory=list)  # every record given to log_fn, those before a resume included


def _seed_step(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the global RNGs (dropout; every device) and return the generator for explicit draws on ``device``."""
    s = derive_seed(seed, micro_step, rank)
    torch.manual_seed(s)
    random.seed(s)
    return make_generator(device, s + 1)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data: BatchSource,
    *,
    checkpoint_dir: str | Path,
    info: D.DistInfo | None = None,
    alpha: float = 0.4,
    config_dict: dict | None = None,
    resume: bool = True,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    on_epoch_end: Callable[[TrainPosition], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run ``cfg.epochs`` epochs (or ``cfg.max_steps`` optimizer steps) of ``objective`` on ``data``.

    ``objective`` is the unwrapped objective module; it is wrapped in DDP here when ``info`` is distributed.
    Checkpoints go to ``checkpoint_dir`` (rank 0 only) every ``cfg.checkpoint_every`` steps and at the end;
    with ``resume`` the newest checkpoint there is loaded first. ``on_epoch_end(position)`` runs on every rank
    after each completed epoch (``position.epoch`` epochs done), e.g. to score the model on a validation split;
    it must leave the model in training mode.

    The records given to ``log_fn`` and the last losses are kept in the checkpoints, so that a resumed run
    returns the whole training log in :attr:`TrainResult.log`, and its last losses even when nothing was left
    to train.
    """
    info = info or D.DistInfo()
    inner = objective
    ckpt_root = Path(checkpoint_dir)
    position, resumed_from, kept = _resume_position(ckpt_root, inner, optimizer, resume, config_dict)
    trainable = [p for p in inner.parameters() if p.requires_grad]
    ddp = D.wrap_ddp(inner, info)

    per_epoch = data.batches_per_epoch
    steps_per_epoch, total_steps = _step_counts(cfg, per_epoch)
    # bf16 autocast on the training device (CUDA or CPU); weights, optimizer state and losses stay fp32.
    autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16)
                if cfg.precision == "bf16" else contextlib.nullcontext())
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=position.step, desc="train", unit="step", dynamic_ncols=True)

    last_ckpt: Path | None = resumed_from
    logged: list[dict] = list(kept.get("log", []))
    last_losses: dict[str, float] = dict(kept.get("last_losses", {}))
    meter = _Throughput()
    ddp.train()
    while position.step < total_steps and position.epoch < cfg.epochs:
        epoch = position.epoch
        it = data.batches(epoch, skip=position.batch_in_epoch)
        usable = steps_per_epoch * cfg.grad_accum
        while position.batch_in_epoch < usable and position.step < total_steps:
            lr = learning_rate(cfg, position.step, epoch)
            set_learning_rate(optimizer, lr)
            a = alpha_at(alpha, cfg.alpha_ramp_epochs, epoch, position.step - epoch * steps_per_epoch,
                         steps_per_epoch)
            parts_sum = _optimizer_step(ddp, inner, optimizer, it, cfg, info, position, epoch=epoch,
                                        per_epoch=per_epoch, alpha=a, autocast=autocast, trainable=trainable,
                                        meter=meter, last_ckpt=last_ckpt)
            last_losses = {**parts_sum, "loss": sum(parts_sum.values())}
            if bar is not None:
                bar.set_postfix(loss=f"{last_losses['loss']:.3f}", pairs_s=f"{meter.pairs_per_second():.1f}")
                bar.update(1)
            if log_fn is not None and info.is_main and (position.step % max(1, cfg.log_every) == 0
                                                        or position.step == total_steps):
                values = _logged_values(parts_sum, last_losses["loss"], lr=lr, alpha=a, objective=inner, epoch=epoch,
                                        meter=meter, world_size=info.world_size)
                logged.append({"step": position.step, **values})
                log_fn(position.step, values)
            if cfg.checkpoint_every and position.step % cfg.checkpoint_every == 0 and position.step < total_steps:
                last_ckpt = _checkpoint(ckpt_root, inner, optimizer, position, config_dict, info, on_checkpoint,
                                        {"log": logged, "last_losses": last_losses})
        if position.batch_in_epoch >= usable:
            position.epoch += 1
            position.batch_in_epoch = 0
            if on_epoch_end is not None:
                on_epoch_end(position)
    if bar is not None:
        bar.close()
    # a resumed run that had nothing left to train reports the rates of the run that trained
    rates = ({"pairs_per_second": meter.pairs_per_second(info.world_size), "data_time_share": meter.data_time_share()}
             if meter.pairs or "rates" not in kept else kept["rates"])
    last_ckpt = _checkpoint(ckpt_root, inner, optimizer, position, config_dict, info, on_checkpoint,
                            {"log": logged, "last_losses": last_losses, "rates": rates})
    return TrainResult(position=position, last_losses=last_losses, checkpoint=last_ckpt, resumed_from=resumed_from,
                       log=logged, **rates)


@dataclass
class _Throughput:
    """Pairs trained since the start, and the time spent waiting for batches and computing."""

    t_start: float = field(default_factory=time.perf_counter)
    pairs: int = 0
    data_time: float = 0.0
    compute_time: float = 0.0

    def pairs_per_second(self, world_size: int = 1) -> float:
        return self.pairs * world_size / max(time.perf_counter() - self.t_start, 1e-9)

    def data_time_share(self) -> float:
        return self.data_time / max(self.data_time + self.compute_time, 1e-9)


def _logged_values(parts: dict[str, float], loss: float, *, lr: float, alpha: float, objective: Objective,
                   epoch: int, meter: _Throughput, world_size: int) -> dict[str, float]:
    """What ``log_fn`` gets after a step: each loss part (``loss_<part>``) and their sum, the learning rate,
    alpha, the objective's own values, the epoch and the throughput."""
    return {**{f"loss_{k}": v for k, v in parts.items()}, "loss": loss, "lr": lr, "alpha": alpha,
            **objective.log_values(), "epoch": float(epoch), "pairs_per_second": meter.pairs_per_second(world_size),
            "data_time_share": meter.data_time_share()}


def _resume_position(ckpt_root: Path, objective: Objective, optimizer: torch.optim.Optimizer, resume: bool,
                     config_dict: dict | None) -> tuple[TrainPosition, Path | None, dict]:
    """The position to start from, the checkpoint it was loaded from (None: a fresh start) and what the loop
    kept in that checkpoint (its training log and last losses; empty on a fresh start)."""
    if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
        if _same_config(latest, config_dict):
            position, state = load_training_state(latest, objective, optimizer)
            return position, latest, dict(state.get("extra") or {})
        log.warning("not resuming from %s: it was written with another config or other data; starting over",
                    latest)
    return TrainPosition(), None, {}


def _step_counts(cfg: TrainConfig, per_epoch: int) -> tuple[int, int]:
    """Optimizer steps per epoch and in all, from the batches per epoch of one rank."""
    if per_epoch < cfg.grad_accum:
        raise UserError(f"{per_epoch} batches per epoch per rank: fewer than grad_accum={cfg.grad_accum}; "
                        "use more data or a smaller batch size")
    steps_per_epoch = per_epoch // cfg.grad_accum
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


def _optimizer_step(ddp, inner: Objective, optimizer: torch.optim.Optimizer, it: Iterator[dict], cfg: TrainConfig,
                    info: D.DistInfo, position: TrainPosition, *, epoch: int, per_epoch: int, alpha: float,
                    autocast, trainable: list[torch.nn.Parameter], meter: _Throughput,
                    last_ckpt: Path | None) -> dict[str, float]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches of ``it``; returns the loss parts averaged over
    them. Advances ``position`` (batch in epoch, step) and ``meter``."""
    optimizer.zero_grad(set_to_none=True)
    parts_sum: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        meter.data_time += t1 - t0
        batch = _to_device(batch, info.device)
        micro_index = epoch * per_epoch + position.batch_in_epoch
        gen = _seed_step(cfg.seed, micro_index, info.rank, info.device)
        sync = micro == cfg.grad_accum - 1
        ctx = ddp.no_sync() if (info.distributed and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast:
                out = ddp(**inner.inputs(batch, alpha=alpha, generator=gen))
            if not torch.isfinite(out.loss):
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss is {float(out.loss)} at step {position.step} (epoch {epoch}, batch "
                    f"{position.batch_in_epoch}); {where}. Lower the learning rate or check the data.")
            (out.loss / cfg.grad_accum).backward()
        inner.enqueue(out)
        for k, v in out.parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        position.batch_in_epoch += 1
        meter.pairs += out.samples
        meter.compute_time += time.perf_counter() - t1
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    optimizer.step()
    inner.after_step()
    position.step += 1
    return parts_sum


def _same_config(checkpoint: Path, config_dict: dict | None) -> bool:
    """Whether a checkpoint was written by a run with this config (JSON-normalised comparison)."""
    saved = json.loads((checkpoint / "train_state.json").read_text()).get("config")
    return _stable(saved) == run_identity(config_dict)


def run_identity(config_dict: dict | None):
    """The part of a run's config that must match for a checkpoint to be resumed (JSON-normalised)."""
    return _stable(json.loads(json.dumps(config_dict or {})))


# Settings that may change between a run and its resumption (how long and how often, not what is trained).
_RESUMABLE_CHANGES = frozenset({"max_steps", "checkpoint_every", "log_every", "compile", "num_workers"})


def _stable(tree):
    if isinstance(tree, dict):
        return {k: _stable(v) for k, v in tree.items() if k not in _RESUMABLE_CHANGES}
    return tree


def _checkpoint(root, objective, optimizer, position, config_dict, info, on_checkpoint, kept: dict) -> Path | None:
    path = None
    if info.is_main:
        path = save_training_state(root, objective, optimizer, position, config_dict or {}, extra=kept)
        if on_checkpoint is not None:
            on_checkpoint(path)
    D.barrier()
    return path if info.is_main else latest_checkpoint(root)

