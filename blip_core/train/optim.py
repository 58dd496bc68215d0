"""AdamW with BLIP's settings, the paper's learning-rate schedules and the momentum-distillation alpha ramp."""

from __future__ import annotations

import math

import torch
from torch import nn

from blip_core.config import TrainConfig


def build_optimizer(module: nn.Module, cfg: TrainConfig, no_decay_names: set[str] = frozenset()) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (weight decay ``cfg.weight_decay``).

    With ``cfg.no_decay_norm_bias`` the 1-d parameters (norms, biases), the temperature and ``no_decay_names``
    (position and class embeddings) get no weight decay; otherwise one group, as the official code.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not cfg.no_decay_norm_bias:
        return torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay, no_decay = [], []
    for n, p in params:
        base = n.split("module.", 1)[-1]
        bare = base.split("model.", 1)[-1]
        (no_decay if p.ndim <= 1 or bare in no_decay_names else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )


def learning_rate(cfg: TrainConfig, step: int, epoch: int) -> float:
    """The learning rate for optimizer ``step`` (global) in ``epoch``.

    ``step`` schedule (pre-training): epoch 0 warms up linearly from ``warmup_lr`` to ``lr`` over
    ``warmup_steps`` steps; epoch ``e >= 1`` uses ``max(min_lr, lr * lr_decay_rate ** e)`` for the whole epoch.
    ``cosine`` schedule (fine-tuning): per epoch, ``min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2``,
    after an optional linear warm-up.
    """
    if cfg.schedule == "step":
        target = cfg.lr if epoch == 0 else max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate**epoch)
    else:
        target = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (target - cfg.warmup_lr) * step / cfg.warmup_steps
    return target


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def alpha_at(alpha: float, ramp_epochs: float, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Momentum-distillation weight ramped linearly over the first ``ramp_epochs`` epochs (BLIP: 2 epochs)."""
    if ramp_epochs <= 0 or steps_per_epoch <= 0:
        return alpha
    progress = (epoch * steps_per_epoch + step_in_epoch) / (ramp_epochs * steps_per_epoch)
    return alpha * min(1.0, progress)
