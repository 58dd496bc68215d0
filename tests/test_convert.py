"""Checkpoint directories and conversion from/to Hugging Face and official BLIP, with numerical parity."""

import dataclasses
import json

import pytest
import torch
from blip_hf_testing import build_hf, hf_to_official, make_tokenizer, small_hf_config, tiny_preset_hf_config
from blip_testing import tiny_model
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from blip_core import build_model, load_model_dir, model_preset
from blip_core.checkpoint_io import canonical_state_dict, save_model_dir
from blip_core.convert import (
    config_from_hf,
    config_to_hf,
    hf_to_official_key,
    load_hf,
    load_official,
    official_state_dict,
    official_to_hf_key,
    save_hf,
    save_official,
)
from blip_core.errors import UserError
from blip_core.generation import itm_itc
from blip_core.losses import lm_loss
from blip_core.models import FeatureQueue, MomentumEncoders
from blip_core.objectives import lm_labels, with_first_token
from components.cli import main as cli

ATOL = 1e-5


def _texts(tok):
    ids, mask = tok(["a picture of a dog running on the grass", "two cats", "a plate of food with a fork"],
                    max_length=20)
    return ids, mask


def _equal_dicts(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# blip_core checkpoint directories
# --------------------------------------------------------------------------------------------------


def test_checkpoint_dir_round_trip_with_momentum(tmp_path):
    tok = make_tokenizer()
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    enc, queue = MomentumEncoders(model), FeatureQueue(16, 64, with_ids=True)
    momentum = {**enc.state_dict(), **queue.state_dict()}
    save_model_dir(tmp_path / "ck", model, tok, momentum)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "model.safetensors", "momentum.safetensors", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert header["format"] == "blip_core" and header["version"] == 1
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert sorted(stored) == sorted(canonical_state_dict(model))
    assert len(stored) < len(model.state_dict())  # tied tensors stored once

    ck = load_model_dir(tmp_path / "ck")
    assert ck.model.cfg == model.cfg
    _equal_dicts(ck.model.state_dict(), model.state_dict())
    assert ck.model.text_encoder.embeddings is ck.model.text_decoder.bert.embeddings  # ties rebuilt
    assert (ck.tokenizer.dec_id, ck.tokenizer.enc_id, len(ck.tokenizer)) == (tok.dec_id, tok.enc_id, len(tok))
    _equal_dicts(ck.momentum_state, momentum)


def test_conv_stem_checkpoint_round_trip_keeps_batch_norm_statistics(tmp_path):
    tok = make_tokenizer()
    cfg = model_preset("tiny")
    model = build_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem="conv")), vocab_size=len(tok))
    with torch.no_grad():  # running statistics as training leaves them, not the initial 0 / 1
        model.train().visual_encoder(torch.randn(4, 3, 32, 32) * 2 + 1)
    stats = {n: b for n, b in model.state_dict().items() if "running_" in n or "num_batches" in n}
    assert stats and all(not torch.equal(b, torch.zeros_like(b)) for n, b in stats.items() if "running_mean" in n)
    save_model_dir(tmp_path / "ck", model, tok)
    ck = load_model_dir(tmp_path / "ck")
    assert ck.model.cfg.vision.stem == "conv"
    _equal_dicts(ck.model.state_dict(), model.state_dict())
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ck.model.eval().encode_image(image), model.eval().encode_image(image))
    with pytest.raises(UserError, match="stem"):
        config_to_hf(ck.model.cfg)


