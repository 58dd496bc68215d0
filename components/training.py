"""Shared machinery of the training stages (pretrain, finetune captioner, finetune filter).

A training stage's output (a local directory or an ``s3://`` prefix) holds::

    model/              the trained model as a blip_core checkpoint (with momentum/queue state for
                        pre-training and the filter, so a later run can resume from it)
    checkpoints/        training checkpoints (step-XXXXXXXX/ + latest.json) used to resume a killed run
    train_log.json      the logged training curve (one record per logged step: DVC plots)
    metrics.json        final losses, steps, throughput (and the chosen epoch's validation scores)
    validation/         with a validation split: history.json (the scores after every epoch), best.json and
                        best/ (the best model so far), so that a resumed run keeps its choice
    result.json         written last: the stage is complete

With a validation split (:class:`Validation`, ``blip finetune --val``) the model is scored after every epoch
(and after the last step when a run stops mid-epoch); the best scoring one, the earliest on ties, becomes
``model/``, as the official fine-tuning scripts keep their best checkpoint. Without one ``model/`` is the last.

With an ``s3://`` output, work happens in a local directory (``BLIP_WORK_DIR``, default a per-output folder
under the system temp dir); every checkpoint is uploaded when written, and a restarted stage first downloads
the newest one, so a preempted job resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip_core import build_model
from blip_core.checkpoint_io import load_model_dir
from blip_core.config import Config, to_dict
from blip_core.data.samples import ShardLost, dataset_shards, sample_texts
from blip_core.data.webdataset_io import ShardReadError, iter_shard
from blip_core.errors import UserError
from blip_core.models.blip import BlipModel
from blip_core.redact import redact
from blip_core.tokenizer import BlipTokenizer
from blip_core.train import distributed as D
from blip_core.train.checkpoint import is_complete
from blip_core.train.loop import TrainResult, train
from blip_core.train.optim import build_optimizer
from components import storage
from components.best_epoch import BestEpoch, Validation

if TYPE_CHECKING:
    from blip_core.objectives import Objective
    from components.tasks import Task

log = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainStageResult:
    """What a training stage produced."""

    output: str
    model_uri: str
    steps: int
    epochs: int
    losses: dict[str, float]
    pairs_per_second: float
    resumed_from: str | None = None
    run_id: str | None = None
    validation: dict | None = None  # with a validation split: the metric, chosen epoch and per-epoch scores
    tracking_lost: str | None = None  # why MLflow tracking stopped during the stage (see components.tracking)


class LoaderSource:
    """Adapts a :class:`~blip_core.data.loader.BlipLoader` to the loop's batch source (epoch + skip)."""

    def __init__(self, loader):
        self.loader = loader

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        self.loader.set_epoch(epoch)
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch


# ------------------------------------------------------------------------------------------- work dirs


def work_dir(output: str) -> Path:
    """The local directory a stage writes into: the output itself, or a staging folder for s3 outputs."""
    if not storage.is_s3(output):
        return Path(output)
    base = Path(os.environ.get("BLIP_WORK_DIR") or Path(tempfile.gettempdir()) / "blip-work")
    return base / hashlib.sha1(output.encode()).hexdigest()[:16]


def fetch_latest_checkpoint(output: str, local: Path) -> None:
    """For an s3 output, download its newest training checkpoint into the local work dir (resume)."""
    if not storage.is_s3(output):
        return
    remote = storage.join(output, CHECKPOINT_DIR)
    pointer = storage.join(remote, "latest.json")
    if not storage.exists(pointer):
        return
    latest = storage.read_json(pointer)
    name = str(latest["checkpoint"])
    ckpt_local = local / CHECKPOINT_DIR
    if "/" in name or name.startswith("."):
        raise UserError(f"{pointer}: not a checkpoint name: {name!r}")
    if not is_complete(ckpt_local / name):  # absent, or a download that was cut short
        partial = ckpt_local / f".{name}.download"
        shutil.rmtree(partial, ignore_errors=True)
        storage.download_dir(storage.join(remote, name), partial)
        if not is_complete(partial):
            raise UserError(f"{storage.join(remote, name)}: the checkpoint named by {pointer} is incomplete")
        shutil.rmtree(ckpt_local / name, ignore_errors=True)
        os.replace(partial, ckpt_local / name)
    storage.write_text(str(ckpt_local / "latest.json"), json.dumps(latest))  # atomic, after the checkpoint


def uploader(output: str):
    """A callback uploading a freshly written checkpoint (and its pointer) to an s3 output."""
    if not storage.is_s3(output):
        return None

    def upload(path: Path) -> None:
        remote = storage.join(output, CHECKPOINT_DIR)
        storage.upload_dir(path, storage.join(remote, path.name))
        storage.upload_file(path.parent / "latest.json", storage.join(remote, "latest.json"))

    return upload


