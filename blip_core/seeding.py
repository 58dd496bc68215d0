"""Seeds and random generators: the one place where the project creates a :class:`torch.Generator`.

A generator must live on the device of the tensors it draws for: ``torch.multinomial`` on a CUDA tensor
refuses a CPU generator. :func:`make_generator` therefore always takes the device, and every random draw of
the library and the stages (hard negatives, nucleus sampling, benchmark inputs) goes through it.

Seeds for a training micro-batch or a CapFilt shard are derived from ``(seed, step, rank)`` by
:func:`derive_seed`, so a run is reproducible on a given device (CPU and CUDA generators give different
streams for the same seed).
"""

from __future__ import annotations

import torch

_SEED_RANGE = 2**63 - 1


def derive_seed(seed: int, step: int = 0, rank: int = 0) -> int:
    """A non-negative seed for ``(seed, step, rank)``: distinct steps and ranks get distinct streams."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % _SEED_RANGE


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a :class:`torch.device`) seeded with ``seed``.

    ``seed`` is used as given; pass :func:`derive_seed` of ``(seed, step, rank)`` for per-step streams.
    """
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))
