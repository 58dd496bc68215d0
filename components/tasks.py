"""Training tasks: everything that makes pre-training, the captioner and the filter differ, one object each.

A :class:`Task` names its config section and registered model, prepares the model it trains from the loaded
(or freshly built) :class:`~blip_core.models.blip.BlipModel` (which parameters train; a task may wrap the model
in another module), builds its :class:`~blip_core.objectives.Objective` (loss parts, momentum hooks), its
training loader (text lengths, prompt) and its validation metric. :func:`components.training.run_training` and
the loop (:mod:`blip_core.train.loop`) know no task: they only call this interface.

Adding a task (e.g. VQA) is one subclass here, registered in :data:`TASKS`, and its ``TrainConfig`` section in
:class:`blip_core.config.Config`; ``blip finetune --task`` offers every registered fine-tuning task.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

from torch import nn

from blip_core.checkpoint_io import save_model_dir
from blip_core.config import Config, TrainConfig
from blip_core.constants import CAPTIONER_TEXT_TOKENS, QUESTION_MAX_TOKENS, RETRIEVAL_TEXT_TOKENS
from blip_core.data.loader import make_loader, pin_memory_for
from blip_core.data.samples import read_answer_list
from blip_core.data.splits import load_eval_split, load_vqa_split
from blip_core.data.vqa_loader import make_vqa_loader
from blip_core.data.webdataset_io import ANSWER_LIST_NAME
from blip_core.errors import UserError
from blip_core.models.blip import BlipModel
from blip_core.models.vqa import BlipVQA, is_vqa
from blip_core.objectives import (
    CaptionerObjective,
    FilterObjective,
    Objective,
    PretrainObjective,
    SpecialIds,
    VQAObjective,
    prompt_length,
)
from blip_core.tokenizer import BlipTokenizer
from blip_core.train import distributed as D
from components.best_epoch import Validation


class TrainLoader(Protocol):
    """What a task's loader gives the training stage: the batches of one rank, epoch by epoch."""

    skipped: int  # samples skipped (unreadable) since the loader was made
    lost: list  # shards left out when opening (data.allow_partial)

    @property
    def lost_samples(self) -> int: ...

    def __len__(self) -> int: ...  # batches per epoch on this rank (the same on every rank)

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[dict]: ...


class Task:
    """One training task. Subclasses set the class attributes and write :meth:`objective` and :meth:`loader`;
    the other methods have the defaults of a task that trains a :class:`BlipModel` as it is."""

    name: ClassVar[str]  # registry key and ``blip finetune --task`` choice
    section: ClassVar[str]  # the Config attribute holding its TrainConfig; also the stage's default name
    registered_name: ClassVar[str | None] = None  # MLflow registered model of the stage's output
    finetune: ClassVar[bool] = True  # offered by ``blip finetune --task`` (starts from a trained checkpoint)
    # config sections (besides model, data and its own) that its validation scores depend on
    validation_sections: ClassVar[tuple[str, ...]] = ("evaluate",)

    def train_config(self, cfg: Config) -> TrainConfig:
        """The task's training settings: its own config section."""
        return getattr(cfg, self.section)

    def config_sections(self, cfg: Config) -> dict[str, object]:
        """The config sections a run of the task depends on, by name: a checkpoint is resumed only by a run
        whose sections are the same (and whose data is)."""
        return {"model": cfg.model, "data": cfg.data, self.section: self.train_config(cfg)}

    def check(self, cfg: Config) -> None:
        """Refuse settings that do not apply to the task (:class:`UserError`), before any work starts."""

    def prepare_model(self, model: BlipModel, cfg: Config) -> nn.Module:
        """The module to train, from the loaded or built ``model``: freeze what the objective never uses
        (keeps DDP's reducer happy); a task may also wrap the model in another module."""
        return model

    def objective(self, model: nn.Module, tokenizer: BlipTokenizer, cfg: Config, info: D.DistInfo) -> Objective:
        """The objective over the prepared ``model``."""
        raise NotImplementedError

    def loader(self, cfg: Config, data: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int,
               info: D.DistInfo) -> TrainLoader:
        """The training batches of this rank from the dataset directories ``data``, images at ``image_size``."""
        raise NotImplementedError

    def validation(self, cfg: Config, tokenizer: BlipTokenizer, val: list[str], image_size: int) -> Validation:
        """Best-epoch selection on the validation split ``val`` (called on rank 0 only)."""
        raise UserError(f"{self.name}: this task has no validation metric; run it without --val")

    def compile(self, model: nn.Module) -> None:
        """``torch.compile`` the heavy parts of the model (``<section>.compile``)."""
        model.visual_encoder.compile()
        model.text_encoder.compile()

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """Parameter names (relative to the model) that get no weight decay with ``no_decay_norm_bias``."""
        return model.no_weight_decay()

    def save_model(self, dst: Path, model: nn.Module, tokenizer: BlipTokenizer,
                   momentum_state: dict | None) -> None:
        """Write the trained ``model`` (and the objective's momentum state) as the checkpoint directory ``dst``."""
        save_model_dir(dst, model, tokenizer, momentum_state)

    def model_files(self, data: Sequence[str]) -> dict[str, str]:
        """Files (name -> text) written into the model directory beside the checkpoint, from the training data
        ``data`` (e.g. the answer list a VQA model ranks)."""
        return {}


