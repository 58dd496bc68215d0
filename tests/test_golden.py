"""Golden regression: the loss curve of a short `tiny` pre-training, pinned to committed values.

The run is fully deterministic on the CPU (seeded model, fixed in-memory batches, one thread, every random draw
re-seeded per micro-batch), so any change to the model, the losses, the objectives, the optimizer, the
schedules or the training loop that changes what is computed shows up as a changed curve, even when the
change is too small for any behavioural test to notice.

When a change is *meant* to alter the numbers (a fix, a new default), regenerate the file deliberately and
commit it together with that change, saying why in the commit message::

    BLIP_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py

That run writes ``tests/assets/golden_pretrain_tiny.json`` and skips; review its diff before committing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from blip_testing import IDS, tiny_batch, tiny_model

from blip_core.config import TrainConfig
from blip_core.objectives import PretrainObjective
from blip_core.train.loop import train
from blip_core.train.optim import build_optimizer

GOLDEN = Path(__file__).parent / "assets" / "golden_pretrain_tiny.json"
RTOL = 1e-5  # far below any real change, above float summation-order noise of one build on one CPU type
CFG = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=3, warmup_lr=1e-5, weight_decay=0.05, log_every=1)


class _Batches:
    batches_per_epoch = 5

    def batches(self, epoch, skip=0):
        for i in range(skip, self.batches_per_epoch):
            image, ids, mask = tiny_batch(batch=4, seed=1000 + 10 * epoch + i)
            yield {"image": image, "input_ids": ids, "attention_mask": mask}


def _curve(tmp_path) -> dict:
    torch.set_num_threads(1)  # one summation order (conftest restores the thread count)
    objective = PretrainObjective(tiny_model(seed=0), IDS, queue_size=12)
    optimizer = build_optimizer(objective, CFG)
    steps: list[dict[str, float]] = []
    train(objective, optimizer, CFG, _Batches(), checkpoint_dir=tmp_path, progress=False, alpha=0.4,
          log_fn=lambda step, m: steps.append({k: m[k] for k in ("loss", "loss_itc", "loss_itm", "loss_lm", "lr")}))
    weights = torch.cat([p.detach().flatten() for p in objective.model.parameters()])
    return {"steps": steps, "temp": float(objective.model.temp.detach()), "weight_sum": float(weights.double().sum()),
            "weight_sq_sum": float(weights.double().square().sum())}


def test_tiny_pretraining_loss_curve_is_unchanged(tmp_path):
    got = _curve(tmp_path)
    if os.environ.get("BLIP_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}: review and commit it with the change that moved the numbers")
    want = json.loads(GOLDEN.read_text())
    assert len(got["steps"]) == len(want["steps"]) == 10
    for i, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=RTOL), f"step {i + 1} {k}: {g[k]!r}, pinned {w[k]!r}"
    for k in ("temp", "weight_sum", "weight_sq_sum"):
        assert got[k] == pytest.approx(want[k], rel=RTOL), k