def test_model_save_overwrites_atomically(tmp_path):
    m1, m2 = tiny_model(seed=1), tiny_model(seed=2)
    save_model_dir(tmp_path / "ck", m1)
    save_model_dir(tmp_path / "ck", m2)
    _equal_dicts(load_model_dir(tmp_path / "ck").model.state_dict(), m2.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_invalid_checkpoint_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        load_model_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model_dir(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(UserError, match="blip convert"):
        load_model_dir(bad)
    (bad / "config.json").write_text(json.dumps({"format": "blip_core", "version": 1,
                                                 "model": {"preset": "tiny", "vision": {"widht": 3}}}))
    with pytest.raises(UserError, match="widht"):
        load_model_dir(bad)
    save_model_dir(tmp_path / "ck", tiny_model())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["text"]["hidden_size"] = 48
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape mismatches"):
        load_model_dir(tmp_path / "ck")


# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------


def test_key_rules_invert_each_other():
    tok = make_tokenizer()
    for cls in (BlipForConditionalGeneration, BlipForImageTextRetrieval):
        for k in cls(small_hf_config(tok)).state_dict():
            official = hf_to_official_key(k)
            assert official == hf_to_official(k)
            assert official_to_hf_key(official) == k


def test_hf_caption_parity(tmp_path):
    """Vision tokens, LM logits and LM loss (smoothing 0.1) equal transformers' within 1e-5."""
    tok = make_tokenizer()
    hf = build_hf(BlipForConditionalGeneration, tok)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    ck = load_hf(tmp_path / "hf")
    m = ck.model
    assert any("text encoder self-attention initialised" in n for n in ck.notes)
    assert any("itm_head" in n for n in ck.notes)
    assert ck.tokenizer is not None and ck.tokenizer.dec_id == tok.dec_id

    image = torch.randn(3, 3, 32, 32)
    ids, mask = _texts(tok)
    dec = with_first_token(ids, tok.dec_id)
    labels = lm_labels(dec, mask, prompt_len=2)
    with torch.no_grad():
        ref = hf(pixel_values=image, input_ids=dec, attention_mask=mask, labels=labels)
        embeds = m.encode_image(image)
        logits, _ = m.decode(dec, mask, m.cross_kv(embeds))
    torch.testing.assert_close(embeds, ref.last_hidden_state, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(lm_loss(logits, labels), ref.loss, rtol=0, atol=ATOL)
    assert ref.logits.abs().max() > 1.0  # not a trivially small output


def test_hf_retrieval_parity_and_itm_first_token(tmp_path):
    """ITM logits and ITC cosine equal transformers'; [CLS] reproduces HF, [ENC] reproduces official training."""
    tok = make_tokenizer()
    hf = build_hf(BlipForImageTextRetrieval, tok, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ck = load_hf(tmp_path / "hf")
    assert ck.tokenizer is None and any("no tokenizer" in n for n in ck.notes)
    assert any("decoder self-attention initialised" in n for n in ck.notes)
    m = ck.model
    image = torch.randn(1, 3, 32, 32)
    ids, mask = _texts(tok)
    n = ids.shape[0]
    with torch.no_grad():
        embeds = m.encode_image(image)
        itm_cls, cos = itm_itc(m, embeds, ids, mask, tok.cls_id)
        itm_enc, _ = itm_itc(m, embeds, ids, mask, tok.enc_id)
        pixels = image.expand(n, -1, -1, -1)
        ref_cls = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
        ref_enc = hf(input_ids=with_first_token(ids, tok.enc_id), pixel_values=pixels,
                     attention_mask=mask).itm_score
        ref_cos = hf(input_ids=ids, pixel_values=image, attention_mask=mask, use_itm_head=False).itm_score
    torch.testing.assert_close(itm_cls, ref_cls, rtol=0, atol=ATOL)
    torch.testing.assert_close(itm_enc, ref_enc, rtol=0, atol=ATOL)
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=ATOL)
    assert (itm_cls - itm_enc).abs().max() > 1e-3  # the two conventions really differ


@pytest.mark.parametrize("cls,task", [(BlipForConditionalGeneration, "caption"),
                                      (BlipForImageTextRetrieval, "retrieval")])
def test_hf_round_trip_is_bit_identical(tmp_path, cls, task):
    tok = make_tokenizer()
    hf = build_hf(cls, tok, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ck = load_hf(tmp_path / "hf")
    ck.save(tmp_path / "blip")
    back = load_model_dir(tmp_path / "blip")
    save_hf(back.model, tmp_path / "hf2", task, tok)
    _equal_dicts(load_file(tmp_path / "hf2" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"))

    reloaded, info = cls.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    a, b = reloaded.config, hf.config
    for sub in ("text_config", "vision_config"):
        for field in ("num_attention_heads", "layer_norm_eps", "hidden_size", "intermediate_size",
                      "num_hidden_layers"):
            assert getattr(getattr(a, sub), field) == getattr(getattr(b, sub), field), (sub, field)
    assert a.text_config.label_smoothing == 0.1 and a.image_text_hidden_size == b.image_text_hidden_size
    assert (a.text_config.bos_token_id, a.text_config.sep_token_id) == (tok.dec_id, tok.sep_id)


def test_hf_default_config_values_are_kept():
    """BlipTextConfig's defaults (8 heads, eps 1e-5, no smoothing) are mapped as they are, not as BLIP's."""
    tok = make_tokenizer()
    hf_cfg = small_hf_config(tok, text_heads=8, vision_eps=1e-5, label_smoothing=0.0)
    cfg, notes = config_from_hf(hf_cfg)
    assert (cfg.text.num_heads, cfg.vision.ln_eps, cfg.text.ln_eps) == (8, 1e-5, 1e-12)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.mlp_ratio, cfg.embed_dim) == (32, 2, 2.0, 16)
    assert any("label_smoothing is 0.0" in n for n in notes)
    assert cfg.text.init_std == hf_cfg.text_config.initializer_range == 0.02
    hf_cfg.text_config.initializer_range = 0.05
    cfg, _ = config_from_hf(hf_cfg)
    assert cfg.text.init_std == 0.05 and config_to_hf(cfg).text_config.initializer_range == 0.05


def test_hf_hidden_and_attention_dropout_map_both_ways():
    tok = make_tokenizer()
    hf_cfg = small_hf_config(tok)
    hf_cfg.text_config.hidden_dropout_prob, hf_cfg.text_config.attention_probs_dropout_prob = 0.2, 0.0
    cfg, notes = config_from_hf(hf_cfg)
    assert (cfg.text.dropout, cfg.text.attention_dropout) == (0.2, 0.0)
    assert not any("dropout" in n for n in notes)
    back = config_to_hf(cfg).text_config
    assert (back.hidden_dropout_prob, back.attention_probs_dropout_prob) == (0.2, 0.0)


def test_hf_unexpected_and_missing_keys_are_named(tmp_path):
    tok = make_tokenizer()
    hf = build_hf(BlipForConditionalGeneration, tok)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    from safetensors.torch import save_file

    extra = dict(sd, **{"text_decoder.bert.pooler.dense.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match="unexpected keys: text_decoder.bert.pooler.dense.weight"):
        load_hf(tmp_path / "hf")
    partial = {k: v for k, v in sd.items() if k != "text_decoder.bert.encoder.layer.1.output.dense.bias"}
    save_file(partial, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match="missing keys: text_decoder.bert.encoder.layer.1.output.dense.bias"):
        load_hf(tmp_path / "hf")


# --------------------------------------------------------------------------------------------------
# Official layout
# --------------------------------------------------------------------------------------------------


def _official_caption_file(tmp_path, tok):
    """An official-layout caption state dict: HF keys renamed per blip-reference 6.2, tied copies and buffers."""
    torch.manual_seed(3)
    hf = BlipForConditionalGeneration(tiny_preset_hf_config(len(tok), tok)).eval()
    sd = {hf_to_official(k): v.clone() for k, v in hf.state_dict().items()}
    sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    path = tmp_path / "model_caption.pth"
    torch.save({"model": sd, "epoch": 4}, path)
    return path, sd, hf


def test_official_caption_round_trip_and_interpolation(tmp_path):
    tok = make_tokenizer()
    path, sd, hf = _official_caption_file(tmp_path, tok)
    ck = load_official(path, "tiny")
    assert ck.momentum_state is None
    _equal_dicts(official_state_dict(ck.model, "caption"), sd)

    # 32 px -> 48 px: the interpolated position embeddings equal HF's runtime interpolation.
    big = load_official(path, "tiny", image_size=48)
    assert any("interpolated from 4x4 to 6x6" in n for n in big.notes)
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=image, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(big.model.encode_image(image), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("task,with_ids", [("pretrain", False), ("retrieval", True)])
def test_official_round_trip_keeps_momentum_and_queues(tmp_path, task, with_ids):
    tok = make_tokenizer()
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    enc = MomentumEncoders(model)
    queue = FeatureQueue(16, 48, with_ids=with_ids)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01)  # momentum copies differ from the student
        queue.queue_ptr.fill_(5)
    momentum = {**enc.state_dict(), **queue.state_dict()}
    sd = official_state_dict(model, task, momentum)
    assert ("ptr_queue" in sd) == (task == "retrieval") and ("queue_ptr" in sd) == (task == "pretrain")
    path = save_official(model, tmp_path / "ckpt.pth", task, momentum)
    ck = load_official(path, "tiny")
    assert ck.model.cfg.queue_size == 48
    _equal_dicts(ck.momentum_state, momentum)
    _equal_dicts(official_state_dict(ck.model, task, ck.momentum_state), sd)
    # ...and through a blip_core directory.
    ck.save(tmp_path / "blip")
    back = load_model_dir(tmp_path / "blip")
    _equal_dicts(official_state_dict(back.model, task, back.momentum_state), sd)


def test_official_bad_keys_are_named(tmp_path):
    tok = make_tokenizer()
    path, sd, _ = _official_caption_file(tmp_path, tok)
    bad = dict(sd)
    bad["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(32, 16)
    bad["visual_encoder.head.weight"] = torch.zeros(3, 32)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        load_official(tmp_path / "bad.pth", "tiny")
    msg = str(e.value)
    assert "visual_encoder.head.weight" in msg and "crossattention.self.key.weight (32, 16)" in msg

    # An encoder whose shared modules differ from the decoder's (as in VQA) is refused, not silently merged.
    full = official_state_dict(build_model(model_preset("tiny"), vocab_size=len(tok)), "pretrain")
    full["text_encoder.encoder.layer.0.intermediate.dense.bias"] += 1.0
    torch.save({"model": full}, tmp_path / "untied.pth")
    with pytest.raises(UserError, match="tied tensors differ"):
        load_official(tmp_path / "untied.pth", "tiny")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_official(tmp_path / "junk.pth", "tiny")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_convert_cli_hf_to_blip_to_hf(tmp_path, capsys):
    tok = make_tokenizer()
    hf = build_hf(BlipForConditionalGeneration, tok, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    assert cli(["convert", "--from", "hf", str(tmp_path / "hf"), "--to", str(tmp_path / "blip")]) == 0
    out = capsys.readouterr().out
    assert "note: text encoder self-attention initialised" in out and "wrote" in out
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "hf2"),
                "--format", "hf", "--task", "caption"]) == 0
    _equal_dicts(load_file(tmp_path / "hf2" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"))
    assert (tmp_path / "hf2" / "tokenizer_config.json").is_file()

    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "x"),
                "--format", "hf"]) == 2
    assert "--task caption" in capsys.readouterr().err
    assert cli(["convert", "--from", "hf", str(tmp_path / "missing"), "--to", str(tmp_path / "y")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
