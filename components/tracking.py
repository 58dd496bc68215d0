"""MLflow tracking for the pipeline stages: one parent run per pipeline run, one nested run per stage.

Where runs go:

- the tracking URI is the ``uri`` argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory (made absolute, so child processes agree). With a sqlite store the artifacts go to
  ``mlruns/<experiment>/`` beside the database file; with an ``http(s)://`` server they go wherever the server
  puts them (proxied artifacts: clients need no S3 credentials);
- the experiment is the ``experiment`` argument, else ``MLFLOW_EXPERIMENT_NAME``, else ``blip-capfilt``. It is
  tagged ``mlflow.experimentKind=custom_model_development`` ("Machine learning"), so an MLflow UI that picks
  its view from the experiment's kind opens on the training runs, not on the GenAI overview;
  :func:`experiment_url` gives a link that opens the runs in any MLflow 3 UI;
- the parent run id is the ``parent_run_id`` argument, else ``BLIP_PARENT_RUN_ID``. When neither is set, the
  first stage creates a parent run and exports its id in ``BLIP_PARENT_RUN_ID``, so later stages in the same
  process (and the processes it starts) nest under the same parent. A parent created that way is ended with
  the status of the last stage that used it; a parent made by :func:`pipeline_run` or
  :func:`start_pipeline_run` is ended by its owner.

A stage uses it like this::

    check_tracking()                      # fails fast (UserError) when the server is down
    with stage_run("pretrain", to_dict(cfg)) as run:
        for step, batch in ...:
            run.log_metrics(step, {"loss/itc": ..., "lr": ..., "pairs_per_s": ...})
        run.log_image_captions(images, captions, step=step)
        uri = run.log_blip_model(checkpoint_dir, registered_name="blip-captioner")

An exception inside the block ends the stage run as ``FAILED`` (``KILLED`` on Ctrl-C) and is re-raised.
System metrics (CPU, memory, disk, network; GPU when ``nvidia-ml-py`` is installed) are sampled by MLflow every
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default here: 5).

If the server goes away after the stage started, the stage goes on without tracking: the first logging call
that fails (after MLflow's own HTTP retries) logs one warning, every later call is skipped, the run is left as
the server last saw it, and :attr:`StageRun.lost` holds the reason (training stages copy it into
``result.json`` as ``tracking_lost``). Errors in what is logged (bad values, missing files) still raise while
tracking works.

Tracking is off (every call a no-op, ``run_id`` is ``None``) when ``BLIP_TRACKING`` is ``0``/``off``/``false``,
and on distributed ranks other than 0 (``RANK``), so only rank 0 logs.

Registry: :func:`register_model`, :func:`set_alias`, :func:`get_alias_version`.

Command line: ``python -m components.tracking check|start|end|url`` (see ``--help``); for example, to group the
stages of a ``dvc repro`` under one parent run::

    export BLIP_PARENT_RUN_ID=$(python -m components.tracking start --name "dvc repro")
    dvc repro && python -m components.tracking end || python -m components.tracking end --status FAILED
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from blip_core.errors import UserError
from blip_core.redact import redact

log = logging.getLogger(__name__)
logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep stage output readable (system-metrics chatter)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "blip-capfilt"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI's experiment type
EXPERIMENT_KIND = "custom_model_development"  # shown as "Machine learning": runs, not the GenAI overview
PARENT_RUN_ENV = "BLIP_PARENT_RUN_ID"
TRACKING_SWITCH_ENV = "BLIP_TRACKING"
SYSTEM_METRICS_INTERVAL_S = 5.0
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")

# MLflow's limits (mlflow.utils.validation); copied so a change there cannot break logging here.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")
_BAD_IMAGE_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_\-./ ]")

# parents this process created implicitly (no parent given): ended with the last stage's status
_OWNED_PARENTS: set[str] = set()

__all__ = [
    "DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "PARENT_RUN_ENV", "StageRun", "TrackingError",
    "check_tracking", "end_pipeline_run", "experiment_id", "experiment_url", "get_alias_version", "pipeline_run",
    "register_model", "resolve_tracking_uri", "set_alias", "stage_run", "start_pipeline_run",
    "tracking_enabled",
]


class TrackingError(UserError):
    """The tracking server or store cannot be used (down, wrong URI, missing parent run, deleted experiment)."""


# --------------------------------------------------------------------------------------------------
# URIs, health, experiments
# --------------------------------------------------------------------------------------------------


def tracking_enabled() -> bool:
    """False when ``BLIP_TRACKING`` switches tracking off or this is a distributed rank other than 0."""
    if os.environ.get(TRACKING_SWITCH_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    rank = os.environ.get("RANK", "0").strip() or "0"
    return rank == "0"


def _sqlite_path(uri: str) -> Path | None:
    """The database path of a ``sqlite:///`` URI (``sqlite:///rel.db`` relative, ``sqlite:////abs.db`` absolute)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (absolute)."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute() and str(path) != ":memory:":
        query = ("?" + uri.split("?", 1)[1]) if "?" in uri else ""
        uri = f"sqlite:///{(Path.cwd() / path).resolve()}{query}"
    return uri


