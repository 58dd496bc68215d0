"""What each pipeline step does: the KFP components in :mod:`pipelines.components` are one call into here.

Every function adapts KFP's artifacts and parameters to a stage of :mod:`components` and back:

- **Locations.** A stage writes its output either into the KFP artifact's own path (``run_root`` empty: local runs,
  or a cluster without a shared bucket) or to ``<run_root>/<name>`` on S3. In the second case the artifact's
  metadata ``location`` holds that URI and the artifact's file is a small pointer; downstream steps read
  :func:`input_location`. An S3 location survives the step's pod, so a retried training step resumes from its
  newest checkpoint there (the stages resume by default), and TorchX jobs can write it.
- **Stages.** A step calls its stage through the stage's spec (:func:`run_stage`, :mod:`components.spec`): the
  same option values become ``run``'s arguments inline, or the argument list of a TorchX job
  (``launcher=torchx``), and the step prints the stage's own summary line (the one ``blip <stage>`` prints).
- **Run context.** :func:`start_run` creates the MLflow parent run of the pipeline run and returns a ``ctx``
  dict (environment for tracking and S3, ``run_root``, ``parent_run_id``) that every later step applies first.
- **Errors.** A failing step prints one line ``blip pipeline step <stage>: error: ...`` and, when
  ``BLIP_PIPELINE_ERRORS`` names a directory (``blip pipeline run-local`` sets it), records it there too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from blip_core.errors import UserError
from blip_core.redact import install_log_redaction, redact

log = logging.getLogger(__name__)

ERRORS_ENV = "BLIP_PIPELINE_ERRORS"
LOCATION = "location"
# the MLflow servers the pipeline's MLflow credentials may be sent to (set by the cluster operator, in the launch
# policy ConfigMap); unset: only the in-cluster default of pipelines.settings
TRACKING_URIS_ENV = "BLIP_ALLOWED_TRACKING_URIS"


# --------------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (with its type unless it is a UserError)."""
    from components.cli import storage_error

    e = storage_error(e) or e
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    line = first if isinstance(e, UserError) and first else f"{type(e).__name__}: {first}".rstrip(": ")
    return redact(line)


@contextlib.contextmanager
def step(stage: str) -> Iterator[None]:
    """Report a failure of ``stage`` as one clear line (stderr, and a record for run-local)."""
    install_log_redaction()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        yield
    except BaseException as e:
        msg = one_line(e)
        print(f"blip pipeline step {stage}: error: {msg}", file=sys.stderr, flush=True)
        folder = os.environ.get(ERRORS_ENV)
        if folder:
            with contextlib.suppress(OSError):
                Path(folder).mkdir(parents=True, exist_ok=True)
                record = {"stage": stage, "error": msg, "type": type(e).__name__, "time": time.time()}
                (Path(folder) / f"{time.time_ns()}-{os.getpid()}.json").write_text(json.dumps(record))
        raise


def apply_context(ctx: dict) -> None:
    """Put the run context's environment (tracking, S3 endpoint, parent run) into this process."""
    for key, value in (ctx.get("env") or {}).items():
        if value in (None, ""):
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def check_tracking_uri(uri: str) -> None:
    """Refuse (one line) to send this step's MLflow credentials to a server the operator did not allow.

    ``mlflow_tracking_uri`` is a run parameter: without this check a run could point it at a server of its own
    and receive the pipeline's MLflow password in the Basic-auth header. Without credentials any URI is fine.
    """
    import re

    from pipelines import settings

    if not (os.environ.get("MLFLOW_TRACKING_PASSWORD") or os.environ.get("MLFLOW_TRACKING_TOKEN")):
        return
    raw = os.environ.get(TRACKING_URIS_ENV)
    allowed = {u.rstrip("/") for u in re.split(r"[,\s]+", raw) if u} if raw is not None else {settings.MLFLOW_URI}
    if uri.strip().rstrip("/") not in allowed:
        from components.tracking import redact

        raise UserError(f"mlflow_tracking_uri {redact(uri)!r} is not allowed with the pipeline's MLflow credentials "
                        f"(allowed: {', '.join(sorted(allowed)) or 'none'}; the cluster operator sets "
                        f"{TRACKING_URIS_ENV})")


