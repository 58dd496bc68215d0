import pytest
import torch
from blip_testing import IDS, VOCAB, tiny_batch, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from blip_core import build_model, model_preset
from blip_core.config import ConfigError
from blip_core.models import count_parameters, interpolate_pos_embed
from blip_core.objectives import with_first_token


def test_shapes():
    m = tiny_model().eval()
    image, ids, mask = tiny_batch()
    emb = m.encode_image(image)
    assert emb.shape == (4, 1 + 16, 32)
    assert m.image_features(emb).norm(dim=-1).allclose(torch.ones(4))
    hid = m.encode_text(ids, mask)
    assert hid.shape == (4, 9, 32)
    cross = m.cross_kv(emb)
    assert m.itm_logits(with_first_token(ids, IDS.enc), mask, cross).shape == (4, 2)
    logits, _ = m.decode(with_first_token(ids, IDS.dec), mask, cross)
    assert logits.shape == (4, 9, VOCAB)


def test_decoder_is_causal():
    m = tiny_model().eval()
    image, ids, mask = tiny_batch()
    cross = m.cross_kv(m.encode_image(image))
    dec = with_first_token(ids, IDS.dec)
    a, _ = m.decode(dec, mask, cross)
    changed = dec.clone()
    changed[:, 5] = 7
    b, _ = m.decode(changed, mask, cross)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_padding_does_not_change_cls_feature():
    m = tiny_model().eval()
    _, ids, mask = tiny_batch()
    a = m.text_features(m.encode_text(ids, mask))
    changed = ids.clone()
    changed[mask == 0] = 42  # rewrite the padded tokens
    b = m.text_features(m.encode_text(changed, mask))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_image_tokens_change_grounded_outputs_only():
    m = tiny_model().eval()
    image, ids, mask = tiny_batch()
    other = image.clone()
    other[0] += 1.0
    enc_ids = with_first_token(ids, IDS.enc)
    c1, c2 = m.cross_kv(m.encode_image(image)), m.cross_kv(m.encode_image(other))
    assert not torch.allclose(m.itm_logits(enc_ids, mask, c1)[0], m.itm_logits(enc_ids, mask, c2)[0])
    dec = with_first_token(ids, IDS.dec)
    assert not torch.allclose(m.decode(dec, mask, c1)[0][0], m.decode(dec, mask, c2)[0][0])
    # Unimodal text encoding never reaches the cross-attention: changing every cross-attention weight (which
    # changes the grounded outputs) leaves it bit-identical.
    text_before = m.encode_text(ids, mask)
    itm_before = m.itm_logits(enc_ids, mask, c1)
    with torch.no_grad():
        for name, p in m.text_encoder.named_parameters():
            if ".crossattention." in name:
                p.add_(torch.randn_like(p))
    assert torch.equal(m.encode_text(ids, mask), text_before)
    assert not torch.allclose(m.itm_logits(enc_ids, mask, m.cross_kv(m.encode_image(image))), itm_before)


def test_encoder_decoder_share_all_but_self_attention():
    m = tiny_model()
    enc = dict(m.text_encoder.named_parameters(remove_duplicate=False))
    dec = dict(m.text_decoder.bert.named_parameters(remove_duplicate=False))
    assert enc.keys() == dec.keys()
    for name in enc:
        same = enc[name].data_ptr() == dec[name].data_ptr()
        is_self_attention = ".attention." in name
        assert same != is_self_attention, name
    # LM output matrix tied to the word embeddings.
    assert m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_text_init_std_follows_config(std):
    """``model.text.init_std`` sets the normal std of every text Linear/Embedding weight (BERT's 0.02)."""
    m = tiny_model(text={"init_std": std})
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.1.intermediate.dense.weight"):
        w = dict(m.text_encoder.named_parameters())[name]
        assert abs(w.std().item() - std) / std < 0.1, name
    assert dict(m.text_decoder.bert.named_parameters())["encoder.layer.0.attention.self.query.weight"].std().item() == \
        pytest.approx(std, rel=0.1)


@pytest.mark.slow  # builds the 252M-parameter model
def test_base_preset_parameter_count_matches_paper():
    m = build_model(model_preset("base"))
    n = count_parameters(m)
    print(f"\nbase preset: {n / 1e6:.1f}M parameters (paper Table 3: 252M)")
    assert abs(n - 252e6) / 252e6 < 0.01


def test_grad_checkpointing_leaves_outputs_and_grads_unchanged():
    image, _, _ = tiny_batch()
    m1 = tiny_model(seed=3).train()
    m2 = tiny_model(seed=3).train()
    m2.set_grad_checkpointing(1)
    o1, o2 = m1.encode_image(image), m2.encode_image(image)
    torch.testing.assert_close(o1, o2)
    o1.square().sum().backward()
    o2.square().sum().backward()
    for (n, p1), (_, p2) in zip(m1.visual_encoder.named_parameters(), m2.visual_encoder.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=n)


def test_text_grad_checkpointing_leaves_losses_and_grads_unchanged():
    """``model.text.grad_ckpt_layers`` recomputes MED layers in backward, dropout included, with equal results."""
    from blip_core.objectives import PretrainObjective

    image, ids, mask = tiny_batch()
    grads, losses = [], []
    for k in (0, 1, 2):
        m = tiny_model(seed=3, text={"grad_ckpt_layers": k}).train()  # dropout on
        obj = PretrainObjective(m, IDS)
        out = obj(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for k in (1, 2):
        torch.testing.assert_close(losses[0], losses[k])
        assert grads[0].keys() == grads[k].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[k][n], msg=n)


