import math

import pytest
import torch
import torch.nn.functional as F
from blip_testing import IDS, tiny_batch, tiny_model

from blip_core import losses
from blip_core.models import FeatureQueue, MomentumEncoders
from blip_core.objectives import (
    CaptionerObjective,
    FilterObjective,
    PretrainObjective,
    lm_labels,
    with_first_token,
)


def filter_forward(obj: FilterObjective, image, ids, mask, image_idx, *, alpha: float, seed: int):
    """One call of the filter objective's forward (the only place these tests call it)."""
    return obj(image, ids, mask, alpha=alpha, image_idx=image_idx, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_one_pretrain_step_gives_every_trainable_parameter_a_gradient(stem):
    obj = PretrainObjective(tiny_model(stem=stem), IDS)
    out = obj(*tiny_batch(), alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert set(out.parts) == {"itc", "itm", "lm"}
    torch.testing.assert_close(out.loss, sum(out.parts.values()))
    out.loss.backward()
    no_grad = [n for n, p in obj.model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None and not p.requires_grad for p in obj.momentum_encoders.parameters())
    assert obj.model.temp.grad is not None


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_momentum_update_is_exact(stem):
    m = tiny_model(stem=stem)
    mom = MomentumEncoders(m)
    before = {n: p.clone() for n, p in mom.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    mom.update(m, 0.9)
    student = dict(m.visual_encoder.named_parameters())
    for n, p in mom.visual_encoder_m.named_parameters():
        expected = 0.9 * before[f"visual_encoder_m.{n}"] + 0.1 * student[n]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    student_text = dict(m.text_encoder.named_parameters())
    for n, p in mom.text_encoder_m.named_parameters():
        expected = 0.9 * before[f"text_encoder_m.{n}"] + 0.1 * student_text[n]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_queue_wraps_around_exactly():
    q = FeatureQueue(embed_dim=2, size=5, with_ids=True)
    feats = [torch.full((3, 2), float(i)) for i in range(1, 4)]
    q.enqueue(feats[0], -feats[0], torch.tensor([1, 1, 1]))
    assert int(q.queue_ptr) == 3
    q.enqueue(feats[1], -feats[1], torch.tensor([2, 2, 2]))  # wraps: columns 3, 4, 0
    assert int(q.queue_ptr) == 1
    assert q.image_queue[0].tolist() == [2, 1, 1, 2, 2]
    assert q.text_queue[0].tolist() == [-2, -1, -1, -2, -2]
    assert q.idx_queue[0].tolist() == [2, 1, 1, 2, 2]
    q.enqueue(torch.arange(7.0)[:, None].repeat(1, 2), torch.zeros(7, 2), torch.arange(7))  # larger than Q
    assert int(q.queue_ptr) == (1 + 7) % 5
    assert sorted(q.image_queue[0].tolist()) == [2, 3, 4, 5, 6]  # the last 5 entries are kept
    assert q.image_queue[0, int(q.queue_ptr) - 1] == 6  # the newest is just before the pointer


@pytest.mark.parametrize("queue_size, batch", [(7, 3), (5, 4), (64, 4), (3, 4)])
def test_any_queue_and_batch_size_work(queue_size, batch):
    obj = PretrainObjective(tiny_model(), IDS, queue_size=queue_size)
    for b in (batch, batch, 2):  # the last batch is short
        image, ids, mask = tiny_batch(batch=b)
        out = obj(image, ids, mask, alpha=0.4)
        assert torch.isfinite(out.loss)
        obj.enqueue(out)
    assert int(obj.queue.queue_ptr) == (2 * batch + 2) % queue_size
    torch.testing.assert_close(obj.queue.image_queue.norm(dim=0), torch.ones(queue_size))


def test_gather_fn_feeds_the_queue():
    calls = []

    def gather(x):
        calls.append(x.shape[0])
        return torch.cat([x, x])  # as if two ranks sent the same features

    obj = PretrainObjective(tiny_model(), IDS, queue_size=16, gather_fn=gather)
    out = obj(*tiny_batch(batch=4), alpha=0.0)
    obj.enqueue(out)
    assert calls == [4, 4] and int(obj.queue.queue_ptr) == 8
    torch.testing.assert_close(obj.queue.image_queue[:, :4], out.image_feat_m.T)
    torch.testing.assert_close(obj.queue.image_queue[:, 4:8], out.image_feat_m.T)


def test_itm_negatives_deterministic_with_generator():
    obj = PretrainObjective(tiny_model(), IDS).eval()  # eval: no dropout
    batch = tiny_batch()
    with torch.no_grad():
        a = obj(*batch, alpha=0.4, generator=torch.Generator().manual_seed(5)).parts["itm"]
        b = obj(*batch, alpha=0.4, generator=torch.Generator().manual_seed(5)).parts["itm"]
    assert a.item() == b.item()


def test_lm_labels_mask_padding_and_prompt():
    ids = torch.tensor([[98, 10, 11, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert lm_labels(ids, mask).tolist() == [[98, 10, 11, 12, 3, -100]]
    assert lm_labels(ids, mask, prompt_len=3).tolist() == [[-100, -100, -100, 12, 3, -100]]


def test_filter_objective_uses_image_ids():
    obj = FilterObjective(tiny_model(), IDS, queue_size=8)
    image, ids, mask = tiny_batch(batch=4)
    idx = torch.tensor([7, 7, 8, 9])
    out = obj(image, ids, mask, alpha=0.4, image_idx=idx, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    obj.enqueue(out)
    assert obj.queue.idx_queue[0, :4].tolist() == [7, 7, 8, 9]
    assert set(out.parts) == {"itc", "itm"}


def test_filter_negative_weights_hand_worked():
    """Official retrieval: softmax of student-student similarities / temp, every pair of the anchor's image 0."""
    obj = FilterObjective(tiny_model(), IDS, queue_size=8)
    with torch.no_grad():
        obj.model.temp.fill_(0.5)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    idx = torch.tensor([5, 6, 5])  # pairs 0 and 2 show the same image
    e = math.exp
    # image . text / 0.5: row 0 [2, 0, 1.6], row 1 [0, 2, 1.2], row 2 [1.2, 1.6, 1.92]
    want_i2t = [[0, 1 / (e(2) + 1 + e(1.6)), 0],
                [1 / (1 + e(2) + e(1.2)), 0, e(1.2) / (1 + e(2) + e(1.2))],
                [0, e(1.6) / (e(1.2) + e(1.6) + e(1.92)), 0]]
    # text . image / 0.5: row 0 [2, 0, 1.2], row 1 [0, 2, 1.6], row 2 [1.6, 1.2, 1.92]
    want_t2i = [[0, 1 / (e(2) + 1 + e(1.2)), 0],
                [1 / (1 + e(2) + e(1.6)), 0, e(1.6) / (1 + e(2) + e(1.6))],
                [0, e(1.2) / (e(1.6) + e(1.2) + e(1.92)), 0]]
    w_i2t, w_t2i = obj.negative_weights(img, txt, idx)
    torch.testing.assert_close(w_i2t, torch.tensor(want_i2t), rtol=0, atol=1e-6)
    torch.testing.assert_close(w_t2i, torch.tensor(want_t2i), rtol=0, atol=1e-6)
    # The same anchor (pair 2) among candidates gathered from all ranks, at row 2: the same weights.
    w_i2t, w_t2i = obj.negative_weights(img[2:], txt[2:], idx[2:], world=(img, txt, idx), offset=2)
    torch.testing.assert_close(w_i2t, torch.tensor(want_i2t[2:]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w_t2i, torch.tensor(want_t2i[2:]), rtol=0, atol=1e-6)
    # Every candidate shows the anchor's image: uniform over all but its own pair (row 1 here).
    w_i2t, _ = obj.negative_weights(img[:1], txt[:1], torch.tensor([5]), world=(img, txt, torch.full((3,), 5)),
                                    offset=1)
    assert w_i2t.tolist() == [[1.0, 0.0, 1.0]]


def test_filter_negatives_are_drawn_from_student_similarities():
    """The draws follow softmax(student image . student text / temp), not the momentum features."""
    obj = FilterObjective(tiny_model(), IDS, queue_size=8).eval()  # eval: no dropout
    with torch.no_grad():
        for p in obj.momentum_encoders.parameters():  # momentum features far from the student's
            p.add_(0.5 * torch.randn_like(p))
        obj.model.temp.fill_(0.05)
    image, ids, mask = tiny_batch(batch=8)
    idx = torch.tensor([10, 10, 11, 12, 13, 14, 15, 16])
    m = obj.model
    with torch.no_grad():
        image_feat = m.image_features(m.encode_image(image))
        text_feat = m.text_features(m.encode_text(with_first_token(ids, IDS.cls), mask))
        same = idx[:, None] == idx[None, :]
        w_t2i = F.softmax(text_feat @ image_feat.T / m.temp, dim=1).masked_fill(same, 0)
        w_i2t = F.softmax(image_feat @ text_feat.T / m.temp, dim=1).masked_fill(same, 0)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        want_image = torch.multinomial(w_t2i, 1, generator=g).squeeze(1)  # first each text's image, then texts
        want_text = torch.multinomial(w_i2t, 1, generator=g).squeeze(1)
        with torch.no_grad():
            out = obj(image, ids, mask, alpha=0.4, image_idx=idx, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.neg_image_idx, idx[want_image]) and torch.equal(out.neg_text_idx, idx[want_text])


def _overfit(objective, batch, steps, **kwargs):
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    history = []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = objective(*batch, generator=g, **kwargs)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        objective.model.clamp_temp()
        objective.momentum_update()
        objective.enqueue(out)
        history.append({k: float(v) for k, v in out.parts.items()})
    return history


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model()
    objective = PretrainObjective(model, IDS, queue_size=8, momentum=0.9)
    history = _overfit(objective, tiny_batch(batch=4), steps=150, alpha=0.4)
    first, last = history[0], history[-1]
    print("\nstart", first, "\nend  ", last)
    for k in ("itc", "itm", "lm"):
        assert last[k] < 0.5 * first[k], (k, first[k], last[k])


def test_captioner_prompt_is_not_supervised():
    model = tiny_model().eval()
    image, ids, mask = tiny_batch(batch=2)
    mask[:] = 1
    loss = CaptionerObjective(model, IDS, prompt_len=4)(image, ids, mask).loss
    dec = with_first_token(ids, IDS.dec)
    logits, _ = model.decode(dec, mask, model.cross_kv(model.encode_image(image)))
    # Targets are tokens 4.. (predicted from positions 3..); the prompt's own tokens are never targets.
    per_token = torch.nn.functional.cross_entropy(
        logits[:, 3:-1].reshape(-1, logits.shape[-1]), dec[:, 4:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, per_token)
    full = CaptionerObjective(model, IDS, prompt_len=0)(image, ids, mask).loss
    assert not torch.allclose(loss, full)


def test_inputs_take_exactly_the_batch_entries_and_step_values_each_objective_uses():
    image, ids, mask = tiny_batch(batch=2)
    batch = {"image": image, "input_ids": ids, "attention_mask": mask, "image_idx": torch.tensor([1, 2]),
             "text": ["a", "b"], "image_id": ["x", "y"]}
    g = torch.Generator()
    model = tiny_model()
    pre = PretrainObjective(model, IDS, queue_size=8).inputs(batch, alpha=0.3, generator=g)
    assert set(pre) == {"image", "input_ids", "attention_mask", "alpha", "generator"} and pre["alpha"] == 0.3
    fil = FilterObjective(model, IDS, queue_size=8).inputs(batch, alpha=0.3, generator=g)
    assert set(fil) == {"image", "input_ids", "attention_mask", "image_idx", "alpha", "generator"}
    cap = CaptionerObjective(model, IDS)
    assert set(cap.inputs(batch, alpha=0.3, generator=g)) == {"image", "input_ids", "attention_mask"}
    with pytest.raises(KeyError, match=r"FilterObjective needs the batch entries \['image_idx'\]"):
        FilterObjective(model, IDS, queue_size=8).inputs({k: batch[k] for k in pre if k in batch}, alpha=0.3,
                                                         generator=g)
    out = cap(**cap.inputs(batch, alpha=0.3, generator=g))
    assert out.samples == 2 and set(out.parts) == {"lm"}
    # The captioner keeps no momentum state; its step hook only clamps the temperature.
    assert not cap.keeps_momentum and cap.momentum_state() is None
    with torch.no_grad():
        model.temp.fill_(2.0)
    cap.after_step()
    assert float(model.temp) == 0.5 and cap.log_values() == {"temp": 0.5}


def test_filter_itc_targets_are_uniform_over_every_caption_of_the_image():
    """With alpha 0 the filter's ITC loss is the cross-entropy against targets spread evenly over every column
    (batch or queue) showing the anchor's image: recomputed here in float64 from the model's own features."""
    obj = FilterObjective(tiny_model(), IDS, queue_size=6).eval()  # eval: no dropout
    image, ids, mask = tiny_batch(batch=4)
    idx = torch.tensor([7, 7, 8, 9])
    g = torch.Generator().manual_seed(3)
    queued = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    obj.queue.enqueue(queued, queued.flip(0), torch.tensor([7, 8, 1, 2, 8, 3]))  # image 7 once more, 8 twice
    with torch.no_grad():
        out = filter_forward(obj, image, ids, mask, idx, alpha=0.0, seed=0)
        image_feat_m = obj.momentum_encoders.image_features(image).double()
        text_feat_m = obj.momentum_encoders.text_features(with_first_token(ids, IDS.cls), mask).double()
        m = obj.model
        image_feat = m.image_features(m.encode_image(image)).double()
        text_feat = m.text_features(m.encode_text(with_first_token(ids, IDS.cls), mask)).double()
    temp = float(m.temp)
    text_all = torch.cat([text_feat_m, queued.flip(0).double()])  # (B+Q, E)
    image_all = torch.cat([image_feat_m, queued.double()])
    cols = [7, 7, 8, 9, 7, 8, 1, 2, 8, 3]  # image id of each column: the batch, then the queue
    targets = torch.tensor([[float(c == i) for c in cols] for i in idx.tolist()], dtype=torch.float64)
    targets /= targets.sum(dim=1, keepdim=True)
    assert targets[0].tolist()[:5] == [1 / 3, 1 / 3, 0, 0, 1 / 3] and targets[2, [2, 5, 8]].tolist() == [1 / 3] * 3

    def ce(sim):
        return -(torch.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()

    want = (ce(image_feat @ text_all.T / temp) + ce(text_feat @ image_all.T / temp)) / 2
    assert float(out.parts["itc"]) == pytest.approx(float(want), rel=1e-5)
    # the same features with one-hot (diagonal) targets give another loss: the test tells the two apart
    diagonal = torch.eye(4, 10, dtype=torch.float64)
    other = (-(torch.log_softmax(image_feat @ text_all.T / temp, 1) * diagonal).sum(1).mean()
             - (torch.log_softmax(text_feat @ image_all.T / temp, 1) * diagonal).sum(1).mean()) / 2
    assert abs(float(other) - float(want)) > 1e-3


def test_filter_itm_negatives_never_show_the_anchor_image():
    """Most pairs of the batch show image 1: the drawn ITM negatives (image for each text, text for each image)
    still never show the anchor's own image, from the weights up to the objective's draws."""
    obj = FilterObjective(tiny_model(), IDS, queue_size=8)
    image, ids, mask = tiny_batch(batch=8)
    idx = torch.tensor([1, 1, 1, 1, 1, 1, 2, 3])
    feats = F.normalize(torch.randn(8, 16), dim=1)
    w_i2t, w_t2i = obj.negative_weights(feats, feats.roll(1, 0), idx)
    same = idx[:, None] == idx[None, :]
    assert torch.all(w_i2t[same] == 0) and torch.all(w_t2i[same] == 0)
    for seed in range(10):
        drawn = losses.sample_hard_negatives(w_t2i, torch.Generator().manual_seed(seed))
        assert torch.all(idx[drawn] != idx)
        with torch.no_grad():
            out = filter_forward(obj, image, ids, mask, idx, alpha=0.4, seed=seed)
        assert torch.all(out.neg_image_idx != idx), seed
        assert torch.all(out.neg_text_idx != idx), seed