def _activate(uri: str | None) -> str:
    uri = resolve_tracking_uri(uri)
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=_activate(uri))


def check_tracking(uri: str | None = None, timeout: float = 10.0) -> str:
    """Check that tracking works before any training starts; return the resolved URI and make it current.

    ``http(s)://``: ``GET <uri>/health`` must answer 200 within ``timeout`` seconds. ``sqlite:///``: the
    database (and its directory) is created or opened. Other stores: one query. Failures raise
    :class:`TrackingError` naming the URI.
    """
    uri = resolve_tracking_uri(uri)
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is not healthy: GET /health answered "
                                f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is not reachable: {reason} "
                                "(start it, or point MLFLOW_TRACKING_URI at a running server)") from None
        if status != 200:
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is not healthy: GET /health answered "
                                f"HTTP {status}")
    else:
        path = _sqlite_path(uri)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # MlflowException, OSError, SQLAlchemy and driver errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"MLflow tracking store {redact(uri)} cannot be opened: {msg}") from None
    return _activate(uri)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "experiment"


def experiment_id(name: str | None = None, uri: str | None = None) -> str:
    """Id of experiment ``name`` (default: ``MLFLOW_EXPERIMENT_NAME`` or ``blip-capfilt``), created if absent.

    The experiment gets the kind tag (:data:`EXPERIMENT_KIND`) when it is created, and when an existing one
    has no kind yet (a kind someone chose is left alone).
    """
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = _client(uri)
    uri = resolve_tracking_uri(uri)
    for _ in range(3):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(f"MLflow experiment {name!r} at {redact(uri)} is deleted: restore it "
                                    "(mlflow experiments restore) or choose another name")
            if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
                try:
                    client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                except MlflowException as e:  # e.g. a user allowed to log runs but not to edit the experiment
                    log.debug("cannot tag experiment %s with its kind: %s", name, e)
            return exp.experiment_id
        location = None
        path = _sqlite_path(uri)
        if path is not None:
            location = (path.parent / "mlruns" / _slug(name)).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # created concurrently by another stage: look it up again
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    raise TrackingError(f"cannot create MLflow experiment {name!r} at {redact(uri)}")


def experiment_url(ui: str, experiment: str, run_id: str | None = None) -> str:
    """Link to experiment id ``experiment`` (or one of its runs) in the MLflow UI at ``ui``, on the training view.

    MLflow 3's UI opens an experiment on its GenAI overview unless the browser last chose "Model training"
    (it keeps that choice per browser) or the link says ``workflowType=machine_learning``, as this one does.
    """
    page = f"#/experiments/{urllib.parse.quote(str(experiment))}"
    if run_id:
        page += f"/runs/{urllib.parse.quote(run_id)}"
    return f"{ui.rstrip('/')}/{page}?workflowType=machine_learning"


def _resolved_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags

    return {k: _clip(str(v), MAX_TAG_VALUE) for k, v in resolve_tags(dict(tags)).items()}


def start_pipeline_run(name: str | None = None, experiment: str | None = None, tags: Mapping[str, Any] | None = None,
                       uri: str | None = None, export: bool = True) -> str:
    """Create a parent run for one pipeline run (status RUNNING) and return its id.

    With ``export`` the id is put in ``BLIP_PARENT_RUN_ID`` so stages started later find it.
    """
    check_tracking(uri)
    exp_id = experiment_id(experiment, uri)
    name = name or time.strftime("pipeline-%Y%m%d-%H%M%S")
    run = _client(uri).create_run(exp_id, run_name=name,
                                  tags=_resolved_tags({"blip.kind": "pipeline", **(tags or {})}))
    if export:
        os.environ[PARENT_RUN_ENV] = run.info.run_id
    return run.info.run_id


def end_pipeline_run(run_id: str | None = None, status: str = "FINISHED", uri: str | None = None) -> None:
    """End a parent run (default: ``BLIP_PARENT_RUN_ID``) with ``status`` (FINISHED, FAILED or KILLED)."""
    run_id = run_id or os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        raise TrackingError(f"no pipeline run to end: pass its id or set {PARENT_RUN_ENV}")
    _client(uri).set_terminated(run_id, status=status)
    _OWNED_PARENTS.discard(run_id)