def load_cfg(params_file: str, overrides: Sequence[str]):
    """The config from ``params_file`` (local path or s3 URI; '' = built-in defaults) with ``overrides``."""
    from blip_core.config import load_config
    from components import storage

    overrides = [str(o) for o in overrides or []]
    if not params_file:
        return load_config(None, overrides)
    if storage.is_s3(params_file):
        with storage.local_copy(params_file) as p:
            return load_config(str(p), overrides)
    if not Path(params_file).is_file():
        raise UserError(f"params file not found: {params_file}")
    return load_config(params_file, overrides)


def output_location(artifact, run_root: str, name: str) -> str:
    """Where a stage writes the output behind ``artifact``: ``<run_root>/<name>`` or the artifact's path."""
    from components import storage

    if not run_root:
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        return artifact.path
    loc = storage.join(run_root, name)
    artifact.metadata[LOCATION] = loc
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({LOCATION: loc}) + "\n")
    return loc


def input_location(artifact) -> str:
    """The output location behind an input artifact (see :func:`output_location`)."""
    return str(artifact.metadata.get(LOCATION) or artifact.path)


def _config_args(params_file: str, overrides: Sequence[str]) -> list[str]:
    from components import storage

    if params_file and storage.is_s3(params_file):
        raise UserError(f"launcher=torchx needs params_file to be a path inside the image, not {params_file}")
    args = ["--config", params_file] if params_file else []
    for o in overrides or []:
        args += ["--set", str(o)]
    return args


