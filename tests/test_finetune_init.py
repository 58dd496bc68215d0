"""Fine-tuning from a pre-trained checkpoint: the filter keeps its momentum state, and every stage works at
another image resolution than the pre-training's (the paper: 224 px pre-training, 384 px fine-tuning)."""

import json

import numpy as np
import pytest
import torch
from toy_data import TINY

from blip_core import load_model_dir
from blip_core.checkpoint_io import MOMENTUM_PREFIXES
from blip_core.config import load_config
from blip_core.models import interpolate_pos_embed
from components import capfilt, evaluate, finetune, pretrain

STUDENT = {"visual_encoder_m.": "visual_encoder.", "vision_proj_m.": "vision_proj.",
           "text_encoder_m.": "text_encoder.", "text_proj_m.": "text_proj."}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, toy_data):
    """A tiny model pre-trained for 6 steps at 32 px (patch 8: a 4x4 grid), with momentum encoders and queues."""
    out = tmp_path_factory.mktemp("pre") / "pre"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLIP_TRACKING", "0")
        cfg = load_config(None, TINY + ["pretrain.epochs=1", "pretrain.max_steps=6"])
        pretrain.run(cfg, [toy_data["web"], toy_data["human"]], str(out))
    return str(out)


def _student_key(momentum_key: str) -> str:
    for m, s in STUDENT.items():
        if momentum_key.startswith(m):
            return s + momentum_key[len(m):]
    raise KeyError(momentum_key)


def _expected_ema(pre_m: torch.Tensor, student: torch.Tensor, momentum: float) -> torch.Tensor:
    return momentum * pre_m + (1 - momentum) * student


def test_filter_keeps_the_pretrained_momentum_encoders_and_queues(pretrained, toy_data, tmp_path, no_tracking):
    cfg = load_config(None, TINY + ["finetune_filter.max_steps=1"])
    finetune.run(cfg, "filter", pretrained, [toy_data["human"]], str(tmp_path / "fil"))
    pre = load_model_dir(f"{pretrained}/model")
    fil = load_model_dir(tmp_path / "fil" / "model")
    momentum = pre.model.cfg.momentum
    student = fil.model.state_dict()
    pre_student = pre.model.state_dict()
    # One step: each momentum tensor is one EMA update of the checkpoint's momentum tensor towards the
    # fine-tuned student, not of a fresh copy of the student.
    keys = [k for k in pre.momentum_state if k.startswith(MOMENTUM_PREFIXES)]
    assert keys and set(keys) == {k for k in fil.momentum_state if k.startswith(MOMENTUM_PREFIXES)}
    apart = max(float((pre.momentum_state[k] - pre_student[_student_key(k)]).abs().max()) for k in keys)
    assert apart > 1e-4  # the checkpoint's momentum encoders are not a copy of its student
    for k in keys:
        want = _expected_ema(pre.momentum_state[k], student[_student_key(k)], momentum)
        torch.testing.assert_close(fil.momentum_state[k], want, rtol=0, atol=1e-6, msg=k)
    # The queues: one batch of 8 written at the start (the pointer starts at 0, as the official retrieval
    # model), the rest is the checkpoint's features with unknown image ids.
    b = cfg.finetune_filter.batch_size
    assert int(fil.momentum_state["queue_ptr"]) == b
    for k in ("image_queue", "text_queue"):
        assert torch.equal(fil.momentum_state[k][:, b:], pre.momentum_state[k][:, b:]), k
        assert not torch.equal(fil.momentum_state[k][:, :b], pre.momentum_state[k][:, :b]), k
    assert torch.all(fil.momentum_state["idx_queue"][0, b:] == -100)
    assert torch.all(fil.momentum_state["idx_queue"][0, :b] >= 0)


def test_every_stage_runs_at_another_resolution(pretrained, toy_data, tmp_path, no_tracking):
    """Pre-trained at 32 px (4x4 patches), fine-tuned, bootstrapped and evaluated at 48 px (6x6)."""
    sets = TINY + ["data.image_size=48", "finetune_captioner.max_steps=2", "finetune_filter.max_steps=1",
                   "capfilt.max_length=8", "capfilt.min_length=3", "capfilt.batch_size=8", "evaluate.k_test=4",
                   "evaluate.batch_size=8", "evaluate.itm_batch_size=16", "evaluate.log_samples=0"]
    cfg = load_config(None, sets)
    cap = finetune.run(cfg, "captioner", pretrained, [toy_data["human"]], str(tmp_path / "cap"))
    fil = finetune.run(cfg, "filter", pretrained, [toy_data["human"]], str(tmp_path / "fil"))
    pre = load_model_dir(f"{pretrained}/model")
    for res in (cap, fil):
        ck = load_model_dir(res.model_uri)
        assert ck.model.cfg.vision.image_size == 48 and ck.model.visual_encoder.pos_embed.shape == (1, 37, 32)
        assert ck.notes == []  # saved at 48 px: loads as it is
    # The filter's momentum position embedding started from the checkpoint's, interpolated to 6x6.
    fil_ck = load_model_dir(fil.model_uri)
    key = "visual_encoder_m.pos_embed"
    want = _expected_ema(interpolate_pos_embed(pre.momentum_state[key], 36),
                         fil_ck.model.visual_encoder.pos_embed.detach(), pre.model.cfg.momentum)
    torch.testing.assert_close(fil_ck.momentum_state[key], want, rtol=0, atol=1e-6)

    cf = capfilt.run(cfg, str(tmp_path / "cap"), str(tmp_path / "fil"), [toy_data["web"]], [], str(tmp_path / "cf"),
                     progress=False)
    assert cf.images_in == 64 and sum(cf.texts_out.values()) <= sum(cf.texts_in.values())
    assert json.loads((tmp_path / "cf" / "summary.json").read_text())

    res = evaluate.run(cfg, {"pre": pretrained, "cap": str(tmp_path / "cap"), "fil": str(tmp_path / "fil")},
                       toy_data["test"], str(tmp_path / "eval"))
    for name in ("pre", "cap", "fil"):  # the 32 px pre-trained model is evaluated at 48 px too
        m = res.metrics["models"][name]
        assert np.isfinite(m["mean_r1"]) and 0 <= m["mean_r1"] <= 100, (name, m)