@contextlib.contextmanager
def pipeline_run(name: str | None = None, experiment: str | None = None, tags: Mapping[str, Any] | None = None,
                 uri: str | None = None) -> Iterator[str]:
    """A parent run for the block: stages inside nest under it; ended FINISHED, or FAILED on an exception."""
    previous = os.environ.get(PARENT_RUN_ENV)
    run_id = start_pipeline_run(name, experiment, tags, uri)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            end_pipeline_run(run_id, status, uri)
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _key(key: Any) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars/arrays to Python numbers and lists; other values unchanged."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _param_value(value: Any) -> str:
    value = _plain(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, (list, tuple, dict, set)):
        text = json.dumps(list(value) if isinstance(value, set) else value, default=str, sort_keys=True)
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    return _clip(redact(text), MAX_PARAM_VALUE)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dict or a config dataclass, not {type(config).__name__}")


def _metric_value(value: Any) -> float | None:
    value = _plain(value)
    if isinstance(value, list):
        if len(value) != 1:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Stage runs
# --------------------------------------------------------------------------------------------------


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

    def parent(self) -> StageRun:
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
        """Log a BLIP checkpoint directory (``BlipModel.save``) as an MLflow pyfunc model; return its model URI.

        The pyfunc (``components/mlflow_model.py``) captions images and scores image-text pairs, so
        ``mlflow models serve`` can serve it. With ``include_code`` the ``blip_core`` package travels with the
        model. With ``registered_name`` a new version of that registered model is created
        (``self.model_info.registered_model_version``). ``checkpoint_dir`` may be an ``s3://`` prefix.
        """
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_blip_model must be called while stage run {self.run_id} is the active run")
        with _local_dir(checkpoint_dir) as ckpt, tempfile.TemporaryDirectory(prefix="blip-code-") as tmp:
            if not ckpt.is_dir() or not any(ckpt.iterdir()):
                raise UserError(f"checkpoint directory {checkpoint_dir} is missing or empty")
            code_paths = [_copy_package("blip_core", Path(tmp))] if include_code else None
            with warnings.catch_warnings():  # the explicit signature stands in for an input example
                warnings.filterwarnings("ignore", message=r".*input example", category=UserWarning)
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=str(MODEL_CODE),
                    artifacts={"checkpoint": str(ckpt)},
                    code_paths=code_paths,
                    pip_requirements=model_requirements(),
                    signature=model_signature(vqa=_is_vqa_checkpoint(ckpt)),
                    model_config=dict(model_config) if model_config else None,
                    registered_model_name=registered_name,
                    tags={"blip.stage": self.stage},
                )
        self.model_info = info
        self.set_tags({f"blip.model_uri.{name}": info.model_uri})
        return info.model_uri


class NullStageRun(StageRun):
    """What :func:`stage_run` yields when tracking is off: every method does nothing, ``run_id`` is None."""

    def __init__(self, stage: str):
        self.run_id = None  # type: ignore[assignment]
        self.parent_run_id = None  # type: ignore[assignment]
        self.experiment_id = None  # type: ignore[assignment]
        self.stage = stage
        self.tracking_uri = None  # type: ignore[assignment]
        self.client = None  # type: ignore[assignment]
        self.model_info = None
        self.lost = None

    @property
    def enabled(self) -> bool:
        return False

    def parent(self) -> StageRun:
        return self

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
def _local_dir(path: str | Path) -> Iterator[Path]:
    text = str(path)
    if text.startswith("s3://"):
        from components import storage

        with tempfile.TemporaryDirectory(prefix="blip-mlflow-") as tmp:
            storage.download_dir(text, tmp)
            yield Path(tmp)
    else:
        yield Path(path)