def _launch(stage: str, args: list[str], ctx: dict, torchx: dict) -> None:
    from components import launch, storage

    output = launch.option_value(args, "--output") or ""
    opts = {**torchx}
    scheduler = opts.pop("scheduler", "kubernetes")
    if scheduler == "kubernetes" and not storage.is_s3(output):
        raise UserError(f"launcher=torchx writes to S3: set the pipeline parameter output_root (got output {output})")
    allowed = {"nodes", "procs_per_node", "gpus_per_node", "cpu", "mem_mb", "image", "queue", "namespace",
               "service_account", "secrets", "secret", "config_map", "node_selector", "priority_class", "mounts",
               "timeout_s", "log_dir"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise UserError(f"torchx: unknown settings {', '.join(unknown)} (known: scheduler, {', '.join(sorted(allowed))})")
    if "secret" in opts:  # one secret name, as older parameter sets have it
        opts["secrets"] = opts.pop("secret")
    # image, namespace, service account, secrets, ...: components.launch checks them against the operator's
    # launch policy (this step's environment), never against anything in the parameter itself
    for k in ("nodes", "procs_per_node", "gpus_per_node", "cpu", "mem_mb"):  # JSON numbers arrive as floats
        if opts.get(k) is not None:
            opts[k] = int(opts[k])
    env = {k: v for k, v in (ctx.get("env") or {}).items() if v}
    launch.launch(stage, args, scheduler=scheduler, env=env, run_id=ctx.get("run_id") or None, **opts)


def stage_argv(name: str, values: dict[str, Any], params_file: str = "", overrides: Sequence[str] = ()) -> list[str]:
    """The command line of stage ``name`` for option ``values`` (by dest, see :mod:`components.spec`) and the
    run's config: what a TorchX job of the stage runs."""
    from components import spec

    return spec.get(name).argv(values) + _config_args(params_file, overrides)


def run_stage(name: str, values: dict[str, Any], *, cfg, ctx: dict, params_file: str, overrides: Sequence[str],
              launcher: str = "inline", torchx: dict | None = None):
    """Run stage ``name`` with option ``values`` (by dest) through its spec: in this process (``inline``:
    ``run(cfg, **SPEC.run_kwargs(values))``, returning its result) or as a TorchX job running ``SPEC.argv(values)``
    (``torchx``: returns None; the stage's output holds its result). The pipeline's MLflow parent run is added."""
    import importlib

    from components import spec

    stage = spec.get(name)
    values = dict(values)
    if stage.tracking and ctx.get("parent_run_id"):
        values["parent_run_id"] = ctx["parent_run_id"]
    if launcher == "inline":
        return importlib.import_module(stage.module).run(cfg, **stage.run_kwargs(values))
    if launcher == "torchx":
        _launch(name, stage_argv(name, values, params_file, overrides), ctx, torchx or {})
        return None
    raise UserError(f"launcher must be 'inline' or 'torchx', got {launcher!r}")


def _result(output: str) -> dict:
    from components import storage

    path = storage.join(output, "result.json")
    return storage.read_json(path) if storage.exists(path) else {}


def _log_train_metrics(metrics, result: dict) -> None:
    for k, v in (result.get("losses") or {}).items():
        metrics.log_metric(f"final_{k}", float(v))
    for k in ("steps", "epochs", "pairs_per_second"):
        if result.get(k) is not None:
            metrics.log_metric(k, float(result[k]))


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------


def start_run(job_id: str, run_name: str, output_root: str, tracking_uri: str, experiment: str,
              s3_endpoint: str) -> tuple[str, dict]:
    """Create the MLflow parent run of this pipeline run; return its id and the run context for the stages."""
    from components import storage, tracking

    env: dict[str, str] = {"MLFLOW_EXPERIMENT_NAME": experiment, "AWS_ENDPOINT_URL_S3": s3_endpoint,
                           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    if tracking_uri.strip().lower() in ("off", "none", "0"):
        env["BLIP_TRACKING"] = "0"
    elif tracking_uri:
        check_tracking_uri(tracking_uri)
        env["MLFLOW_TRACKING_URI"] = tracking.resolve_tracking_uri(tracking_uri)
    apply_context({"env": env})
    run_root = storage.join(output_root, "runs", job_id) if output_root else ""
    parent = ""
    if tracking.tracking_enabled():
        parent = tracking.start_pipeline_run(
            run_name or f"kfp-{job_id}", experiment,
            tags={"blip.kind": "pipeline", "blip.kfp_job_id": job_id, "blip.run_root": run_root or "(artifacts)"},
            export=False)
        env[tracking.PARENT_RUN_ENV] = parent
        print(f"MLflow parent run {parent} in experiment {experiment!r} at {tracking.redact(tracking.resolve_tracking_uri())}")
    return parent, {"env": env, "run_root": run_root, "parent_run_id": parent, "run_id": job_id}


def end_run(job_id: str, tracking_uri: str, experiment: str, state: str, error: str = "") -> None:
    """End the parent run created for ``job_id`` (FINISHED when the run succeeded, else FAILED)."""
    if tracking_uri.strip().lower() in ("off", "none", "0"):
        return
    from components import tracking

    if tracking_uri:
        check_tracking_uri(tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking._client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    runs = client.search_runs([exp.experiment_id], f"tags.`blip.kfp_job_id` = '{job_id}'")
    status = "FINISHED" if state == "SUCCEEDED" else "FAILED"
    for r in runs:
        if r.data.tags.get("blip.kind") == "pipeline" and r.info.status == "RUNNING":
            if error:
                client.set_tag(r.info.run_id, "blip.error", error[:5000])
            tracking.end_pipeline_run(r.info.run_id, status)
            print(f"MLflow parent run {r.info.run_id}: {status} (pipeline {state})")


def train(stage: str, ctx: dict, params_file: str, overrides: Sequence[str], launcher: str, torchx: dict,
          data: Sequence[str], model, metrics, *, init: str | None = None, task: str | None = None,
          vocab_data: Sequence[str] = ()) -> None:
    """Run a training stage (``pretrain``, ``repretrain``, ``finetune_captioner``, ``finetune_filter``,
    ``finetune_vqa_<model>``)."""
    from components import training

    apply_context(ctx)
    cfg = load_cfg(params_file, overrides)
    out = output_location(model, ctx.get("run_root", ""), stage)
    if task:
        name, values = "finetune", {"task": task, "init": init, "data": list(data), "output": out, "stage_name": stage}
    else:
        name, values = "pretrain", {"data": list(data), "output": out, "stage_name": stage, "init": init,
                                    "vocab_data": list(vocab_data) or None}
    run_stage(name, values, cfg=cfg, ctx=ctx, params_file=params_file, overrides=overrides, launcher=launcher,
              torchx=torchx)
    result = _result(out)
    if not result:
        raise UserError(f"{stage}: no result.json in {out}: the stage did not finish")
    _log_train_metrics(metrics, result)
    model.metadata.update({"stage": stage, "steps": result.get("steps"), "mlflow_run_id": result.get("run_id"),
                           "model_uri": result.get("model_uri")})
    print(training.summary(stage, result))


def capfilt(ctx: dict, params_file: str, overrides: Sequence[str], launcher: str, torchx: dict, captioner: str,
            filter_: str, web: Sequence[str], human: Sequence[str], dataset, summary,
            calibration: Sequence[str] = ()) -> None:
    """Caption and filter the web data; write the bootstrapped dataset and a summary.

    ``calibration``: labelled web pairs on which the filter threshold is chosen (none: ``capfilt.threshold``).
    """
    from components import capfilt as stage
    from components import storage
    from components.evaluate import threshold_note

    apply_context(ctx)
    cfg = load_cfg(params_file, overrides)
    out = output_location(dataset, ctx.get("run_root", ""), "capfilt")
    values = {"captioner": captioner, "filter": filter_, "web": list(web), "human": list(human),
              "calibration": list(calibration), "output": out}
    run_stage("capfilt", values, cfg=cfg, ctx=ctx, params_file=params_file, overrides=overrides, launcher=launcher,
              torchx=torchx)
    path = storage.join(out, "summary.json")
    info = storage.read_json(path) if storage.exists(path) else {}
    t_in, t_out = info.get("texts_in") or {}, info.get("texts_out") or {}
    rows = "".join(f"| {src} | {t_in.get(src, 0)} | {t_out.get(src, 0)} |\n" for src in sorted(set(t_in) | set(t_out)))
    Path(summary.path).write_text(
        f"# CapFilt\n\nOutput `{out}`\n\n| source | texts in | texts kept |\n|---|---|---|\n{rows}\n"
        f"Web images in: {info.get('web_images_in', '?')}, kept: {info.get('web_images_out', '?')}; "
        f"human images: {info.get('human_images', '?')}\n\n{threshold_note(info).strip()}\n")
    dataset.metadata.update({"texts_in": t_in, "texts_out": t_out, "web_images_out": info.get("web_images_out"),
                             "threshold": info.get("threshold"), "threshold_source": info.get("threshold_source")})
    print(stage.summary(info, out))


def evaluate(ctx: dict, params_file: str, overrides: Sequence[str], models: dict[str, str], test: str,
             capfilt_data: str, results, metrics, report, html, *, vqa: dict[str, str] | None = None,
             vqa_test: str | None = None) -> None:
    """Evaluate the models on the test split (the promotion decision is the register step's)."""
    from components import evaluate as stage
    from components import storage

    apply_context(ctx)
    cfg = load_cfg(params_file, overrides)
    out = output_location(results, ctx.get("run_root", ""), "evaluate")
    values = {"model": [f"{k}={v}" for k, v in models.items()], "test": test, "output": out,
              "capfilt": capfilt_data or None, "vqa": [f"{k}={v}" for k, v in (vqa or {}).items()] or None,
              "vqa_test": vqa_test if vqa else None}
    res = run_stage("evaluate", values, cfg=cfg, ctx=ctx, params_file=params_file, overrides=overrides)
    per_model: dict[str, dict[str, Any]] = res.metrics.get("models") or {}
    for name, values in per_model.items():
        for k, v in values.items():
            if isinstance(v, (int, float)):
                metrics.log_metric(f"{name}/{k}", float(v))
    for k, v in (res.metrics.get("filter") or {}).items():
        if isinstance(v, (int, float)):
            metrics.log_metric(f"filter/{k}", float(v))
    results.metadata.update({"metric": cfg.evaluate.metric, "metrics_uri": storage.join(out, stage.METRICS_FILE)})
    Path(report.path).write_text(storage.read_text(storage.join(out, stage.REPORT_MD)))
    Path(html.path).write_text(storage.read_text(storage.join(out, stage.REPORT_HTML)))
    print(stage.summary(res.metrics, out))


def register(ctx: dict, params_file: str, overrides: Sequence[str], model: str, results: str, candidate: str,
             name: str, baseline: str, min_gain: float) -> dict:
    """Register the candidate model if it beats ``baseline`` by more than ``min_gain`` (the register stage's
    gate); the alias moves only when it beats the current champion."""
    import dataclasses

    from components import register as stage
    from components import storage

    apply_context(ctx)
    cfg = load_cfg(params_file, overrides)
    values = {"model": model, "metrics": storage.join(results, "metrics.json"), "candidate": candidate,
              "name": name, "baseline": baseline, "min_gain": float(min_gain)}
    res = run_stage("register", values, cfg=cfg, ctx=ctx, params_file=params_file, overrides=overrides)
    print(stage.summary(dataclasses.asdict(res)))
    return {k: v for k, v in dataclasses.asdict(res).items() if v is None or isinstance(v, (str, int, float, bool))}
