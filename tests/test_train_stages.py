import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_data import TINY

from blip_core import load_model_dir
from blip_core.config import load_config
from blip_core.errors import UserError
from components import finetune, ingest, pretrain, storage
from components.cli import main as blip

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_then_finetune_both_heads(toy_data, tmp_path, no_tracking):
    pre = tmp_path / "pre"
    assert blip(["pretrain", "--data", toy_data["web"], toy_data["human"], "--output", str(pre),
                 *sum((["--set", s] for s in TINY + ["pretrain.epochs=1"]), [])]) == 0
    result = json.loads((pre / "result.json").read_text())
    assert result["steps"] == (64 + 24 * 5) // 8 and result["epochs"] == 1
    log = json.loads((pre / "train_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, result["steps"] + 1))
    ckpt = load_model_dir(pre / "model")
    assert ckpt.momentum_state is not None and "image_queue" in ckpt.momentum_state
    assert ckpt.tokenizer is not None and len(ckpt.tokenizer) == ckpt.model.cfg.text.vocab_size

    cfg = load_config(None, TINY + ["finetune_captioner.epochs=1", "finetune_filter.epochs=1"])
    cap = finetune.run(cfg, "captioner", str(pre), [toy_data["human"]], str(tmp_path / "cap"))
    fil = finetune.run(cfg, "filter", str(pre), [toy_data["human"]], str(tmp_path / "fil"))
    assert set(cap.losses) == {"lm", "loss"} and set(fil.losses) == {"itc", "itm", "loss"}
    # The captioner changes only the image encoder and the decoder; the filter leaves the decoder's own
    # self-attention untouched.
    pre_w = load_file(pre / "model" / "model.safetensors")
    cap_w = load_file(tmp_path / "cap" / "model" / "model.safetensors")
    fil_w = load_file(tmp_path / "fil" / "model" / "model.safetensors")
    assert torch.equal(pre_w["itm_head.weight"], cap_w["itm_head.weight"])
    assert not torch.equal(pre_w["itm_head.weight"], fil_w["itm_head.weight"])
    dec_sa = "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(pre_w[dec_sa], fil_w[dec_sa]) and not torch.equal(pre_w[dec_sa], cap_w[dec_sa])


def test_bad_input_is_one_clear_line(tmp_path, no_tracking, capsys):
    assert blip(["pretrain", "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"),
                 "--set", "model.preset=tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blip pretrain: error:") and "nothing" in err[0]
    assert blip(["pretrain", "--data", "x", "--output", "y", "--set", "pretrain.lr=fast"]) == 2
    assert "pretrain.lr" in capsys.readouterr().err


def test_s3_output_uploads_checkpoints_and_resumes(toy_data, tmp_path, s3_bucket, no_tracking, monkeypatch):
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work1"))
    data = f"s3://{s3_bucket}/data/web"
    storage.upload_dir(toy_data["web"], data)
    out = f"s3://{s3_bucket}/runs/pre"
    cfg = load_config(None, TINY + ["pretrain.epochs=2", "pretrain.max_steps=5", "pretrain.checkpoint_every=2"])
    first = pretrain.run(cfg, [data], out)
    assert first.steps == 5
    assert storage.exists(f"{out}/checkpoints/latest.json") and storage.exists(f"{out}/result.json")
    assert storage.exists(f"{out}/model/model.safetensors")
    # A fresh machine (empty work dir) resumes from the checkpoint on S3.
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work2"))
    cfg = load_config(None, TINY + ["pretrain.epochs=2", "pretrain.checkpoint_every=2"])
    second = pretrain.run(cfg, [data], out)
    assert second.resumed_from is not None and "step-00000005" in second.resumed_from
    assert second.steps == 2 * (64 // 8)


def test_a_resumed_run_keeps_the_training_log_and_final_losses(toy_data, tmp_path, no_tracking):
    out = tmp_path / "pre"
    base = TINY + ["pretrain.epochs=1", "pretrain.log_every=1", "pretrain.checkpoint_every=2"]
    first = pretrain.run(load_config(None, base + ["pretrain.max_steps=3"]), [toy_data["web"]], str(out))
    log_3 = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log_3] == [1, 2, 3]
    # Continued to 5 steps by a new process: the log holds the first run's records, then the new ones.
    second = pretrain.run(load_config(None, base + ["pretrain.max_steps=5"]), [toy_data["web"]], str(out))
    assert second.resumed_from is not None and second.steps == 5
    log_5 = json.loads((out / "train_log.json").read_text())
    assert log_5[:3] == log_3 and [r["step"] for r in log_5] == [1, 2, 3, 4, 5]
    metrics_5 = json.loads((out / "metrics.json").read_text())
    # Run again when nothing is left to train: the log, the final losses and the rates are still the last run's.
    third = pretrain.run(load_config(None, base + ["pretrain.max_steps=5"]), [toy_data["web"]], str(out))
    assert third.resumed_from is not None and third.losses == second.losses != first.losses
    assert json.loads((out / "train_log.json").read_text()) == log_5
    assert json.loads((out / "metrics.json").read_text()) == metrics_5
    assert metrics_5["final_loss"] == pytest.approx(log_5[-1]["loss"]) and metrics_5["pairs_per_second"] > 0


def test_vit_and_bert_initialisation_from_s3(tmp_path, s3_bucket, no_tracking):
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertForMaskedLM

    from blip_core import build_model, model_preset
    from blip_core.pretrained import load_bert_weights, load_vit_weights

    cfg = model_preset("tiny")
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    bert = BertForMaskedLM(BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")

    model = build_model(cfg, vocab_size=92)
    ignored = load_vit_weights(model, tmp_path / "vit.pth")
    assert ignored == ["head.bias", "head.weight"]
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert model.visual_encoder.pos_embed.shape[1] == 1 + 16  # 16 px -> 32 px: 4 -> 16 patches
    conv = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem="conv"))
    with pytest.raises(UserError, match=r"model.vision.stem=conv"):
        load_vit_weights(build_model(conv, vocab_size=92), tmp_path / "vit.pth")
    unused = load_bert_weights(model, tmp_path / "bert")
    assert "bert.embeddings.token_type_embeddings.weight" not in unused
    sd = bert.state_dict()
    q = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(model.text_encoder.layers[1].attention.self.query.weight, sd[q])
    assert torch.equal(model.text_decoder.bert.layers[1].attention.self.query.weight, sd[q])
    emb = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb[:90], sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.text_decoder.cls.predictions.bias[:90], sd["cls.predictions.bias"])

    # The stage reads both from s3://.
    storage.upload_file(tmp_path / "vit.pth", f"s3://{s3_bucket}/init/vit.pth")
    storage.upload_dir(tmp_path / "bert", f"s3://{s3_bucket}/init/bert")
    with storage.local_copy(f"s3://{s3_bucket}/init/vit.pth") as p:
        assert load_vit_weights(build_model(cfg, vocab_size=92), p) == ["head.bias", "head.weight"]


