"""Filter ITM negatives on 2 gloo processes, with and without ``negative_all_rank``; each rank saves what it drew.

Rank 0 holds images with ids 0..3 and texts of 9 tokens, rank 1 ids 100..103 and texts of 7 tokens. Each rank
also checks ``all_gather_with_grad``'s backward on a small tensor.

Run with: python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_filter_negatives.py OUT_PREFIX
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blip_testing import IDS, tiny_batch, tiny_model  # noqa: E402

from blip_core.config import Config  # noqa: E402
from blip_core.objectives import FilterObjective  # noqa: E402
from blip_core.train import distributed as D  # noqa: E402
from components.tasks import get_task  # noqa: E402

SEEDS = range(8)


def main(prefix: str) -> None:
    info = D.init_from_env("cpu")
    assert info.world_size == 2, info
    r = info.rank
    image, ids, mask = tiny_batch(batch=4, length=9 if r == 0 else 7, seed=7 + r)
    idx = torch.arange(4) + 100 * r
    result: dict = {"idx": idx}
    for flag in (False, True):
        model = tiny_model(seed=0)
        model = get_task("filter").prepare_model(model, Config())  # as the stage: DDP reduces only what the loss reaches
        obj = FilterObjective(model, IDS, queue_size=16, gather_fn=D.all_gather_cat,
                              gather_grad_fn=D.all_gather_with_grad, negative_all_rank=flag, rank=r)
        draws_img, draws_txt = [], []
        with torch.no_grad():
            for s in SEEDS:
                out = obj(image, ids, mask, alpha=0.4, image_idx=idx, generator=torch.Generator().manual_seed(s + 10 * r))
                draws_img.append(out.neg_image_idx)
                draws_txt.append(out.neg_text_idx)
        result[f"neg_image_{flag}"] = torch.stack(draws_img)
        result[f"neg_text_{flag}"] = torch.stack(draws_txt)
        ddp = D.wrap_ddp(obj, info)
        out = ddp(image, ids, mask, alpha=0.4, image_idx=idx, generator=torch.Generator().manual_seed(99 + r))
        out.loss.backward()
        grad = obj.model.visual_encoder.patch_embed.proj.weight.grad
        result[f"loss_{flag}"] = out.loss.detach()
        result[f"grad_{flag}"] = grad.clone()

    # all_gather_with_grad: rank r sends x_r = (r + 1) * v; its loss is sum(w_r * gathered). The gradient of
    # x_r is the sum over both ranks' losses of their weights on x_r's rows.
    v = torch.arange(6.0).view(2, 3).requires_grad_()
    x = (r + 1) * v
    gathered = D.all_gather_with_grad(x)
    w = torch.arange(12.0).view(4, 3) * (1 + 10 * r)
    (gathered * w).sum().backward()
    result["gathered"] = gathered.detach()
    result["v_grad"] = v.grad.clone()
    torch.save(result, f"{prefix}.{r}")
    D.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
