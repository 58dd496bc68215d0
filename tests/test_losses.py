import math

import pytest
import torch
import torch.nn.functional as F

from blip_core import losses
from blip_core.losses import IGNORE_INDEX


def _itc_2x2(alpha):
    feats = torch.eye(2)  # unit features, temperature 1, no queue
    sim = feats @ feats.T
    hard = torch.eye(2)
    t = losses.soft_targets(sim, hard, alpha)
    return losses.itc_loss(sim, sim.T, t, t), t


def test_itc_hand_computed():
    loss, _ = _itc_2x2(0.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(loss) == pytest.approx(0.313262, abs=1e-6)
    loss, targets = _itc_2x2(0.4)
    assert targets[0].tolist() == pytest.approx([0.892423, 0.107577], abs=1e-6)
    assert float(loss) == pytest.approx(0.420838, abs=1e-6)


def test_itc_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 9, generator=g)
    hard = torch.zeros(4, 9)
    hard[:, :4] = torch.eye(4)
    loss = losses.itc_loss(sim, sim, hard, hard)
    assert float(loss) == pytest.approx(float(F.cross_entropy(sim, torch.arange(4))), abs=1e-6)


def test_itm_zero_logits_is_log2():
    logits = torch.zeros(6, 2)
    assert float(losses.itm_loss(logits, losses.itm_labels(2))) == pytest.approx(math.log(2), abs=1e-6)
    assert losses.itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]


def test_lm_uniform_logits_is_log_v_and_ignores_positions():
    V = 11
    logits = torch.zeros(2, 5, V)
    labels = torch.tensor([[0, 3, 4, 5, 6], [0, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert float(losses.lm_loss(logits, labels)) == pytest.approx(math.log(V), abs=1e-6)
    # Ignored positions do not contribute: change their logits, the loss stays.
    logits2 = logits.clone()
    logits2[1, 2:] = torch.randn(3, V)
    logits2[:, -1] = torch.randn(2, V)  # the last position predicts nothing after the shift
    assert float(losses.lm_loss(logits2, labels)) == pytest.approx(math.log(V), abs=1e-6)
    per_seq = losses.lm_loss(logits, labels, reduction="sum_per_sequence")
    assert per_seq.tolist() == pytest.approx([4 * math.log(V), 1 * math.log(V)], abs=1e-5)


def test_lm_label_smoothing_value():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 0]])
    logp = F.log_softmax(logits[0, 0], dim=-1)
    expected = -(0.9 * logp[0] + 0.1 * logp.mean())
    assert float(losses.lm_loss(logits, labels)) == pytest.approx(float(expected), abs=1e-6)


def test_hard_negatives_never_diagonal_and_deterministic():
    sim = torch.eye(8) * 50  # softmax mass concentrated on the diagonal
    w = losses.negative_weights(sim)
    assert torch.all(w.diagonal() == 0) and torch.all(w.sum(1) > 0)
    draws = [losses.sample_hard_negatives(w, torch.Generator().manual_seed(s)) for s in range(50)]
    for d in draws:
        assert not torch.any(d == torch.arange(8))
    a = losses.sample_hard_negatives(w, torch.Generator().manual_seed(3))
    b = losses.sample_hard_negatives(w, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_hard_negatives_mask_same_image():
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    same = idx[:, None] == idx[None, :]
    w = losses.negative_weights(torch.randn(6, 6), same)
    assert torch.all(w[same] == 0)
    for s in range(20):
        d = losses.sample_hard_negatives(w, torch.Generator().manual_seed(s))
        assert torch.all(idx[d] != idx)
    # Every pair shows the same image: fall back to any other row rather than crash.
    all_same = torch.ones(3, 3, dtype=torch.bool)
    w = losses.negative_weights(torch.randn(3, 3), all_same)
    d = losses.sample_hard_negatives(w, torch.Generator().manual_seed(0))
    assert not torch.any(d == torch.arange(3))