def _copy_package(package: str, dest: Path) -> str:
    module = sys.modules.get(package) or __import__(package)
    src = Path(module.__file__).parent
    target = dest / package
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def model_requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc (given explicitly: MLflow's inference would load the model)."""
    from importlib import metadata

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors",
                 "pillow", "numpy", "pandas", "pyyaml"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _is_vqa_checkpoint(ckpt: Path) -> bool:
    try:
        return json.loads((ckpt / "config.json").read_text()).get("architecture") == "blip_vqa"
    except (OSError, ValueError, AttributeError):
        return False


def model_signature(vqa: bool = False):
    """Input ``image`` (string: base64-encoded image bytes) and optional ``text``; decoding options as params.

    ``vqa``: the signature of a VQA model: ``image`` and ``question``, answer decoding options."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    if vqa:
        return ModelSignature(
            inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
            params=ParamSchema([
                ParamSpec("decoding", "string", "beam"),
                ParamSpec("num_beams", "long", 3),
                ParamSpec("max_length", "long", 10),
                ParamSpec("min_length", "long", 1),
                ParamSpec("batch_size", "long", 16),
            ]),
        )

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "text", required=False)]),
        params=ParamSchema([
            ParamSpec("decoding", "string", "beam"),
            ParamSpec("num_beams", "long", 3),
            ParamSpec("max_length", "long", 20),
            ParamSpec("min_length", "long", 5),
            ParamSpec("prompt", "string", "a picture of "),
            ParamSpec("batch_size", "long", 16),
        ]),
    )


def _parent(parent_run_id: str | None, experiment: str | None, uri: str) -> tuple[str, str, bool]:
    """(parent run id, experiment id, created here)."""
    source = "argument parent_run_id"
    if not parent_run_id:
        parent_run_id, source = os.environ.get(PARENT_RUN_ENV) or None, PARENT_RUN_ENV
    if not parent_run_id:
        run_id = start_pipeline_run(experiment=experiment, uri=uri)
        _OWNED_PARENTS.add(run_id)
        return run_id, _client(uri).get_run(run_id).info.experiment_id, True
    client = _client(uri)
    try:
        run = client.get_run(parent_run_id)
    except MlflowException as e:
        raise TrackingError(f"parent run {parent_run_id!r} (from {source}) is not in the tracking store "
                            f"{redact(uri)}: {str(e).splitlines()[0]}") from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"parent run {parent_run_id!r} (from {source}) is deleted")
    if experiment and client.get_experiment(run.info.experiment_id).name != experiment:
        log.warning("stage run goes to the parent run's experiment, not %r", experiment)
    if parent_run_id in _OWNED_PARENTS and run.info.status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")
    return parent_run_id, run.info.experiment_id, parent_run_id in _OWNED_PARENTS


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, parent_run_id: str | None = None, experiment: str | None = None,
              tags: Mapping[str, Any] | None = None, *, uri: str | None = None, run_name: str | None = None,
              log_system_metrics: bool = True) -> Iterator[StageRun]:
    """A nested run for one stage under the pipeline's parent run; yields a :class:`StageRun`.

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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def register_model(model_uri: str, name: str, alias: str | None = None, tags: Mapping[str, Any] | None = None,
                   uri: str | None = None) -> int:
    """Register ``model_uri`` (``models:/m-...`` or ``runs:/...``) as a new version of ``name``; return it.

    With ``alias`` (e.g. ``candidate``) the alias is moved to the new version.
    """
    _activate(uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()} or None)
    version = int(mv.version)
    if alias:
        set_alias(name, alias, version, uri)
    return version


def set_alias(name: str, alias: str, version: int | str, uri: str | None = None) -> None:
    """Point ``name@alias`` at ``version``."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str, uri: str | None = None) -> tuple[int, dict[str, float]] | None:
    """``(version, metrics)`` of ``name@alias``, or ``None`` when the model or the alias does not exist.

    The metrics are the latest values of the run that logged the model version, updated with the metrics
    logged on the model itself (MLflow 3 LoggedModel).
    """
    client = _client(uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    metrics: dict[str, float] = {}
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            metrics.update(client.get_run(mv.run_id).data.metrics)
    model_id = getattr(mv, "model_id", None)
    if model_id:
        with contextlib.suppress(Exception):
            for m in client.get_logged_model(model_id).metrics or []:
                if not math.isnan(m.value):
                    metrics[m.key] = m.value
    return int(mv.version), metrics


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.tracking",
                                description="Check MLflow tracking and start/end pipeline (parent) runs.")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="fail (exit 2) when the tracking server/store is unusable")
    c.add_argument("--timeout", type=float, default=10.0)
    s = sub.add_parser("start", help="create a parent run and print its id (for BLIP_PARENT_RUN_ID)")
    s.add_argument("--name", default=None)
    s.add_argument("--experiment", default=None, help="default: MLFLOW_EXPERIMENT_NAME or blip-capfilt")
    s.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    u = sub.add_parser("url", help="print the MLflow UI link that opens the experiment (or a run) on its runs")
    u.add_argument("--ui", default="http://127.0.0.1:5000", help="the UI's address (default: mlflow ui's)")
    u.add_argument("--experiment", default=None, help="default: MLFLOW_EXPERIMENT_NAME or blip-capfilt")
    u.add_argument("--run-id", default=None)
    e = sub.add_parser("end", help="end a parent run (default: BLIP_PARENT_RUN_ID)")
    e.add_argument("run_id", nargs="?", default=None)
    e.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    return p


def _parse_tags(items: Iterable[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--tag expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        tags[k] = v
    return tags


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "check":
            print(redact(check_tracking(args.tracking_uri, timeout=args.timeout)))
        elif args.cmd == "url":
            name = args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            exp = _client(args.tracking_uri).get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"no MLflow experiment {name!r} at {redact(resolve_tracking_uri(args.tracking_uri))}")
            print(experiment_url(args.ui, exp.experiment_id, args.run_id))
        elif args.cmd == "start":
            print(start_pipeline_run(args.name, args.experiment, _parse_tags(args.tag), args.tracking_uri))
        else:
            end_pipeline_run(args.run_id, args.status, args.tracking_uri)
    except UserError as err:
        print(f"tracking: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
