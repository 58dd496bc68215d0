"""Where runs go: the tracking URI, its health check, the experiment and the pipeline's parent runs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from blip_core.errors import UserError
from blip_core.redact import redact
from components.tracking.values import MAX_TAG_VALUE, _clip

log = logging.getLogger("components.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "blip-capfilt"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI's experiment type
EXPERIMENT_KIND = "custom_model_development"  # shown as "Machine learning": runs, not the GenAI overview
PARENT_RUN_ENV = "BLIP_PARENT_RUN_ID"
TRACKING_SWITCH_ENV = "BLIP_TRACKING"

# parents this process created implicitly (no parent given): ended with the last stage's status
_OWNED_PARENTS: set[str] = set()


class TrackingError(UserError):
    """The tracking server or store cannot be used (down, wrong URI, missing parent run, deleted experiment)."""


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


def _parent(parent_run_id: str | None, experiment: str | None, uri: str) -> tuple[str, str, bool]:
    """(parent run id, experiment id, created here) for a stage run."""
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
