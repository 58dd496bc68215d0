"""The VQA stage end to end on tiny toy-web data: pre-train, ``blip finetune --task vqa``, ``blip evaluate --vqa``,
``blip vqa`` on the fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_core.checkpoint_io import load_model_dir
from blip_core.config import load_config
from blip_core.models.vqa import BlipVQA
from components import cli as blip_cli
from components import evaluate, finetune, ingest, pretrain
from tests.toy_data import TINY

VQA = TINY + ["finetune_vqa.batch_size=8", "finetune_vqa.epochs=1", "finetune_vqa.max_steps=3",
              "finetune_vqa.lr=1e-4", "evaluate.k_test=4", "evaluate.vqa_k_test=8", "evaluate.log_samples=1"]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqadata")
    cfg = load_config(None, ["ingest.resolution=32"])
    out = {}
    for split, n in (("vqa_train", 16), ("vqa_test", 6)):
        out[split] = str(root / split)
        ingest.run(cfg, f"toyweb://?split={split}&n={n}&seed=1&size=32", out[split], progress=False)
    return out


@pytest.fixture(scope="module")
def vqa_model(toy_data, vqa_data, tmp_path_factory):
    """A tiny pre-training (its vocabulary built from the web captions and the VQA questions and answers), then
    VQA fine-tuning from it."""
    root = tmp_path_factory.mktemp("vqarun")
    cfg = load_config(None, VQA + ["pretrain.max_steps=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLIP_TRACKING", "0")
        pre = pretrain.run(cfg, [toy_data["web"]], str(root / "pre"), vocab_data=[vqa_data["vqa_train"]])
        res = finetune.run(cfg, "vqa", pre.output, [vqa_data["vqa_train"]], str(root / "vqa"))
    from blip_core.tokenizer import BlipTokenizer

    tok = BlipTokenizer.from_dir(Path(pre.model_uri) / "tokenizer")
    assert "what" in tok.hf.get_vocab()  # a question word, absent from the captions

    return {"pre": pre, "vqa": res, "root": root, "cfg": cfg}


def test_finetune_vqa_writes_a_vqa_model_with_the_training_answers(vqa_model, vqa_data):
    res = vqa_model["vqa"]
    assert res.steps == 3
    assert set(res.losses) == {"vqa", "loss"}
    model_dir = Path(res.model_uri)
    ckpt = load_model_dir(model_dir)
    assert isinstance(ckpt.model, BlipVQA)
    answers = json.loads((model_dir / "answer_list.json").read_text())
    train_answers = json.loads((Path(vqa_data["vqa_train"]) / "answer_list.json").read_text())
    assert answers == train_answers
    # nothing of the pre-trained model is shared between the question encoder and the answer decoder
    enc = ckpt.model.text_encoder.layers[0].intermediate.dense.weight
    dec = ckpt.model.text_decoder.bert.layers[0].intermediate.dense.weight
    assert enc.data_ptr() != dec.data_ptr()


def test_vqa_finetune_moves_the_weights_from_the_pretrained_ones(vqa_model):
    import torch

    pre = load_model_dir(Path(vqa_model["pre"].model_uri)).model
    vqa = load_model_dir(Path(vqa_model["vqa"].model_uri)).model
    start = BlipVQA.from_blip(pre)
    moved = [n for n, p in vqa.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any(n.startswith("text_decoder.") for n in moved)
    assert any(n.startswith("text_encoder.") for n in moved)


def test_evaluate_reports_vqa_accuracy_per_kind_and_the_baseline(vqa_model, toy_data, vqa_data, tmp_path,
                                                                 no_tracking):
    cfg = vqa_model["cfg"]
    res = evaluate.run(cfg, {"noisy": vqa_model["pre"].output}, toy_data["test"], str(tmp_path / "ev"),
                       vqa={"noisy": vqa_model["vqa"].output}, vqa_test=vqa_data["vqa_test"])
    vq = res.metrics["vqa"]
    m = vq["models"]["noisy"]
    assert 0.0 <= m["accuracy"] <= 100.0 and m["questions"] == vq["test"]["questions"] > 0
    assert set(m["per_kind"]) and sum(k["questions"] for k in m["per_kind"].values()) == m["questions"]
    assert vq["baseline"]["answer"] == json.loads(
        (Path(vqa_model["vqa"].model_uri) / "answer_list.json").read_text())[0]
    assert res.metrics["models"]["noisy"]["vqa_acc"] == m["accuracy"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## VQA" in report and "majority baseline" in report
    assert "VQA acc" in report
    # generate mode gives answers too, scored the same way
    cfg_gen = load_config(None, VQA + ["evaluate.vqa_inference=generate", "evaluate.vqa_num_beams=1"])
    res2 = evaluate.run(cfg_gen, {"noisy": vqa_model["pre"].output}, toy_data["test"], str(tmp_path / "ev2"),
                        vqa={"noisy": vqa_model["vqa"].output}, vqa_test=vqa_data["vqa_test"])
    assert res2.metrics["vqa"]["test"]["inference"] == "generate"


def test_evaluate_refuses_a_non_vqa_model_as_a_vqa_model(vqa_model, toy_data, vqa_data, tmp_path, capsys,
                                                         no_tracking):
    rc = blip_cli.main(["evaluate", "--model", f"noisy={vqa_model['pre'].output}", "--test", toy_data["test"],
                        "--vqa", f"noisy={vqa_model['pre'].output}", "--vqa-test", vqa_data["vqa_test"],
                        "--output", str(tmp_path / "ev"), "--set", "model.preset=tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a VQA model" in err and len(err.splitlines()) == 1


def test_blip_vqa_ranks_the_model_answer_list(vqa_model, vqa_data, tmp_path, capsys):
    from blip_core.data.toyweb import generate, parse_toyweb_uri

    sample = next(generate(parse_toyweb_uri("toyweb://?split=vqa_test&n=1&seed=3&size=32")))
    img = tmp_path / "q.jpg"
    img.write_bytes(sample.jpg)
    answers = Path(vqa_model["vqa"].model_uri) / "answer_list.json"
    rc = blip_cli.main(["vqa", "--checkpoint", vqa_model["vqa"].model_uri, str(img), "--question",
                        "what color is the circle?", "--answers", str(answers), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    rec = json.loads(out[0])
    assert rec["answer"] in json.loads(answers.read_text()) and "score" in rec


def test_finetune_vqa_with_validation_keeps_the_best_epoch(vqa_model, vqa_data, tmp_path, no_tracking):
    cfg = load_config(None, VQA + ["finetune_vqa.epochs=2", "finetune_vqa.max_steps=0"])
    res = finetune.run(cfg, "vqa", vqa_model["pre"].output, [vqa_data["vqa_train"]], str(tmp_path / "v"),
                       val=[vqa_data["vqa_test"]])
    v = res.validation
    assert v["metric"] == "vqa_acc" and len(v["epochs"]) == 2
    assert v["best"]["score"] == max(e["score"] for e in v["epochs"])
    assert (tmp_path / "v" / "model" / "answer_list.json").is_file()


def test_the_logged_vqa_model_answers_questions_through_mlflow(vqa_model, tmp_path, monkeypatch):
    """``log_blip_model`` of a VQA checkpoint: the pyfunc takes image + question and returns answers."""
    import base64

    import mlflow
    import pandas as pd

    from blip_core.data.toyweb import generate, parse_toyweb_uri
    from components.tracking import pipeline_run, stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("BLIP_TRACKING", raising=False)
    monkeypatch.delenv("BLIP_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    with pipeline_run():
        with stage_run("finetune_vqa", {"task": "vqa"}, log_system_metrics=False) as run:
            uri = run.log_blip_model(vqa_model["vqa"].model_uri)
    model = mlflow.pyfunc.load_model(uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image", "question"]
    sample = next(generate(parse_toyweb_uri("toyweb://?split=vqa_test&n=1&seed=3&size=32")))
    image = base64.b64encode(sample.jpg).decode()
    out = model.predict(pd.DataFrame({"image": [image, image], "question": ["what color is the circle?",
                                                                             "how many shapes are there?"]}))
    assert list(out.columns) == ["answer"] and len(out) == 2 and all(isinstance(a, str) for a in out["answer"])
    with pytest.raises(Exception, match="row 0: empty question"):
        model.predict(pd.DataFrame({"image": [image], "question": [" "]}))
    mlflow.set_tracking_uri(None)
