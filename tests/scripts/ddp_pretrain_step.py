"""One DDP pre-training step on 2 gloo processes; rank 0 saves gradients, queue and features for the test.

Run with: python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_pretrain_step.py OUT.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blip_testing import IDS, tiny_batch, tiny_model  # noqa: E402

from blip_core.objectives import PretrainObjective  # noqa: E402
from blip_core.train import distributed as D  # noqa: E402


def main(out_path: str) -> None:
    info = D.init_from_env("cpu")
    assert info.world_size == 2, info
    obj = PretrainObjective(tiny_model(seed=0), IDS, queue_size=16, gather_fn=D.all_gather_cat)
    ddp = D.wrap_ddp(obj, info)
    image, ids, mask = tiny_batch(batch=8, seed=7)
    half = slice(4 * info.rank, 4 * info.rank + 4)
    torch.manual_seed(100 + info.rank)
    out = ddp(image[half], ids[half], mask[half], alpha=0.4, generator=torch.Generator().manual_seed(5 + info.rank))
    out.loss.backward()
    obj.enqueue(out)
    feats = D.all_gather_cat(out.image_feat_m)
    if info.is_main:
        grads = {n: p.grad.clone() for n, p in obj.model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "image_queue": obj.queue.image_queue.clone(), "gathered": feats,
                    "ptr": int(obj.queue.queue_ptr)}, out_path)
    D.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
