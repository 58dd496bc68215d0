"""BLIP's three losses as pure tensor functions: ITC, ITM and LM, plus hard-negative sampling for ITM.

Every loss is computed in fp32 whatever the dtype of its logits (bf16 under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LABEL_SMOOTHING = 0.1


def soft_targets(sim_m: torch.Tensor, hard: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum-distillation targets: ``alpha * softmax(sim_m) + (1 - alpha) * hard``.

    Args:
        sim_m: momentum similarities ``(B, C)`` (already divided by the temperature).
        hard: ground-truth target distribution ``(B, C)`` (one-hot, or uniform over several positives).
        alpha: distillation weight in [0, 1].
    """
    if alpha == 0:
        return hard
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_j targets_bj * log_softmax(logits)_bj``."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss: the mean of the two directions' soft cross-entropies."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """BLIP's ITM layout: ``[1] * B`` positives then ``[0] * 2B`` negatives."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching: plain cross-entropy over ``(N, 2)`` logits (class 1 = match)."""
    return F.cross_entropy(logits.float(), labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token loss: ``logits[:, :-1]`` against ``labels[:, 1:]``, ignoring ``IGNORE_INDEX``.

    ``reduction="mean"`` averages over all non-ignored tokens of the batch; ``"sum_per_sequence"`` returns
    one summed loss per sequence ``(B,)`` (the official ``reduction='none'`` behaviour).
    """
    shifted = logits[:, :-1].float().contiguous()  # (B, L-1, V)
    targets = labels[:, 1:].contiguous()  # (B, L-1)
    if reduction == "mean":
        return F.cross_entropy(shifted.view(-1, shifted.shape[-1]), targets.view(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    if reduction == "sum_per_sequence":
        per_token = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                    label_smoothing=label_smoothing, reduction="none")  # (B, L-1)
        return per_token.sum(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}")


@torch.no_grad()
def negative_weights(sim: torch.Tensor, same: torch.Tensor | None = None, eps: float = 1e-4,
                     own: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling weights for hard negatives from similarities ``(B, C)`` of each anchor to ``C`` candidates.

    Pre-training (``same=None``, square ``sim``): ``softmax(sim) + eps`` with the diagonal zeroed. Retrieval
    fine-tuning (``same`` = boolean ``(B, C)`` "candidate shows the anchor's image"): ``softmax(sim)`` with
    every same-image entry zeroed. ``own`` (boolean ``(B, C)``) marks each anchor's own pair; default the
    diagonal of a square ``sim``. A row left with no candidate (every other pair shows the same image) falls
    back to uniform over all but its own pair.
    """
    if own is None:
        own = torch.eye(sim.shape[0], sim.shape[1], dtype=torch.bool, device=sim.device)
    weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), nan=0.0)  # a diverged step must not crash here
    if same is None:
        weights = (weights + eps).masked_fill(own, 0)
    else:
        weights = weights.masked_fill(same | own, 0)
    empty = weights.sum(dim=1) <= 0
    if empty.any():
        fallback = (~own).float()
        weights[empty] = fallback[empty]
        still = weights.sum(dim=1) <= 0  # batch of one: nothing but itself
        weights[still] = own[still].float()
    return weights


@torch.no_grad()
def sample_hard_negatives(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``weights`` ``(B, B)`` in one vectorised call (repeats allowed)."""
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)