def test_sdpa_kernels_match_math_path():
    m = tiny_model().eval()
    image, ids, mask = tiny_batch()

    def run():
        cross = m.cross_kv(m.encode_image(image))
        return (m.encode_text(ids, mask), m.itm_logits(with_first_token(ids, IDS.enc), mask, cross),
                m.decode(with_first_token(ids, IDS.dec), mask, cross)[0])

    default = run()
    with sdpa_kernel(SDPBackend.MATH):
        math_path = run()
    for a, b in zip(default, math_path):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_full_decoding():
    m = tiny_model().eval()
    image, ids, _ = tiny_batch(batch=2)
    ids = with_first_token(ids, IDS.dec)
    mask = torch.ones_like(ids)
    cross = m.cross_kv(m.encode_image(image))
    full, _ = m.decode(ids, mask, cross)
    logits, cache = m.decode(ids[:, :3], mask[:, :3], cross, use_cache=True)
    steps = [logits]
    for t in range(3, ids.shape[1]):
        logits, cache = m.decode(ids[:, t:t + 1], mask[:, :t + 1], cross, past=cache, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cross_kv_shared_by_several_texts_per_image():
    """r texts per image read the image's K/V once (folded) and match explicit per-pair K/V."""
    m = tiny_model().eval()
    image, ids, mask = tiny_batch(batch=6)
    emb = m.encode_image(image[:2])
    enc = with_first_token(ids, IDS.enc)
    folded = m.itm_logits(enc, mask, m.cross_kv(emb))  # rows 0-2 -> image 0, rows 3-5 -> image 1
    explicit = m.itm_logits(enc, mask, m.cross_kv(emb.repeat_interleave(3, dim=0)))
    indexed = m.itm_logits(enc, mask, m.cross_kv(emb).select(torch.tensor([0, 0, 0, 1, 1, 1])))
    torch.testing.assert_close(folded, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(indexed, explicit, rtol=1e-5, atol=1e-5)


def test_pos_embed_interpolation():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pe, 24 * 24)
    assert out.shape == (1, 1 + 24 * 24, 8)
    assert torch.equal(out[:, 0], pe[:, 0])
    assert interpolate_pos_embed(pe, 14 * 14) is pe
    # A constant grid stays constant under bicubic resizing.
    flat = torch.ones(1, 1 + 16, 4)
    torch.testing.assert_close(interpolate_pos_embed(flat, 64), torch.ones(1, 65, 4))
    with pytest.raises(ValueError):
        interpolate_pos_embed(pe, 50)


def test_conv_stem_keeps_the_patch_grid_in_row_major_order():
    m = tiny_model(stem="conv").eval()  # 32 px, patch 8: a 4 x 4 grid
    image = torch.zeros(1, 3, 32, 32)
    base = m.visual_encoder.patch_embed(image)
    assert base.shape == (1, 16, 32)
    poked = image.clone()
    poked[:, :, 0:8, 24:32] = 3.0  # the top-right cell: token 3 in row-major order
    diff = (m.visual_encoder.patch_embed(poked) - base).abs().sum(-1)[0]  # (16,)
    changed = set(torch.nonzero(diff).flatten().tolist())
    # token 3 itself and some of its neighbours; never the left column or the bottom row (column-major order
    # would put the top-right cell at token 12)
    assert 3 in changed and changed <= {1, 2, 3, 5, 6, 7, 9, 10, 11}
    assert m.encode_image(image).shape == (1, 17, 32)


@pytest.mark.parametrize("patch", [6, 1])
def test_conv_stem_needs_a_power_of_two_patch(patch):
    with pytest.raises(ConfigError, match="model.vision.stem"):
        tiny_model(stem="conv", patch_size=patch, image_size=patch * 4)


def test_conv_stem_channels_default_to_halving_and_can_be_set():
    from blip_core.models.vision import ConvStem

    def stage_channels(stem):
        return [m.out_channels for m in stem.proj if isinstance(m, torch.nn.Conv2d)]

    assert stage_channels(ConvStem(8, 128)) == [16, 32, 64, 128]
    assert stage_channels(ConvStem(8, 128, [32, 64, 128])) == [32, 64, 128, 128]
    assert ConvStem(8, 128, [32, 64, 128])(torch.zeros(2, 3, 64, 64)).shape == (2, 64, 128)
    for bad in ([32, 64], [32, 0, 64]):
        with pytest.raises(ConfigError, match="3 positive channel counts"):
            ConvStem(8, 128, bad)


@pytest.mark.parametrize(("hidden", "attention", "random"), [(0.0, 0.0, False), (0.0, 0.5, True), (0.5, 0.0, True),
                                                                (0.0, None, False), (0.5, None, True)])
def test_hidden_and_attention_dropout_are_separate(hidden, attention, random):
    """``text.dropout`` and ``text.attention_dropout`` each act alone: with both 0 a training-mode forward is
    deterministic, with either above 0 two forwards differ (self- and cross-attention and decoder alike); an unset
    attention rate follows ``dropout``."""
    m = tiny_model(text={"dropout": hidden, "attention_dropout": attention}).train()
    image, ids, mask = tiny_batch()
    with torch.no_grad():
        cross = m.cross_kv(m.encode_image(image))
        outs = [(m.encode_text(ids, mask), m.itm_logits(with_first_token(ids, IDS.enc), mask, cross),
                 m.decode(with_first_token(ids, IDS.dec), mask, cross)[0]) for _ in range(2)]
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b) != random
