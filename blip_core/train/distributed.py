"""Distributed helpers: the only module of the project that uses ``torch.distributed``.

Under ``torchrun`` (env:// rendezvous: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``)
:func:`init_from_env` starts a process group (gloo on CPU, nccl on GPU). A plain single process needs none:
every helper here degrades to the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order; no gradient). Identity alone.

    Ranks may hold different batch sizes (a short final batch): sizes are exchanged first and padded.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _gather(tensor)[0]


def _gather(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``tensor`` concatenated along dim 0, and each rank's row count."""
    n = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes_t = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s) for s in sizes_t]
    max_size = max(sizes)
    padded = tensor
    if tensor.shape[0] < max_size:
        pad = tensor.new_zeros((max_size - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    out = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's rows in rank order. Backward: the gradient of the gathered tensor summed over
    ranks (each rank's loss may use any rank's rows), this rank's slice returned."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered, sizes = _gather(tensor.detach())
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.size = tensor.shape[0]
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.start + ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_cat` through which gradients flow back to the rank that owns each row.

    Used for ITM negatives drawn from every rank (``finetune_filter.negative_all_rank``): a rank's loss on
    another rank's image reaches that image's encoder. The backward all-reduces (sums) the gradient, so
    together with DDP's averaging every parameter gets the gradient of the mean loss over ranks.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``tensor`` over ranks, returned on ``tensor``'s device. Identity alone."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    t = tensor.to("cuda" if dist.get_backend() == "nccl" else tensor.device, copy=True)
    dist.all_reduce(t)
    return t.to(tensor.device)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed; buffers (queues) are kept in sync by the code."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
