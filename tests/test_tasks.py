"""The task interface: a task defined outside the library trains through the real stage, loop and validation;
the registry; what a checkpoint's resume identity covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toy_data import TINY

from blip_core import build_model, model_preset, save_model_dir
from blip_core.config import TrainConfig, load_config
from blip_core.data.loader import make_loader
from blip_core.data.splits import load_eval_split
from blip_core.errors import UserError
from blip_core.objectives import Objective, ObjectiveOutput
from blip_core.tokenizer import BlipTokenizer
from components import pretrain, tasks, training
from components.best_epoch import Validation
from components.cli import main as blip


class BrightnessModel(nn.Module):
    """The pre-trained ViT with a regression head on its [CLS] token: no text, no temperature."""

    def __init__(self, visual_encoder: nn.Module, width: int):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.head = nn.Linear(width, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual_encoder(pixels)[:, 0]).squeeze(1)


class BrightnessObjective(Objective):
    """Mean squared error of the predicted mean pixel value; a batch layout of its own, no momentum."""

    batch_keys = ("pixels", "target")

    def __init__(self, model: BrightnessModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, target: torch.Tensor) -> ObjectiveOutput:
        loss = nn.functional.mse_loss(self.model(pixels), target)
        return ObjectiveOutput(loss=loss, samples=pixels.shape[0], parts={"mse": loss})


class BrightnessLoader:
    """The pair loader's batches turned into {pixels, target}."""

    def __init__(self, loader):
        self.inner = loader
        self.lost = loader.lost

    skipped = property(lambda self: self.inner.skipped)
    lost_samples = property(lambda self: self.inner.lost_samples)

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        for batch in self.inner:
            yield {"pixels": batch["image"], "target": batch["image"].mean(dim=(1, 2, 3))}


class BrightnessTask(tasks.Task):
    """A task the library does not know: its own model, objective, batches, metric, settings and saving."""

    name = "brightness"
    section = "finetune_brightness"

    def __init__(self, tcfg: TrainConfig):
        self.tcfg = tcfg

    def train_config(self, cfg):
        return self.tcfg

    def prepare_model(self, model, cfg):
        return BrightnessModel(model.visual_encoder, model.cfg.vision.width)

    def objective(self, model, tokenizer, cfg, info):
        return BrightnessObjective(model)

    def loader(self, cfg, data, tokenizer, *, image_size, info):
        return BrightnessLoader(make_loader(data, tokenizer, image_size=image_size, batch_size=self.tcfg.batch_size,
                                            train=True, randaugment=False, seed=self.tcfg.seed, rank=info.rank,
                                            world_size=info.world_size, shuffle_buffer=cfg.data.shuffle_buffer))

    def validation(self, cfg, tokenizer, val, image_size):
        split = load_eval_split(val, image_size)

        def evaluate(model):
            target = split.images.mean(dim=(1, 2, 3))
            return {"neg_mse": -float(nn.functional.mse_loss(model(split.images), target))}

        return Validation(data=",".join(val), metric="neg_mse", evaluate=evaluate)

    def no_weight_decay(self, model):
        return set()

    def save_model(self, dst, model, tokenizer, momentum_state):
        assert momentum_state is None
        Path(dst).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(Path(dst) / "weights.safetensors"))


@pytest.fixture(scope="module")
def init(toy_data, tmp_path_factory):
    tok = BlipTokenizer.from_corpus(training.corpus_captions([toy_data["human"]], 30), 200)
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    return str(save_model_dir(tmp_path_factory.mktemp("init") / "model", model, tok))