def publish(local: Path, output: str, names: list[str]) -> None:
    """Copy finished outputs from the work dir to an s3 output (local outputs are already in place)."""
    if not storage.is_s3(output):
        return
    for name in names:
        p = local / name
        if p.is_dir():
            storage.upload_dir(p, storage.join(output, name))
        elif p.is_file():
            storage.upload_file(p, storage.join(output, name))


def summary(name: str, result: Mapping[str, Any]) -> str:
    """The final line(s) of a training stage, from its result (``result.json`` or the :class:`TrainStageResult`
    as a dict): printed by ``blip pretrain``/``blip finetune`` and by the pipeline's training steps."""
    losses = ", ".join(f"{k}={float(v):.4f}" for k, v in (result.get("losses") or {}).items())
    losses = losses or "none logged by this run (resumed a finished one)"
    line = f"{name}: {result.get('steps')} steps, losses {losses}, model at {result.get('model_uri')}"
    val = result.get("validation")
    if val:
        best = val["best"]
        line += (f"\n{name}: model of epoch {best['epoch']:g} (step {best['step']}), validation {val['metric']} "
                 f"{best['score']:.4f}")
    return line


def write_result(output: str, local: Path, result: dict) -> None:
    """Write ``result.json`` last: its presence marks the stage's output as complete."""
    text = json.dumps(redact(result), indent=2) + "\n"
    if storage.is_s3(output):
        storage.write_text(storage.join(output, "result.json"), text)
    else:
        storage.write_text(str(local / "result.json"), text)


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at ``uri`` (downloaded when it is on s3)."""
    if not storage.is_s3(uri):
        if not Path(uri).is_dir():
            raise UserError(f"checkpoint directory not found: {uri}")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="blip-ckpt-") as d:
        storage.download_dir(uri, d)
        yield Path(d)


def resolve_model_dir(uri: str) -> str:
    """Accept a stage output (holding ``model/``) or a checkpoint directory itself."""
    candidate = storage.join(uri, MODEL_DIR)
    if storage.exists(storage.join(candidate, "config.json")):
        return candidate
    return uri


# ------------------------------------------------------------------------------------------- model setup


def corpus_captions(data_uris: list[str], max_words: int, allow_partial: bool = False,
                    verify_sha256: bool = False) -> Iterator[str]:
    """Every cleaned text (captions; VQA questions and answers) of the given dataset directories (to build a
    WordPiece vocabulary).

    Missing or damaged shards raise :class:`~blip_core.data.samples.ShardLost` unless ``allow_partial`` (then
    they are left out; the loader counts them).
    """
    for shard in dataset_shards(data_uris, allow_partial=allow_partial, verify_sha256=verify_sha256):
        try:
            for sample in iter_shard(shard.uri):
                try:
                    texts = sample_texts(sample, max_words)
                except Exception:  # noqa: BLE001 - unreadable samples are counted by the loader, not here
                    continue
                yield from texts
        except (ShardReadError, OSError) as e:
            if not allow_partial:
                raise ShardLost(f"{shard.uri}: unreadable ({e}); re-run the stage that wrote it, or set "
                                "data.allow_partial=true to train on the rest") from None
            log.warning("data.allow_partial: shard %s unreadable while building the vocabulary: %s", shard.uri, e)


def make_tokenizer(cfg: Config, data_uris: list[str], work: Path, info: D.DistInfo) -> BlipTokenizer:
    """The tokenizer named by ``model.tokenizer``: built from the data's captions, or a local/s3 HF dir."""
    spec = cfg.model.tokenizer
    if spec != "corpus":
        with local_checkpoint(spec) as d:
            return BlipTokenizer.from_dir(d)
    tok_dir = work / "tokenizer"
    if info.is_main:
        captions = corpus_captions(data_uris, cfg.data.max_words, cfg.data.allow_partial, cfg.data.verify_sha256)
        tok = BlipTokenizer.from_corpus(captions, cfg.model.corpus_vocab_size)
        tok.save(tok_dir)
    D.barrier()
    return BlipTokenizer.from_dir(tok_dir)


def load_init(init: str, image_size: int = 0) -> tuple[BlipModel, BlipTokenizer, dict | None]:
    """Model, tokenizer and momentum state from a checkpoint directory or a stage output (local or s3).

    ``image_size`` (0: the checkpoint's own) builds the model for another resolution, the position embeddings
    interpolated bicubically (``data.image_size``: e.g. fine-tuning at 384 px a model pre-trained at 224 px).
    """
    with local_checkpoint(resolve_model_dir(init)) as d:
        ckpt = load_model_dir(d, image_size=image_size or None)
    if ckpt.tokenizer is None:
        raise UserError(f"{init}: the checkpoint has no tokenizer/ directory")
    for note in ckpt.notes:
        log.info("%s: %s", init, note)
    return ckpt.model, ckpt.tokenizer, ckpt.momentum_state


