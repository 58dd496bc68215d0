"""Small builders shared by the model tests: a tiny BLIP and a batch of random inputs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from blip_core import build_model, model_preset
from blip_core.config import TrainConfig
from blip_core.objectives import CaptionerObjective, SpecialIds

VOCAB = 100
IDS = SpecialIds(cls=2, enc=VOCAB - 1, dec=VOCAB - 2, pad=0)


def tiny_model(seed: int = 0, text: dict | None = None, **vision_overrides):
    """The `tiny` preset with ``vision_overrides`` and ``text`` (a dict of TextConfig fields) applied."""
    torch.manual_seed(seed)
    cfg = model_preset("tiny")
    if vision_overrides:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides))
    if text:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))
    return build_model(cfg, vocab_size=VOCAB)


def tiny_batch(batch: int = 4, length: int = 9, seed: int = 1, image_size: int = 32):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(5, VOCAB - 3, (batch, length), generator=g)
    ids[:, 0] = IDS.cls
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # right padding of varying length, [SEP]=3 before it
        n = length - (b % 3)
        ids[b, n - 1] = 3
        ids[b, n:] = IDS.pad
        mask[b, n:] = 0
    ids[0, -1] = 3
    return image, ids, mask


def torchrun2(script: Path, *args: str) -> None:
    """Run ``script`` under ``torch.distributed.run`` as 2 gloo processes (one thread each); fail on an error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- gradient accumulation (tests/test_train_loop.py)

ACCUM_BATCH = 8  # rows of the one batch that every grad_accum layout splits differently
GRAD_ACCUM_CFG = TrainConfig(epochs=1, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=0, weight_decay=0.05,
                             max_steps=1, log_every=1)


def lm_objective():
    """The captioner objective (LM only: no queue, no sampled negatives) on a tiny model without dropout, so
    the loss of a batch is the mean of its rows' token losses and gradients add up exactly over micro-batches.
    The parts it never uses are frozen as the captioner stage does (DDP reduces only parameters that get a
    gradient)."""
    from blip_core.config import load_config
    from components.tasks import get_task

    model = get_task("captioner").prepare_model(tiny_model(seed=0, text={"dropout": 0.0}), load_config(None, []))
    return CaptionerObjective(model, IDS)


def accum_rows(rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of one fixed batch of ``ACCUM_BATCH`` captions, all of the same length (no padding)."""
    image, ids, mask = tiny_batch(batch=ACCUM_BATCH, seed=11)
    ids[:, -1] = 3
    ids[ids == IDS.pad] = 7
    mask = torch.ones_like(mask)
    return {"image": image[rows], "input_ids": ids[rows], "attention_mask": mask[rows]}


class RowSource:
    """A batch source whose epoch is the given micro-batches (lists of rows of :func:`accum_rows`)."""

    def __init__(self, micro_batches: list[list[int]]) -> None:
        self.micro = micro_batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.micro)

    def batches(self, epoch: int, skip: int = 0):
        for rows in self.micro[skip:]:
            yield accum_rows(rows)