class _PairTask(Task):
    """A task on image-text pairs from dataset directories, every caption of an image its own pair."""

    def loader_settings(self, cfg: Config) -> dict:
        """``make_loader`` arguments of this task: ``min_scale``, ``max_length`` (tokens) and ``prompt``."""
        raise NotImplementedError

    def loader(self, cfg: Config, data: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int,
               info: D.DistInfo) -> TrainLoader:
        tcfg = self.train_config(cfg)
        return make_loader(
            data, tokenizer, image_size=image_size, batch_size=tcfg.batch_size, train=True,
            randaugment=cfg.data.randaugment, max_words=cfg.data.max_words, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, seed=tcfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=pin_memory_for(info.device),
            allow_partial=cfg.data.allow_partial, verify_sha256=cfg.data.verify_sha256, expand_captions=True,
            **self.loader_settings(cfg))


class PretrainTask(_PairTask):
    """ITC + ITM + LM on web (+ human) pairs; captions of ``model.max_text_len`` tokens."""

    name = "pretrain"
    section = "pretrain"
    finetune = False

    def check(self, cfg: Config) -> None:
        if cfg.pretrain.negative_all_rank:
            raise UserError("pretrain.negative_all_rank: pre-training draws ITM negatives from the local batch, "
                            "as the official code; the option is for finetune_filter")

    def objective(self, model: nn.Module, tokenizer: BlipTokenizer, cfg: Config, info: D.DistInfo) -> Objective:
        return PretrainObjective(model, SpecialIds.from_tokenizer(tokenizer), gather_fn=D.all_gather_cat)

    def loader_settings(self, cfg: Config) -> dict:
        return {"min_scale": cfg.data.min_scale_pretrain, "max_length": cfg.model.max_text_len}


class CaptionerTask(_PairTask):
    """LM with the section's prompt unsupervised; only the image encoder and the decoder train.

    Validation: CIDEr + BLEU-4 of beam-search captions (the ``evaluate`` decoding settings, this prompt).
    """

    name = "captioner"
    section = "finetune_captioner"
    registered_name = "blip-captioner"
    max_text_len = CAPTIONER_TEXT_TOKENS  # tokens per caption (prompt included), as the official caption fine-tuning

    def check(self, cfg: Config) -> None:
        if self.train_config(cfg).negative_all_rank:
            raise UserError(f"{self.section}.negative_all_rank: only the filter draws ITM negatives "
                            "(set finetune_filter.negative_all_rank)")

    def prepare_model(self, model: BlipModel, cfg: Config) -> nn.Module:
        for name, p in model.named_parameters():
            if not name.startswith(("visual_encoder.", "text_decoder.")):
                p.requires_grad_(False)
        return model

    def objective(self, model: nn.Module, tokenizer: BlipTokenizer, cfg: Config, info: D.DistInfo) -> Objective:
        plen = prompt_length(tokenizer, self.train_config(cfg).prompt)
        return CaptionerObjective(model, SpecialIds.from_tokenizer(tokenizer), prompt_len=plen)

    def loader_settings(self, cfg: Config) -> dict:
        return {"min_scale": cfg.data.min_scale_finetune, "max_length": self.max_text_len,
                "prompt": self.train_config(cfg).prompt}

    def validation(self, cfg: Config, tokenizer: BlipTokenizer, val: list[str], image_size: int) -> Validation:
        from components.evaluate import caption_metrics

        split = load_eval_split(val, cfg.data.image_size or image_size, cfg.data.max_words)
        ecfg = dataclasses.replace(cfg.evaluate, prompt=self.train_config(cfg).prompt)

        def evaluate(model) -> dict[str, float]:
            metrics, _ = caption_metrics(model, tokenizer, split, ecfg)
            return {**metrics, "cider_bleu4": metrics["cider"] + metrics["bleu4"]}

        return Validation(data=",".join(val), metric="cider_bleu4", evaluate=evaluate)