def data_fingerprint(data_uris: list[str]) -> str:
    """A hash of the input datasets' manifests (shard checksums): resume only onto the same data."""
    h = hashlib.sha256()
    for uri in data_uris:
        h.update(storage.read_bytes(storage.join(uri, "manifest.json")))
    return h.hexdigest()[:16]


def train_config_dict(cfg: Config, section: str) -> dict:
    """The config logged to MLflow (credentials in URIs redacted)."""
    return redact({"section": section, **to_dict(cfg)})


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, values): a fine-tuning resumes only from the same initial
    model, so a changed pre-trained model is never continued from checkpoints trained from the old one."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy())  # the tensor's own buffer, not a copy
    return h.hexdigest()[:16]


def resume_config(cfg: Config, task: Task, stage: str, fingerprint: str, val: list[str] | None = None,
                  init: str | None = None) -> dict:
    """The config written beside checkpoints: a checkpoint is resumed only by a run with the same one.

    It holds the stage name, the sections the task depends on (``model``, ``data`` and its own), the data
    ``fingerprint`` and, with validation datasets ``val``, those and the sections the validation scores depend
    on. Editing another stage's settings (e.g. ``capfilt.*``) never makes a pre-empted run start over. ``init``:
    the initial model's :func:`model_fingerprint`, for a run that starts from a trained checkpoint.
    """
    sections = dict(task.config_sections(cfg))
    extra: dict = {}
    if val:
        sections.update({name: getattr(cfg, name) for name in task.validation_sections})
        extra = {"validation_data": list(val)}
    if init:
        extra["init_fingerprint"] = init
    return redact({"section": stage, **{k: to_dict(v) for k, v in sections.items()},
                   "data_fingerprint": fingerprint, **extra})


def run_training(
    cfg: Config,
    task: Task,
    *,
    model: BlipModel,
    tokenizer: BlipTokenizer,
    data: list[str],
    output: str,
    work: Path,
    info: D.DistInfo,
    resume: bool,
    parent_run_id: str | None,
    stage: str | None = None,
    momentum_state: dict | None = None,
    val: list[str] | None = None,
    init_fingerprint: str | None = None,
) -> TrainStageResult:
    """Train ``task`` from ``model`` (loaded or built) under an MLflow stage run and publish the trained model.

    Everything task-specific comes from ``task``: its settings section, the module it trains, its objective,
    loader, validation metric and registered model name. ``momentum_state`` (the initial checkpoint's) is
    taken by an objective that keeps momentum encoders and queues. With ``val`` (validation dataset
    directories) the model is scored after every epoch and the best one is published (see the module
    docstring). ``stage`` names the MLflow run and the outputs' ``result.json`` (default: the task's section).
    """
    from components import tracking

    tcfg = task.train_config(cfg)
    stage = stage or task.section
    image_size = model.cfg.vision.image_size
    validation = None
    if val and info.is_main:
        validation = task.validation(cfg, tokenizer, val, image_size)
    elif val:  # the other ranks wait while rank 0 scores; they only need to know that it does
        validation = Validation(data=",".join(val), metric="", evaluate=lambda m: {})
    model, objective = _trained_objective(cfg, task, model, tokenizer, info, stage, momentum_state)
    loader = task.loader(cfg, data, tokenizer, image_size=image_size, info=info)
    if len(loader) == 0:
        raise UserError(f"{stage}: no full batch of {tcfg.batch_size} pairs per rank in {data}; "
                        f"lower {stage}.batch_size or add data")
    optimizer = build_optimizer(objective, tcfg, no_decay_names=task.no_weight_decay(model))
    def log_fn(step: int, metrics: dict) -> None:
        run.log_metrics(step, metrics)

    fingerprint = data_fingerprint(data)
    logged = {**train_config_dict(cfg, stage), "data_fingerprint": fingerprint}
    config = resume_config(cfg, task, stage, fingerprint, val, init_fingerprint)
    if info.is_main and tracking.tracking_enabled():
        tracking.check_tracking()

    extra_files = task.model_files(data) if info.is_main else {}

    def save(dst: Path) -> None:
        task.save_model(dst, model, tokenizer, objective.momentum_state())
        for name, text in extra_files.items():
            storage.write_text(str(dst / name), text)

    with tracking.stage_run(stage, logged, parent_run_id=parent_run_id) as run:
        selector = None
        if validation is not None:
            selector = BestEpoch(validation, work, output, resume, info, model, save, run, config)
        res: TrainResult = train(
            objective, optimizer, tcfg, LoaderSource(loader), checkpoint_dir=work / CHECKPOINT_DIR, info=info,
            alpha=cfg.model.alpha, config_dict=config, resume=resume, log_fn=log_fn,
            on_checkpoint=uploader(output),
            on_epoch_end=(lambda pos: selector.validate(pos.step, pos.epoch)) if selector else None)
        chosen = None
        if selector is not None:  # a run that stopped mid-epoch is scored at its last step too
            pos = res.position
            selector.validate(pos.step, pos.epoch + round(pos.batch_in_epoch / max(1, len(loader)), 3),
                              only_if_missing=True)
            chosen = selector.record()
        result = TrainStageResult(
            output=output, model_uri=storage.join(output, MODEL_DIR), steps=res.position.step,
            epochs=res.position.epoch, losses=res.last_losses, pairs_per_second=res.pairs_per_second,
            resumed_from=str(res.resumed_from) if res.resumed_from else None, run_id=run.run_id,
            validation=chosen)
        if info.is_main:
            if selector is not None:
                selector.publish_best(work / MODEL_DIR)
            else:
                save(work / MODEL_DIR)
            _publish_stage(work, output, stage, task, run, res, loader, result)
        D.barrier()
    return result


