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

Registry: :func:`register_model`, :func:`set_alias`, :func:`get_alias_version`, :func:`get_version_tags`,
:func:`set_version_tag`.

Modules: ``store`` (the tracking URI, its health check, experiments, pipeline runs), ``stage`` (stage runs:
:class:`StageRunLike`, :class:`StageRun`, :class:`NullStageRun`, :func:`stage_run`, system metrics, lost
tracking), ``values`` (keys, params, tags and metrics made loggable), ``mlflow_model`` (the pyfunc model and
its packaging), ``registry`` and ``cli``. Everything public is importable from ``components.tracking``.

Command line: ``python -m components.tracking check|start|end|url`` (see ``--help``); for example, to group the
stages of a ``dvc repro`` under one parent run::

    export BLIP_PARENT_RUN_ID=$(python -m components.tracking start --name "dvc repro")
    dvc repro && python -m components.tracking end || python -m components.tracking end --status FAILED
"""

from __future__ import annotations

import logging

from blip_core.redact import redact
from components.tracking.cli import main
from components.tracking.mlflow_model import MODEL_CODE, model_requirements, model_signature
from components.tracking.registry import (
    get_alias_version,
    get_version_tags,
    register_model,
    set_alias,
    set_version_tag,
)
from components.tracking.stage import (
    SYSTEM_METRICS_INTERVAL_S,
    NullStageRun,
    StageRun,
    StageRunLike,
    stage_run,
)
from components.tracking.store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_ENV,
    TRACKING_SWITCH_ENV,
    TrackingError,
    check_tracking,
    end_pipeline_run,
    experiment_id,
    experiment_url,
    pipeline_run,
    resolve_tracking_uri,
    start_pipeline_run,
    tracking_enabled,
)
from components.tracking.store import (
    _client as _client,  # pipelines.steps lists the pipeline runs with it
)
from components.tracking.values import MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE

logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep stage output readable (system-metrics chatter)

__all__ = [
    "DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "MAX_KEY",
    "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "MODEL_CODE", "NullStageRun", "PARENT_RUN_ENV",
    "SYSTEM_METRICS_INTERVAL_S", "StageRun", "StageRunLike", "TRACKING_SWITCH_ENV", "TrackingError",
    "check_tracking", "end_pipeline_run", "experiment_id", "experiment_url", "get_alias_version",
    "get_version_tags", "main", "model_requirements", "model_signature", "pipeline_run", "redact",
    "register_model", "resolve_tracking_uri", "set_alias", "set_version_tag", "stage_run", "start_pipeline_run",
    "tracking_enabled",
]