def _stage_cmd(stage, args, out, extra):
    """``python -m components.<stage> <args> --output <out>`` with the tiny config and ``extra`` overrides."""
    sets = sum((["--set", s] for s in TINY + extra), [])
    return [sys.executable, "-m", f"components.{stage}", *args, "--output", str(out), *sets]


def _pretrain_cmd(data, out, extra):
    return _stage_cmd("pretrain", ["--data", data], out, extra)


def _kill_after_checkpoint(cmd, out, env, step):
    """Start ``cmd``, SIGKILL it once ``out/checkpoints/latest.json`` names a step >= ``step``."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["step"] >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists() and not (out / "model").exists()


def _assert_same_files(a_dir, b_dir, names=("model.safetensors", "momentum.safetensors")):
    """The safetensors files ``names`` of two model directories hold bit-identical tensors."""
    for name in names:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(toy_data, tmp_path):
    env = {**os.environ, "BLIP_TRACKING": "0", "OMP_NUM_THREADS": "1"}
    extra = ["pretrain.epochs=2", "pretrain.checkpoint_every=3"]
    ref = tmp_path / "ref"
    subprocess.run(_pretrain_cmd(toy_data["web"], ref, extra), check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)

    out = tmp_path / "killed"
    _kill_after_checkpoint(_pretrain_cmd(toy_data["web"], out, extra), out, env, step=6)
    subprocess.run(_pretrain_cmd(toy_data["web"], out, extra), check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] and result["steps"] == 16
    _assert_same_files(ref / "model", out / "model")


def test_sigkill_during_filter_finetune_and_resume_gives_identical_weights(toy_data, tmp_path, no_tracking):
    """The filter carries momentum encoders and queues (from its pre-trained init) through the checkpoint."""
    init = tmp_path / "pre"
    pretrain.run(load_config(None, TINY + ["pretrain.max_steps=2"]), [toy_data["web"]], str(init))
    assert "image_queue" in load_file(init / "model" / "momentum.safetensors")
    env = {**os.environ, "BLIP_TRACKING": "0", "OMP_NUM_THREADS": "1"}
    extra = ["finetune_filter.epochs=1", "finetune_filter.checkpoint_every=4"]

    def cmd(out):
        return _stage_cmd("finetune", ["--task", "filter", "--init", str(init), "--data", toy_data["human"]],
                          out, extra)

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    _kill_after_checkpoint(cmd(out), out, env, step=4)
    subprocess.run(cmd(out), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] and "step-0000000" in result["resumed_from"]
    assert result["steps"] == json.loads((ref / "result.json").read_text())["steps"] == 24 * 5 // 8
    assert result["losses"] == json.loads((ref / "result.json").read_text())["losses"]
    _assert_same_files(ref / "model", out / "model")
    queues = load_file(out / "model" / "momentum.safetensors")
    assert "image_queue" in queues and "text_queue" in queues


def test_pretrain_refuses_a_dataset_missing_a_shard_unless_partial_is_allowed(tmp_path, no_tracking, capsys):
    web = tmp_path / "web"
    ingest.run(load_config(None, ["ingest.resolution=32", "ingest.shard_size=16"]),
               "toyweb://?split=web&n=64&seed=1&size=32", str(web), progress=False)
    (web / "shard-000000.tar").unlink()
    args = ["pretrain", "--data", str(web), "--output", str(tmp_path / "pre"),
            *sum((["--set", s] for s in TINY + ["pretrain.max_steps=2"]), [])]
    assert blip(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-000000.tar: missing" in err[0] and "data.allow_partial" in err[0]
    assert blip([*args, "--set", "data.allow_partial=true"]) == 0
    metrics = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert metrics["lost_samples"] == 16 and metrics["lost_shards"] == 1


def test_resume_from_s3_replaces_a_local_checkpoint_whose_download_was_cut_short(tmp_path, s3_bucket):
    from components.training import fetch_latest_checkpoint

    output = f"s3://{s3_bucket}/pre"
    files = ("objective.safetensors", "optimizer.safetensors", "train_state.json")
    for step in ("step-00000002", "step-00000004"):
        for f in files:
            storage.write_bytes(f"{output}/checkpoints/{step}/{f}", f"{step}/{f}".encode())
    storage.write_json(f"{output}/checkpoints/latest.json", {"checkpoint": "step-00000004", "step": 4})
    local = tmp_path / "work" / "checkpoints"
    (local / "step-00000002").mkdir(parents=True)  # an earlier, complete download
    for f in files:
        (local / "step-00000002" / f).write_bytes(f"step-00000002/{f}".encode())
    (local / "latest.json").write_text(json.dumps({"checkpoint": "step-00000002"}))
    (local / "step-00000004").mkdir()  # the newest one, cut short after its first file
    (local / "step-00000004" / files[0]).write_bytes(b"step-00000004/objective.safetensors")
    fetch_latest_checkpoint(output, tmp_path / "work")
    assert json.loads((local / "latest.json").read_text())["checkpoint"] == "step-00000004"
    assert [(local / "step-00000004" / f).read_bytes() for f in files] == [f"step-00000004/{f}".encode() for f in files]
    assert sorted(p.name for p in local.iterdir()) == ["latest.json", "step-00000002", "step-00000004"]
