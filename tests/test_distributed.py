from pathlib import Path

import pytest
import torch
from blip_testing import IDS, tiny_batch, tiny_model, torchrun2

from blip_core.objectives import PretrainObjective

SCRIPT = Path(__file__).parent / "scripts" / "ddp_pretrain_step.py"


@pytest.mark.slow  # two processes
def test_two_process_gloo_step_matches_single_process_halves(tmp_path):
    out = tmp_path / "ddp.pt"
    torchrun2(SCRIPT, out)
    ddp = torch.load(out, weights_only=True)

    image, ids, mask = tiny_batch(batch=8, seed=7)
    grads, feats = [], []
    for rank in range(2):
        obj = PretrainObjective(tiny_model(seed=0), IDS, queue_size=16)
        half = slice(4 * rank, 4 * rank + 4)
        torch.manual_seed(100 + rank)
        o = obj(image[half], ids[half], mask[half], alpha=0.4, generator=torch.Generator().manual_seed(5 + rank))
        o.loss.backward()
        grads.append({n: p.grad for n, p in obj.model.named_parameters() if p.grad is not None})
        feats.append(o.image_feat_m)

    # The queue after one step holds both ranks' momentum features, rank 0 first.
    assert ddp["ptr"] == 8
    torch.testing.assert_close(ddp["image_queue"][:, :8], torch.cat(feats).T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["gathered"], torch.cat(feats), rtol=1e-5, atol=1e-6)
    # DDP's averaged gradient is the mean of the single-process gradients on each half.
    assert ddp["grads"].keys() == grads[0].keys()
    for name, g in ddp["grads"].items():
        torch.testing.assert_close(g, (grads[0][name] + grads[1][name]) / 2, rtol=1e-4, atol=1e-6, msg=name)


FILTER_SCRIPT = Path(__file__).parent / "scripts" / "ddp_filter_negatives.py"


@pytest.mark.slow  # two processes
def test_filter_negatives_from_all_ranks_only_with_negative_all_rank(tmp_path):
    prefix = tmp_path / "neg"
    torchrun2(FILTER_SCRIPT, prefix)
    ranks = [torch.load(f"{prefix}.{r}", weights_only=True) for r in range(2)]
    for r, res in enumerate(ranks):
        own, other = res["idx"], ranks[1 - r]["idx"]
        for kind in ("neg_image", "neg_text"):
            off, on = res[f"{kind}_False"], res[f"{kind}_True"]  # (seeds, B) image ids of the drawn negatives
            # Never the anchor's own image, with or without the option.
            assert not torch.any(off == own) and not torch.any(on == own), (r, kind)
            # Off: only this rank's samples. On: the other rank's samples too (rank 1's texts are shorter).
            assert torch.isin(off, own).all(), (r, kind)
            assert torch.isin(on, torch.cat([own, other])).all() and torch.isin(on, other).any(), (r, kind)
        for flag in (False, True):
            assert torch.isfinite(res[f"loss_{flag}"]) and torch.isfinite(res[f"grad_{flag}"]).all()
    for flag in (False, True):  # DDP: the same averaged gradient on both ranks
        torch.testing.assert_close(ranks[0][f"grad_{flag}"], ranks[1][f"grad_{flag}"])
    # all_gather_with_grad: rank order forward; backward sums both ranks' gradients for each rank's rows.
    w = torch.arange(12.0).view(4, 3)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gathered"], torch.cat([torch.arange(6.0).view(2, 3) * (k + 1) for k in (0, 1)]))
        torch.testing.assert_close(res["v_grad"], (r + 1) * (1 + 11) * w[2 * r:2 * r + 2])
