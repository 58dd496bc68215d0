"""Small builders shared by the model tests: a tiny BLIP and a batch of random inputs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from blip_core import build_model, model_preset
from blip_core.objectives import SpecialIds

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