class FilterTask(_PairTask):
    """ITC + ITM with positives by image id; the decoder's own self-attention and LM head do not train; keeps
    the pre-trained momentum encoders and queues.

    Validation: ``r_mean``, the mean of TR and IR recall@1/5/10 (ITC top-``evaluate.k_test`` re-ranked by ITM).
    """

    name = "filter"
    section = "finetune_filter"
    registered_name = "blip-filter"
    max_text_len = RETRIEVAL_TEXT_TOKENS  # tokens per caption, as the official retrieval fine-tuning

    def prepare_model(self, model: BlipModel, cfg: Config) -> nn.Module:
        for name, p in model.text_decoder.named_parameters():
            if ".attention." in name or name.startswith("cls.predictions.transform") or name == "cls.predictions.bias":
                p.requires_grad_(False)
        return model

    def objective(self, model: nn.Module, tokenizer: BlipTokenizer, cfg: Config, info: D.DistInfo) -> Objective:
        return FilterObjective(model, SpecialIds.from_tokenizer(tokenizer), gather_fn=D.all_gather_cat,
                               gather_grad_fn=D.all_gather_with_grad,
                               negative_all_rank=self.train_config(cfg).negative_all_rank, rank=info.rank)

    def loader_settings(self, cfg: Config) -> dict:
        return {"min_scale": cfg.data.min_scale_finetune, "max_length": self.max_text_len}

    def validation(self, cfg: Config, tokenizer: BlipTokenizer, val: list[str], image_size: int) -> Validation:
        from components.evaluate import retrieval_metrics

        split = load_eval_split(val, cfg.data.image_size or image_size, cfg.data.max_words)

        def evaluate(model) -> dict[str, float]:
            return retrieval_metrics(model, tokenizer, split, cfg.evaluate)

        return Validation(data=",".join(val), metric="r_mean", evaluate=evaluate)


class VQATask(Task):
    """VQA: the pre-trained model becomes a :class:`~blip_core.models.vqa.BlipVQA` (question encoder + answer
    decoder, untied, as the official ``BLIP_VQA``) trained on the weighted answer loss; everything trains.

    The model directory also gets ``answer_list.json``, the training data's answers (rank-mode inference).
    Validation: VQAv2 accuracy of generated answers (``evaluate.vqa_num_beams``/lengths), ``vqa_acc``.
    """

    name = "vqa"
    section = "finetune_vqa"
    registered_name = "blip-vqa"
    question_max_len = QUESTION_MAX_TOKENS  # tokens per question, as the official VQA fine-tuning

    def check(self, cfg: Config) -> None:
        if self.train_config(cfg).negative_all_rank:
            raise UserError(f"{self.section}.negative_all_rank: only the filter draws ITM negatives")

    def prepare_model(self, model: nn.Module, cfg: Config) -> nn.Module:
        return model if is_vqa(model) else BlipVQA.from_blip(model)

    def objective(self, model: nn.Module, tokenizer: BlipTokenizer, cfg: Config, info: D.DistInfo) -> Objective:
        return VQAObjective(model)

    def loader(self, cfg: Config, data: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int,
               info: D.DistInfo) -> TrainLoader:
        tcfg = self.train_config(cfg)
        return make_vqa_loader(
            data, tokenizer, image_size=image_size, batch_size=tcfg.batch_size, train=True,
            randaugment=cfg.data.randaugment, rank=info.rank, world_size=info.world_size,
            num_workers=cfg.data.num_workers, seed=tcfg.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            question_max_length=self.question_max_len, pin_memory=pin_memory_for(info.device),
            allow_partial=cfg.data.allow_partial, verify_sha256=cfg.data.verify_sha256,
            min_scale=cfg.data.min_scale_finetune)

    def validation(self, cfg: Config, tokenizer: BlipTokenizer, val: list[str], image_size: int) -> Validation:
        from components.vqa_eval import vqa_metrics

        split = load_vqa_split(val, cfg.data.image_size or image_size)
        ecfg = dataclasses.replace(cfg.evaluate, vqa_inference="generate")

        def evaluate(model) -> dict[str, float]:
            metrics, _ = vqa_metrics(model, tokenizer, split, ecfg, None)
            return {"vqa_acc": metrics["accuracy"]}

        return Validation(data=",".join(val), metric="vqa_acc", evaluate=evaluate)

    def model_files(self, data: Sequence[str]) -> dict[str, str]:
        answers: dict[str, None] = {}  # every data set's answers, most frequent first, data sets in order
        for uri in data:
            answers.update(dict.fromkeys(read_answer_list(uri)))
        return {ANSWER_LIST_NAME: json.dumps(list(answers), indent=0) + "\n"}


TASKS: dict[str, Task] = {t.name: t for t in (PretrainTask(), CaptionerTask(), FilterTask(), VQATask())}


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name is a one-line :class:`UserError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def finetune_tasks() -> list[str]:
    """The names ``blip finetune --task`` accepts."""
    return [name for name, t in TASKS.items() if t.finetune]
