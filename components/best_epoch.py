"""Best-epoch selection on a validation split: the model is scored after every epoch and the best scoring one,
the earliest on ties, is kept under the training output's ``validation/`` (see :mod:`components.training`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from blip_core.models.blip import BlipModel
from blip_core.train import distributed as D
from blip_core.train.loop import run_identity
from components import storage

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"


@dataclass
class Validation:
    """Best-epoch selection on a validation split.

    ``evaluate(model)`` returns the metrics of the (eval-mode) model on ``data``; ``metric`` names the one
    whose highest value picks the model.
    """

    data: str
    metric: str
    evaluate: Callable[[BlipModel], dict[str, float]]


class BestEpoch:
    """Scores the model on the validation split (rank 0) and keeps the best one under ``validation/``.

    ``history.json`` holds the run's config and one entry per scored step; ``best.json`` names the entry whose
    weights ``best/`` holds. They are reused only by a run that may resume the same training (same config and
    data). Training is sequential, so a new entry replaces every entry at or after its step (left by an
    interrupted run); a resumed run reproduces the same weights, hence the same entries.
    """

    def __init__(self, validation: Validation, work: Path, output: str, resume: bool, info: D.DistInfo,
                 model: BlipModel, save: Callable[[Path], None], run, config: dict) -> None:
        self.v, self.output, self.info, self.model, self.save, self.run = validation, output, info, model, save, run
        self.dir = work / VALIDATION_DIR
        self.history: list[dict] = []
        self.best: dict | None = None
        if not info.is_main:
            return
        if not resume:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif storage.is_s3(output) and not (self.dir / "best.json").is_file():
            remote = storage.join(output, VALIDATION_DIR)
            if storage.exists(storage.join(remote, "best.json")):
                storage.download_dir(remote, self.dir)
        self.identity = run_identity(config)
        if resume and (self.dir / "best.json").is_file() and (self.dir / "best").is_dir():
            saved = json.loads((self.dir / "history.json").read_text())
            if run_identity(saved.get("config")) == self.identity:
                self.history = saved["epochs"]
                self.best = json.loads((self.dir / "best.json").read_text())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config

    def validate(self, step: int, epoch: float, *, only_if_missing: bool = False) -> None:
        """Score the model after ``step`` (``epoch`` epochs done); save it when it is the best so far."""
        if self.info.is_main and not (only_if_missing and any(h["step"] == step for h in self.history)):
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.v.evaluate(self.model).items()}
            self.model.train(was_training)
            if self.v.metric not in metrics:
                raise ValueError(f"validation metrics {sorted(metrics)} lack the selection metric {self.v.metric!r}")
            entry = {"epoch": epoch, "step": step, "score": metrics[self.v.metric], "metrics": metrics}
            self.history = [h for h in self.history if h["step"] < step]
            improved = all(entry["score"] > h["score"] for h in self.history)  # earliest best wins ties
            self.history.append(entry)
            if improved:
                self.save(self.dir / "best")
                self.best = entry
                (self.dir / "best.json").write_text(json.dumps(entry, indent=1) + "\n")
            (self.dir / "history.json").write_text(
                json.dumps({"config": self.config, "epochs": self.history}, indent=1) + "\n")
            log.info("validation after epoch %g (step %d): %s %.4f%s", epoch, step, self.v.metric, entry["score"],
                     " (best)" if improved else "")
            self.run.log_metrics(step, {f"val_{k}": v for k, v in metrics.items()})
            if storage.is_s3(self.output):
                remote = storage.join(self.output, VALIDATION_DIR)
                if improved:
                    storage.upload_dir(self.dir / "best", storage.join(remote, "best"))
                storage.upload_file(self.dir / "best.json", storage.join(remote, "best.json"))
                storage.upload_file(self.dir / "history.json", storage.join(remote, "history.json"))
        D.barrier()

    def record(self) -> dict | None:
        """What the stage result says: the data, the metric, the chosen entry and every scored epoch."""
        if not self.info.is_main:
            return None
        if self.best is None:
            raise RuntimeError("validation: no model was scored")
        top = max(h["score"] for h in self.history)
        if self.best["score"] != top:  # only if a restarted run did not reproduce its earlier epochs
            log.warning("validation: the saved best model (step %d, %s %.4f) is not the top entry (%.4f)",
                        self.best["step"], self.v.metric, self.best["score"], top)
        return {"data": self.v.data, "metric": self.v.metric, "best": self.best, "epochs": self.history}

    def publish_best(self, dst: Path) -> None:
        """Copy the chosen model to ``dst`` (the stage's ``model/``)."""
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.dir / "best", tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