def _trained_objective(cfg: Config, task: Task, model: BlipModel, tokenizer: BlipTokenizer, info: D.DistInfo,
                       stage: str, momentum_state: dict | None) -> tuple[torch.nn.Module, Objective]:
    """The module ``task`` trains (on the training device) and its objective, with the initial momentum state."""
    tcfg = task.train_config(cfg)
    torch.manual_seed(tcfg.seed)
    model = task.prepare_model(model, cfg)
    model.to(info.device)
    objective = task.objective(model, tokenizer, cfg, info).to(info.device)
    if objective.keeps_momentum and momentum_state:
        objective.load_momentum_state(momentum_state)
    elif objective.keeps_momentum and info.is_main:
        log.info("%s: momentum encoders start as copies of the model and the queues at random (the initial "
                 "checkpoint has no momentum state)", stage)
    if tcfg.compile:
        task.compile(model)
    return model, objective


def _publish_stage(work: Path, output: str, stage: str, task: Task, run, res: TrainResult, loader,
                   result: TrainStageResult) -> None:
    """Rank 0, once ``model/`` is written: the final metrics and training log, the MLflow records, the upload
    of the outputs and ``result.json`` last."""
    metrics = {**{f"final_{k}": v for k, v in res.last_losses.items()}, "steps": res.position.step,
               "pairs_per_second": res.pairs_per_second, "data_time_share": res.data_time_share,
               "skipped_samples": loader.skipped, "lost_samples": loader.lost_samples,
               "lost_shards": len(loader.lost)}
    if result.validation is not None:
        best = result.validation["best"]
        metrics.update({"val_best_epoch": best["epoch"], "val_best_step": best["step"],
                        **{f"val_{k}": v for k, v in best["metrics"].items()}})
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (work / "train_log.json").write_text(json.dumps(res.log, indent=1) + "\n")  # a resumed run's too
    run.log_metrics(res.position.step, {k: v for k, v in metrics.items() if k != "steps"})
    run.log_artifact(work / "train_log.json")
    run.log_blip_model(work / MODEL_DIR, registered_name=task.registered_name)
    publish(work, output, [MODEL_DIR, "metrics.json", "train_log.json"])
    result.tracking_lost = run.lost
    write_result(output, work, {"stage": stage, **dataclasses.asdict(result)})


def prepare_work(output: str, resume: bool, info: D.DistInfo) -> Path:
    """Create the local work dir; without ``resume`` clear old checkpoints; fetch s3 checkpoints to resume."""
    work = work_dir(output)
    if info.is_main:
        if not resume:
            shutil.rmtree(work / CHECKPOINT_DIR, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        if resume:
            fetch_latest_checkpoint(output, work)
    D.barrier()
    return work


def new_model(cfg: Config, tokenizer: BlipTokenizer) -> BlipModel:
    model = build_model(cfg.model, vocab_size=len(tokenizer))
    if model.cfg.text.vocab_size != len(tokenizer):
        raise UserError(f"model.text.vocab_size={model.cfg.text.vocab_size} but the tokenizer has "
                        f"{len(tokenizer)} tokens; set model.text.vocab_size=0 to follow the tokenizer")
    model.set_grad_checkpointing(cfg.model.vision.grad_ckpt_layers)
    return model
