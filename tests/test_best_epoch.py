"""Fine-tuning with a validation split: the best epoch's model becomes the stage's model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_data import TINY

from blip_core import build_model, load_model_dir, model_preset, save_model_dir
from blip_core.config import load_config
from blip_core.data.splits import load_eval_split
from blip_core.tokenizer import BlipTokenizer
from components import evaluate, finetune, training
from components.best_epoch import Validation
from components.cli import main as blip
from components.tasks import FilterTask

SETS = TINY + ["evaluate.k_test=4", "evaluate.batch_size=12", "evaluate.max_length=10", "evaluate.min_length=3",
               "finetune_captioner.lr=3e-4", "finetune_filter.lr=3e-4"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def init(toy_data, tmp_path_factory) -> str:
    """A tiny random model with a tokenizer built from the toy captions (the fine-tuning starting point)."""
    tok = BlipTokenizer.from_corpus(training.corpus_captions([toy_data["human"], toy_data["test"]], 30), 200)
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    return str(save_model_dir(tmp_path_factory.mktemp("init") / "model", model, tok))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_captioner_keeps_the_epoch_with_the_best_validation_score(toy_data, init, tmp_path, no_tracking):
    out = tmp_path / "cap"
    sets = sum((["--set", s] for s in SETS + ["finetune_captioner.epochs=3"]), [])
    assert blip(["finetune", "--task", "captioner", "--init", init, "--data", toy_data["human"],
                 "--output", str(out), "--val", toy_data["test"], *sets]) == 0
    result = json.loads((out / "result.json").read_text())
    val = result["validation"]
    assert val["metric"] == "cider_bleu4" and val["data"] == toy_data["test"]
    epochs = val["epochs"]
    steps_per_epoch = result["steps"] // 3
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [e["step"] for e in epochs] == [steps_per_epoch * i for i in (1, 2, 3)]
    for e in epochs:
        assert e["score"] == pytest.approx(e["metrics"]["cider"] + e["metrics"]["bleu4"])
    scores = [e["score"] for e in epochs]
    best = epochs[scores.index(max(scores))]  # the earliest of equal scores
    assert val["best"] == best
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_best_epoch"] == best["epoch"] and metrics["val_cider"] == best["metrics"]["cider"]

    # The saved model scores what was recorded for its epoch ...
    ckpt = load_model_dir(out / "model")
    cfg = load_config(None, SETS)
    split = load_eval_split(toy_data["test"], 32)
    ecfg = dataclasses.replace(cfg.evaluate, prompt=cfg.finetune_captioner.prompt)
    again, _ = evaluate.caption_metrics(ckpt.model.eval(), ckpt.tokenizer, split, ecfg)
    assert again["cider"] + again["bleu4"] == pytest.approx(best["score"])
    # ... and holds the weights of that epoch: the same training stopped at the chosen step.
    stop = tmp_path / "stop"
    sets = sum((["--set", s] for s in SETS + ["finetune_captioner.epochs=3",
                                              f"finetune_captioner.max_steps={best['step']}"]), [])
    assert blip(["finetune", "--task", "captioner", "--init", init, "--data", toy_data["human"],
                 "--output", str(stop), *sets]) == 0
    assert json.loads((stop / "result.json").read_text())["validation"] is None
    _assert_same(_weights(out), _weights(stop))


def test_filter_selection_follows_the_validation_score_and_survives_a_rerun(toy_data, init, tmp_path, no_tracking,
                                                                            monkeypatch):
    """The filter's scorer is scripted (best after epoch 2 of 3): model/ (with its momentum state) is epoch 2's."""
    script = iter([10.0, 30.0, 20.0])
    calls = []

    def scripted(self, cfg, tokenizer, val, image_size):
        def score(model):
            assert not model.training
            calls.append(1)
            return {"r_mean": next(script), "tr_r1": 0.0}

        return Validation(data=",".join(val), metric="r_mean", evaluate=score)

    monkeypatch.setattr(FilterTask, "validation", scripted)
    cfg = load_config(None, SETS + ["finetune_filter.epochs=3"])
    out = tmp_path / "fil"
    res = finetune.run(cfg, "filter", init, [toy_data["human"]], str(out), val=[toy_data["test"]])
    spe = res.steps // 3
    assert [(e["epoch"], e["step"], e["score"]) for e in res.validation["epochs"]] == \
        [(1, spe, 10.0), (2, 2 * spe, 30.0), (3, 3 * spe, 20.0)]
    assert res.validation["best"]["epoch"] == 2
    history = json.loads((out / "validation" / "history.json").read_text())
    assert [e["score"] for e in history["epochs"]] == [10.0, 30.0, 20.0]

    stop = tmp_path / "stop"
    cfg_stop = load_config(None, SETS + ["finetune_filter.epochs=3", f"finetune_filter.max_steps={2 * spe}"])
    finetune.run(cfg_stop, "filter", init, [toy_data["human"]], str(stop))
    _assert_same(_weights(out), _weights(stop))
    _assert_same(load_file(out / "model" / "momentum.safetensors"), load_file(stop / "model" / "momentum.safetensors"))
    # The last epoch's weights (the final training checkpoint) differ from the chosen ones.
    final = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert final.name == f"step-{3 * spe:08d}"
    trained = load_file(final / "objective.safetensors")
    chosen = _weights(out)
    shared = [k for k in chosen if f"model.{k}" in trained]
    assert shared and any(not torch.equal(chosen[k], trained[f"model.{k}"]) for k in shared)

    # Run again on the finished output: it resumes at the end and keeps its choice without scoring again.
    n_calls = len(calls)
    again = finetune.run(cfg, "filter", init, [toy_data["human"]], str(out), val=[toy_data["test"]])
    assert len(calls) == n_calls
    assert again.validation == res.validation
    _assert_same(_weights(out), chosen)


def test_a_run_stopped_mid_epoch_is_scored_at_its_last_step(toy_data, init, tmp_path, no_tracking, monkeypatch):
    scores = iter([1.0, 2.0])

    def scripted(self, cfg, tokenizer, val, image_size):
        return Validation(data=",".join(val), metric="r_mean", evaluate=lambda m: {"r_mean": next(scores)})

    monkeypatch.setattr(FilterTask, "validation", scripted)
    cfg = load_config(None, SETS + ["finetune_filter.epochs=2", "finetune_filter.max_steps=20"])
    res = finetune.run(cfg, "filter", init, [toy_data["human"]], str(tmp_path / "o"), val=[toy_data["test"]])
    spe = 120 // 8  # 24 images x 5 captions, batch 8
    assert res.steps == 20
    assert [(e["epoch"], e["step"]) for e in res.validation["epochs"]] == [(1, spe), (1.333, 20)]
    assert res.validation["best"]["step"] == 20


def test_bad_validation_data_is_one_clear_line(toy_data, init, tmp_path, no_tracking, capsys):
    assert blip(["finetune", "--task", "filter", "--init", init, "--data", toy_data["human"],
                 "--output", str(tmp_path / "o"), "--val", str(tmp_path / "missing"), "--set", "model.preset=tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_s3_output_keeps_the_choice_on_a_fresh_machine(toy_data, init, tmp_path, s3_bucket, no_tracking,
                                                       monkeypatch):
    """validation/ is uploaded with the checkpoints: a restarted job with an empty work dir keeps the choice."""
    from components import storage

    script = iter([5.0, 1.0])
    calls = []

    def scripted(self, cfg, tokenizer, val, image_size):
        def score(model):
            calls.append(1)
            return {"r_mean": next(script)}

        return Validation(data=",".join(val), metric="r_mean", evaluate=score)

    monkeypatch.setattr(FilterTask, "validation", scripted)
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work1"))
    cfg = load_config(None, SETS + ["finetune_filter.epochs=2"])
    out = f"s3://{s3_bucket}/runs/filter"
    first = finetune.run(cfg, "filter", init, [toy_data["human"]], out, val=[toy_data["test"]])
    assert first.validation["best"]["epoch"] == 1 and len(calls) == 2
    assert storage.exists(f"{out}/validation/best/model.safetensors")
    chosen = storage.read_bytes(f"{out}/model/model.safetensors")
    assert chosen == storage.read_bytes(f"{out}/validation/best/model.safetensors")

    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work2"))
    again = finetune.run(cfg, "filter", init, [toy_data["human"]], out, val=[toy_data["test"]])
    assert again.resumed_from is not None and len(calls) == 2
    assert again.validation == first.validation
    assert storage.read_bytes(f"{out}/model/model.safetensors") == chosen
