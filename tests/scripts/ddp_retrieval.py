"""Retrieval re-rank split over 2 gloo processes and all-reduced; each rank saves its result for the test.

Run with: python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_retrieval.py OUT_PREFIX
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blip_testing import IDS, tiny_batch, tiny_model  # noqa: E402

from blip_core.retrieval import retrieval_scores  # noqa: E402
from blip_core.train import distributed as D  # noqa: E402


def main(prefix: str) -> None:
    info = D.init_from_env("cpu")
    assert info.world_size == 2, info
    torch.set_num_threads(1)
    model = tiny_model(seed=5).eval()
    images, _, _ = tiny_batch(batch=37, seed=6)
    _, ids, mask = tiny_batch(batch=101, length=8, seed=7)
    scores = retrieval_scores(model, images, ids, mask, enc_id=IDS.enc, k=5, batch_size=8, itm_batch_size=5,
                              block_rows=16, rank=D.rank(), world_size=D.world_size(), reduce_fn=D.all_reduce_sum)
    torch.save({"i2t": scores.i2t, "t2i": scores.t2i}, f"{prefix}.{info.rank}.pt")
    D.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
