"""A stage's nested MLflow run: :func:`stage_run` and what it yields, a :class:`StageRun` (tracking on) or a
:class:`NullStageRun` (tracking off); both implement :class:`StageRunLike`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from blip_core.errors import UserError
from blip_core.redact import redact
from components.tracking.mlflow_model import log_pyfunc
from components.tracking.store import _client, _parent, _resolved_tags, check_tracking, tracking_enabled
from components.tracking.values import (
    _BAD_IMAGE_KEY_CHARS,
    MAX_TAG_VALUE,
    _clip,
    _config_dict,
    _flatten,
    _key,
    _metric_value,
    _param_value,
    _plain,
)

log = logging.getLogger("components.tracking")

SYSTEM_METRICS_INTERVAL_S = 5.0


@runtime_checkable
class StageRunLike(Protocol):
    """What :func:`stage_run` yields: a :class:`StageRun`, or a :class:`NullStageRun` when tracking is off."""

    run_id: str | None
    parent_run_id: str | None
    experiment_id: str | None
    stage: str
    tracking_uri: str | None
    model_info: Any  # mlflow.models.model.ModelInfo of the last log_blip_model
    lost: str | None  # why tracking stopped during the stage (None while it works)

    @property
    def enabled(self) -> bool: ...

    def parent(self) -> StageRunLike: ...

    def lose(self, error: BaseException) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_config(self, config: Any) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, local_path: str | Path, path: str | None = None) -> None: ...

    def log_artifacts(self, local_dir: str | Path, path: str | None = None) -> None: ...

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None: ...

    def log_image(self, image: Any, key: str, step: int) -> None: ...

    def log_image_captions(self, images: Sequence[Any], captions: Sequence[str], step: int, key: str = "samples",
                           references: Sequence[str] | None = None) -> None: ...

    def log_blip_model(self, checkpoint_dir: str | Path, name: str = "model", registered_name: str | None = None,
                       *, model_config: Mapping[str, Any] | None = None, include_code: bool = True) -> str: ...


def _is_server_failure(e: BaseException) -> bool:
    """True when ``e`` says the tracking server could not be reached or answered with a server error."""
    import requests

    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return True
        # MLflow's HTTP client: "API request to ... failed with exception ..." (no connection, retries used
        # up) or "... failed with error code 5xx" (an answer that is not MLflow's JSON)
        if isinstance(err, MlflowException) and (str(err).startswith("API request to ")
                                                 or err.error_code == "TEMPORARILY_UNAVAILABLE"):
            return True
        err = err.__cause__ or err.__context__
    return False


def _tolerant(default: Any = None):
    """Make a :class:`StageRun` method skip itself (returning ``default``) once tracking is lost, and mark
    tracking lost when the call fails because the server is gone."""

    def wrap(fn):
        @functools.wraps(fn)
        def method(self: StageRun, *args: Any, **kwargs: Any) -> Any:
            if self.lost is not None:
                return default
            try:
                return fn(self, *args, **kwargs)
            except Exception as e:
                if not _is_server_failure(e):
                    raise
                self.lose(e)
                return default

        return method

    return wrap


@contextlib.contextmanager
def _local_dir(path: str | Path) -> Iterator[Path]:
    text = str(path)
    if text.startswith("s3://"):
        from components import storage

        with tempfile.TemporaryDirectory(prefix="blip-mlflow-") as tmp:
            storage.download_dir(text, tmp)
            yield Path(tmp)
    else:
        yield Path(path)


class StageRun:
    """One stage's nested MLflow run; every method logs to this run (``run_id``), whatever run is active."""

    def __init__(self, run_id: str, parent_run_id: str, experiment_id: str, stage: str, tracking_uri: str):
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stage = stage
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.model_info: Any = None  # mlflow.models.model.ModelInfo of the last log_blip_model
        self.lost: str | None = None  # why tracking stopped during the stage (None while it works)

    @property
    def enabled(self) -> bool:
        return True

    def parent(self) -> StageRunLike:
        """The pipeline's parent run, with the same methods: for what sums up the whole pipeline run (the
        evaluate stage's comparison). It starts with this run's tracking state (lost or not)."""
        run = StageRun(self.parent_run_id, "", self.experiment_id, "pipeline", self.tracking_uri)
        run.lost = self.lost
        return run

    def lose(self, error: BaseException) -> None:
        """Stop tracking for the rest of the stage after ``error`` (the server is gone): one warning, no more
        calls to the server, system-metrics sampling stopped."""
        if self.lost is not None:
            return
        text = str(error).strip()
        self.lost = _clip(redact(text.splitlines()[0] if text else type(error).__name__), 500)
        log.warning("MLflow tracking at %s was lost during stage %s (%s); the stage goes on without tracking: "
                    "its later metrics, artifacts and model are in its output only", redact(self.tracking_uri),
                    self.stage, self.lost)
        _stop_system_metrics(self.run_id)

    # ------------------------------------------------------------------ params, tags, metrics
    @_tolerant()
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts are flattened to dotted keys; values longer than MLflow allows are cut)."""
        flat = _flatten(params)
        items = [Param(_key(k), _param_value(v)) for k, v in flat.items()]
        if items:
            self.client.log_batch(self.run_id, params=items)

    def log_config(self, config: Any) -> None:
        """The resolved config: flattened as params, and whole as ``config.json``."""
        d = _config_dict(config)
        self.log_params(d)
        self.log_dict(d, "config.json")

    @_tolerant()
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(_key(k), _clip(redact(str(v)), MAX_TAG_VALUE)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    @_tolerant()
    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalar metrics (floats, 0-d tensors, numpy scalars) at ``step``; ``None`` values are skipped."""
        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            value = _metric_value(v)
            if value is not None:
                items.append(Metric(_key(k), value, now, int(step)))
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    # ------------------------------------------------------------------ artifacts
    @_tolerant()
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) at ``artifact_file`` (credentials redacted)."""
        self.client.log_dict(self.run_id, redact(obj), artifact_file)

    @_tolerant()
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    @_tolerant()
    def log_artifact(self, local_path: str | Path, path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), path)

    @_tolerant()
    def log_artifacts(self, local_dir: str | Path, path: str | None = None) -> None:
        """Every file under ``local_dir`` (a local directory or an ``s3://`` prefix) under artifact ``path``."""
        with _local_dir(local_dir) as d:
            self.client.log_artifacts(self.run_id, str(d), path)

    @_tolerant()
    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows (dicts) as an MLflow table (``.json`` or ``.parquet``); appended to if the file exists.

        PIL images in a column are stored as image files and shown as images in the UI.
        """
        import pandas as pd

        if not str(artifact_file).endswith((".json", ".parquet")):
            raise ValueError(f"table artifact_file must end in .json or .parquet: {artifact_file!r}")
        if not rows:
            return
        df = pd.DataFrame([{k: _plain(v) if not hasattr(v, "resize") else v for k, v in r.items()} for r in rows])
        self.client.log_table(self.run_id, data=df, artifact_file=str(artifact_file))

    @_tolerant()
    def log_image(self, image: Any, key: str, step: int) -> None:
        """One time-stepped image (PIL or HxWxC numpy), shown in the run's image view under ``key``."""
        self.client.log_image(self.run_id, image, key=_BAD_IMAGE_KEY_CHARS.sub("_", key),
                              step=int(step), synchronous=True)

    def log_image_captions(self, images: Sequence[Any], captions: Sequence[str], step: int, key: str = "samples",
                           references: Sequence[str] | None = None) -> None:
        """A few sample images with their generated captions at ``step``.

        Each image is logged with ``mlflow.log_image`` under ``<key>/<i>`` (a time series per sample), and one
        row per image (``step``, ``index``, ``caption``, optional ``reference``, the image) is appended to the
        table ``<key>.json``.
        """
        from PIL import Image

        if len(images) != len(captions) or (references is not None and len(references) != len(images)):
            raise ValueError("log_image_captions: images, captions (and references) must have the same length")
        rows = []
        for i, (img, caption) in enumerate(zip(images, captions)):
            if not isinstance(img, Image.Image):
                img = Image.fromarray(img)
            img = img.convert("RGB")
            self.log_image(img, f"{key}/{i}", step)
            row = {"step": int(step), "index": i, "caption": str(caption)}
            if references is not None:
                row["reference"] = str(references[i])
            row["image"] = img
            rows.append(row)
        self.log_table(rows, f"{_BAD_IMAGE_KEY_CHARS.sub('_', key)}.json")

    # ------------------------------------------------------------------ models
    @_tolerant("")
    def log_blip_model(self, checkpoint_dir: str | Path, name: str = "model", registered_name: str | None = None,
                       *, model_config: Mapping[str, Any] | None = None, include_code: bool = True) -> str:
        """Log a BLIP checkpoint directory (``save_model_dir``) as an MLflow pyfunc model; return its model URI.

        The pyfunc (:mod:`components.tracking.mlflow_model`) captions images and scores image-text pairs, so
        ``mlflow models serve`` can serve it. With ``include_code`` the ``blip_core`` package travels with the
        model. With ``registered_name`` a new version of that registered model is created
        (``self.model_info.registered_model_version``). ``checkpoint_dir`` may be an ``s3://`` prefix.
        """
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_blip_model must be called while stage run {self.run_id} is the active run")
        with _local_dir(checkpoint_dir) as ckpt:
            if not ckpt.is_dir() or not any(ckpt.iterdir()):
                raise UserError(f"checkpoint directory {checkpoint_dir} is missing or empty")
            info = log_pyfunc(ckpt, name, registered_name, model_config=model_config, include_code=include_code,
                              tags={"blip.stage": self.stage})
        self.model_info = info
        self.set_tags({f"blip.model_uri.{name}": info.model_uri})
        return info.model_uri


class NullStageRun:
    """What :func:`stage_run` yields when tracking is off: every method does nothing, ``run_id`` is None."""

    def __init__(self, stage: str):
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.stage = stage
        self.tracking_uri: str | None = None
        self.client = None
        self.model_info: Any = None
        self.lost: str | None = None

    @property
    def enabled(self) -> bool:
        return False

    def parent(self) -> StageRunLike:
        return self

    def lose(self, error: BaseException) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_config(self, config: Any) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str | Path, path: str | None = None) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, path: str | None = None) -> None:
        pass

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int) -> None:
        pass

    def log_image_captions(self, images: Sequence[Any], captions: Sequence[str], step: int, key: str = "samples",
                           references: Sequence[str] | None = None) -> None:
        pass

    def log_blip_model(self, checkpoint_dir: str | Path, name: str = "model", registered_name: str | None = None,
                       *, model_config: Mapping[str, Any] | None = None, include_code: bool = True) -> str:
        return ""


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, parent_run_id: str | None = None, experiment: str | None = None,
              tags: Mapping[str, Any] | None = None, *, uri: str | None = None, run_name: str | None = None,
              log_system_metrics: bool = True) -> Iterator[StageRunLike]:
    """A nested run for one stage under the pipeline's parent run; yields a :class:`StageRun` (with tracking off,
    a :class:`NullStageRun`).

    ``config`` (a dict or config dataclass, e.g. the resolved :class:`blip_core.Config`) is logged as dotted
    params and as ``config.json``. The run is the active MLflow run inside the block. On an exception the run
    ends ``FAILED`` (``KILLED`` for KeyboardInterrupt) with the error in the tag ``blip.error``, and the
    exception propagates.
    """
    if not tracking_enabled():
        yield NullStageRun(stage)
        return
    uri = check_tracking(uri)
    parent_id, exp_id, owned = _parent(parent_run_id, experiment, uri)
    client = _client(uri)
    run_tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": run_name or stage, "blip.stage": stage,
                "blip.kind": "stage", **(tags or {})}
    created = client.create_run(exp_id, run_name=run_name or stage, tags=_resolved_tags(run_tags))
    run_id = created.info.run_id
    if log_system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    run = StageRun(run_id, parent_id, exp_id, stage, uri)
    status = "FAILED"
    try:
        try:
            mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=log_system_metrics)
        except Exception as e:
            if not _is_server_failure(e):
                raise
            run.lose(e)
        if config is not None:
            run.log_config(config)
        yield run
        status = "FINISHED"
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            run.set_tags({"blip.error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if run.lost is None:
            try:
                _end_active(run_id, status)
            except Exception as e:
                if not _is_server_failure(e):
                    raise
                run.lose(e)
        if run.lost is not None:
            _drop_active(run_id)
        elif owned:
            with contextlib.suppress(Exception):
                client.set_terminated(parent_id, status=status)


def _stop_system_metrics(run_id: str) -> None:
    """Stop MLflow's system-metrics sampler of ``run_id`` without a last flush to the server."""
    from mlflow.tracking import fluent

    monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)
    event = getattr(monitor, "_shutdown_event", None)
    if event is not None:
        event.set()


def _drop_active(run_id: str) -> None:
    """Take ``run_id`` (and any run above it) off the fluent run stack without calling the server."""
    from mlflow.tracking import fluent

    _stop_system_metrics(run_id)
    stack = getattr(fluent, "_active_run_stack", None)
    runs = stack.get() if stack is not None else []
    ids = [r.info.run_id for r in runs]
    if run_id in ids:
        del runs[ids.index(run_id):]


def _end_active(run_id: str, status: str) -> None:
    """End ``run_id``: pop it (and any run a stage left open above it) off the fluent run stack."""
    from mlflow.tracking import fluent

    stack = getattr(fluent, "_active_run_stack", None)
    ids = [r.info.run_id for r in stack.get()] if stack is not None else []
    if run_id in ids:
        for _ in range(len(ids) - ids.index(run_id) - 1):
            mlflow.end_run("FINISHED" if status == "FINISHED" else "KILLED")
        mlflow.end_run(status)
    else:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:  # ended by the stage itself: record the outcome
            MlflowClient().set_terminated(run_id, status=status)
