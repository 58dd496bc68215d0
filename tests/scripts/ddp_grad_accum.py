"""One optimizer step of ``train()`` on 2 gloo processes with ``grad_accum=2`` (DDP ``no_sync`` on the first
micro-batch); each rank saves its gradients and weights after the step.

Rank r's micro-batch m is rows ``4r + 2m .. 4r + 2m + 2`` of one batch of 8 (see ``tests/blip_testing.py``).

Run with: python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_grad_accum.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blip_testing import GRAD_ACCUM_CFG, RowSource, lm_objective  # noqa: E402

from blip_core.train import distributed as D  # noqa: E402
from blip_core.train.loop import train  # noqa: E402
from blip_core.train.optim import build_optimizer  # noqa: E402


def main(out_dir: str) -> None:
    info = D.init_from_env("cpu")
    assert info.world_size == 2, info
    obj = lm_objective()
    opt = build_optimizer(obj, GRAD_ACCUM_CFG)
    rows = [list(range(4 * info.rank + 2 * m, 4 * info.rank + 2 * m + 2)) for m in range(2)]
    train(obj, opt, GRAD_ACCUM_CFG, RowSource(rows), checkpoint_dir=Path(out_dir) / "ckpt", info=info,
          progress=False)
    torch.save({"grads": {n: p.grad.clone() for n, p in obj.model.named_parameters() if p.grad is not None},
                "weights": {n: p.detach().clone() for n, p in obj.model.named_parameters()}},
               Path(out_dir) / f"rank{info.rank}.pt")
    D.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