def test_a_task_defined_outside_the_library_trains_through_the_stage(toy_data, init, tmp_path, no_tracking,
                                                                     monkeypatch):
    tcfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=0, schedule="cosine", min_lr=0.0, log_every=1)
    monkeypatch.setitem(tasks.TASKS, "brightness", BrightnessTask(tcfg))
    out = tmp_path / "bright"
    # `blip finetune --task` offers every registered task; the stage, run_training and the loop are unchanged.
    assert blip(["finetune", "--task", "brightness", "--init", init, "--data", toy_data["human"],
                 "--output", str(out), "--val", toy_data["test"], "--set", "model.preset=tiny"]) == 0
    result = json.loads((out / "result.json").read_text())
    steps_per_epoch = 24 // 8  # one pair per image
    assert result["stage"] == "finetune_brightness" and result["steps"] == 2 * steps_per_epoch
    assert set(result["losses"]) == {"mse", "loss"}
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 2 * steps_per_epoch + 1))
    assert "temp" not in log[0] and log[-1]["pairs_per_second"] > 0
    assert log[-1]["loss_mse"] < log[0]["loss_mse"]
    val = result["validation"]
    assert val["metric"] == "neg_mse" and [e["step"] for e in val["epochs"]] == [steps_per_epoch, 2 * steps_per_epoch]
    # model/ is the task's own format: the chosen epoch's wrapped model, ViT included, and it was trained.
    saved = load_file(out / "model" / "weights.safetensors")
    assert set(saved) == set(load_file(out / "validation" / "best" / "weights.safetensors"))
    assert "head.weight" in saved and not any(k.startswith("text_") for k in saved)
    start = load_file(Path(init) / "model.safetensors")
    assert not torch.equal(saved["visual_encoder.patch_embed.proj.weight"], start["visual_encoder.patch_embed.proj.weight"])
    # The checkpoint's resume identity holds the task's own section.
    state = json.loads((out / "checkpoints" / f"step-{2 * steps_per_epoch:08d}" / "train_state.json").read_text())
    assert state["config"]["finetune_brightness"]["lr"] == 1e-3


def test_the_registry(capsys):
    assert set(tasks.TASKS) >= {"pretrain", "captioner", "filter"}
    assert tasks.get_task("filter").section == "finetune_filter"
    assert tasks.finetune_tasks() == ["captioner", "filter", "vqa"]
    with pytest.raises(UserError, match=r"unknown task 'nlvr'; choose one of pretrain, captioner, filter, vqa"):
        tasks.get_task("nlvr")
    with pytest.raises(SystemExit) as e:
        blip(["finetune", "--task", "pretrain", "--init", "x", "--data", "y", "--output", "z"])
    assert e.value.code == 2 and "invalid choice: 'pretrain'" in capsys.readouterr().err
    # The text lengths of each task come from one place.
    cfg = load_config(None, ["model.max_text_len=17"])
    assert tasks.get_task("pretrain").loader_settings(cfg)["max_length"] == 17
    assert tasks.get_task("captioner").loader_settings(cfg)["max_length"] == 40
    assert tasks.get_task("filter").loader_settings(cfg)["max_length"] == 35


def _pretrain(data, out, extra):
    return pretrain.run(load_config(None, TINY + ["pretrain.epochs=1", "pretrain.checkpoint_every=3", *extra]),
                        [data], str(out))


def test_resume_depends_only_on_the_stages_own_sections(toy_data, tmp_path, no_tracking):
    """A pre-empted pre-training (stopped at step 3) resumes after another stage's settings were edited, and
    starts over after its own were."""
    steps = 64 // 8
    out = tmp_path / "pre"
    assert _pretrain(toy_data["web"], out, ["pretrain.max_steps=3"]).steps == 3
    res = _pretrain(toy_data["web"], out, ["capfilt.top_p=0.5", "finetune_filter.lr=1e-3", "evaluate.k_test=7",
                                           "sources.web=toyweb://?split=web&n=10"])
    assert res.resumed_from is not None and res.resumed_from.endswith("step-00000003") and res.steps == steps

    out = tmp_path / "pre2"
    _pretrain(toy_data["web"], out, ["pretrain.max_steps=3"])
    res = _pretrain(toy_data["web"], out, ["pretrain.lr=1e-4"])
    assert res.resumed_from is None and res.steps == steps
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, steps + 1))


def test_a_finetuning_resumes_only_from_the_same_initial_model(toy_data, init, tmp_path, no_tracking):
    """Checkpoints of a fine-tuning are continued by a re-run from the same pre-trained model only: after the
    pre-trained model changed (a re-run upstream stage), the fine-tuning starts over from the new one."""
    from components import finetune

    other = tmp_path / "other" / "model"
    m = training.load_init(init)
    with torch.no_grad():
        m[0].itm_head.bias.add_(1.0)
    save_model_dir(other, m[0], m[1])
    cfg = load_config(None, TINY + ["finetune_captioner.epochs=1", "finetune_captioner.checkpoint_every=1"])
    out = str(tmp_path / "cap")
    stopped = load_config(None, TINY + ["finetune_captioner.epochs=1", "finetune_captioner.max_steps=1"])
    assert finetune.run(stopped, "captioner", init, [toy_data["human"]], out).steps == 1
    assert finetune.run(cfg, "captioner", init, [toy_data["human"]], out).resumed_from is not None
    assert finetune.run(stopped, "captioner", init, [toy_data["human"]], str(tmp_path / "cap2")).steps == 1
    assert finetune.run(cfg, "captioner", str(other), [toy_data["human"]], str(tmp_path / "cap2")).resumed_from is None
