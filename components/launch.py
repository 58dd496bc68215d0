"""Launch the distributed stages (pretrain, finetune, capfilt) as TorchX ``dist.torchrun`` jobs.

``python -m components.launch STAGE [--scheduler local_cwd|kubernetes] [--nodes N] [--procs P] ... -- <stage args>``

The job runs ``torchrun -m components.<stage> <stage args>`` on ``nodes`` x ``procs_per_node`` processes; the
stage itself calls :func:`blip_core.train.distributed.init_from_env`, so the same module runs alone, under
torchrun on one machine, or on many nodes.

Schedulers:

- ``local_cwd``: the processes run on this machine (gloo on CPU). The job's working directory is the directory
  that holds the ``components`` package (the repository root, or site-packages for an installed package), so the
  job runs this very code; relative paths among the stage's path options are made absolute first. The
  interpreter's ``bin`` directory is put first on ``PATH`` so ``torchrun`` is found without an activated venv.
- ``kubernetes``: a Volcano job (one task per node) in ``namespace``/``queue``, pods running ``image`` as
  ``service_account`` with ``gpus_per_node`` GPUs, ``cpu`` and ``mem_mb`` each, a memory-backed ``/dev/shm``
  (added by TorchX), extra ``mounts``, the S3 and MLflow credentials from the Kubernetes ``secrets`` and the
  settings ConfigMap as environment (``envFrom``; explicit ``env`` wins). The tracking and S3 settings of this
  process (``MLFLOW_TRACKING_URI``, ``BLIP_PARENT_RUN_ID``, ``AWS_ENDPOINT_URL_S3``, ...) are passed on; no
  credential is ever written into the job. Outputs must be ``s3://`` URIs (or on a mounted volume): a pod's disk
  does not outlive it. The pods meet the ``restricted`` Pod Security level (:data:`POD_SECURITY`): non-root, no
  privilege escalation, no capabilities, RuntimeDefault seccomp, a read-only root filesystem with ``emptyDir``
  volumes for ``/tmp``, the home directory and the working directory.

Who may launch what (kubernetes): the image, namespace, service account, secrets, queue, ConfigMap, priority class
and volumes of a job must be in the **launch policy**, which the cluster operator sets in this process's
environment (``BLIP_LAUNCH_IMAGES``, ``BLIP_LAUNCH_NAMESPACES``, ... comma-separated; see :data:`POLICY_ENV`;
the Kubeflow steps get them from the ConfigMap ``blip-launch-policy``). Unset variables mean this module's
defaults. Anything else is refused, in one line, before anything is submitted; host-path and device mounts are
always refused.

One job per output: the Kubernetes job is named after the pipeline run, the stage and the output URI
(:func:`job_name`), and a job still running under that name (left behind by a killed or evicted launcher) is
cancelled and deleted before the new one is created, so a retried step never runs two jobs writing the same
output. SIGTERM (a deleted or evicted pipeline step) cancels the job before the launcher exits.

:func:`launch` waits for the job, streams its log lines (prefixed ``[stage/node]``), and turns a failed job into
a :class:`~blip_core.errors.UserError` carrying the job's error lines and last log lines. The stage's
``--output`` is required: stages resume from the newest checkpoint in their output, so launching the same
command again (a retried pipeline step, a preempted job) continues where the last attempt stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from blip_core.errors import UserError
from components import spec
from components.launch_follow import (  # noqa: F401 - re-exported
    _ELASTIC_NOISE,
    _ERROR_LINE,
    TERMINAL,
    LaunchResult,
    _cancel_on_sigterm,
    _collect,
    _failure_message,
    _Job,
    _job_cwd,
    _LogFollower,
    _stderr_sink,
    _stop_existing,
    _Terminated,
    package_root,
)
from components.launch_k8s import (  # noqa: F401 - re-exported
    CONTAINER_SECURITY,
    IMAGE,
    MLFLOW_SECRET,
    NAMESPACE,
    POD_SECURITY,
    POLICY_DEFAULTS,
    POLICY_ENV,
    QUEUE,
    S3_SECRET,
    SCHEDULERS,
    SECRETS,
    SERVICE_ACCOUNT,
    SETTINGS_CONFIG_MAP,
    UID,
    WRITABLE_DIRS,
    _rename_job,
    _secret_list,
    check_policy,
    job_name,
    launch_policy,
    secure_pods,
)

log = logging.getLogger(__name__)

# stage -> module run by torchrun -m: the stages whose spec (components.spec) a TorchX job can run
STAGES: dict[str, str] = {name: spec.MODULES[name] for name in ("pretrain", "finetune", "capfilt")}

# settings of this process passed on to the job's processes (credentials come from the secret instead)
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "BLIP_PARENT_RUN_ID", "BLIP_TRACKING",
               "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
               "AWS_REGION", "BLIP_S3_ADDRESSING", "HF_HUB_OFFLINE")



# --------------------------------------------------------------------------------------------------
# building the job
# --------------------------------------------------------------------------------------------------


def option_value(args: Sequence[str], name: str) -> str | None:
    """The (first) value of ``--name`` in an argument list (``--name v`` or ``--name=v``)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _absolute(value: str, base: Path) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def path_options(stage: str | None = None) -> frozenset[str]:
    """The options of ``stage`` (default: of every stage in :data:`STAGES`) whose values are paths or URIs: the
    inputs and outputs of its spec, and ``--config``."""
    names = [stage] if stage else list(STAGES)
    return frozenset().union(*(spec.get(n).path_options for n in names))


def absolute_paths(args: Sequence[str], base: Path | None = None, *, stage: str | None = None) -> list[str]:
    """``args`` with the values of the path options of ``stage`` (:func:`path_options`; ``--data a b``,
    ``--output=o``...) made absolute."""
    base = base or Path.cwd()
    paths = path_options(stage)
    out: list[str] = []
    in_paths = False
    for a in args:
        if a.startswith("-"):
            name, eq, value = a.partition("=")
            in_paths = name in paths and not eq
            out.append(f"{name}={_absolute(value, base)}" if eq and name in paths else a)
        elif in_paths:
            out.append(_absolute(a, base))
        else:
            out.append(a)
    return out


def mount_tokens(mounts: Iterable[str] | None) -> list[str]:
    """TorchX mount tokens from mount specs (``"type=volume,src=data,dst=/data"`` or already split tokens)."""
    tokens: list[str] = []
    for m in mounts or []:
        tokens += [t.strip() for t in str(m).split(",") if t.strip()]
    if tokens:
        from torchx.specs import parse_mounts

        try:
            parse_mounts(tokens)
        except (KeyError, ValueError) as e:
            raise UserError(f"bad mount {','.join(tokens)!r}: {e}") from None
    return tokens


def _job_name(stage: str, args: Sequence[str]) -> str:
    if stage == "pretrain":
        return option_value(args, "--stage-name") or "pretrain"
    if stage == "finetune":
        task = option_value(args, "--task")
        return f"finetune-{task}" if task else "finetune"
    return stage










def _local_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` with a relative ``sqlite:///`` path made absolute (the job runs elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        path, q, query = rest.partition("?")
        if path != ":memory:":
            uri = f"sqlite:///{(Path.cwd() / path).resolve()}{q}{query}"
    return uri


def build_app(stage: str, stage_args: Sequence[str], *, scheduler: str = "local_cwd", nodes: int = 1,
              procs_per_node: int | None = None, image: str = IMAGE, gpus_per_node: int = 0, cpu: int = 2,
              mem_mb: int = 4096, env: Mapping[str, str] | None = None, mounts: Iterable[str] | None = None,
              secrets: Sequence[str] | str | None = SECRETS, config_map: str | None = SETTINGS_CONFIG_MAP,
              node_selector: Mapping[str, str] | None = None, name: str | None = None,
              max_retries: int = 0):
    """The TorchX :class:`AppDef` of ``torchrun -m components.<stage> <stage_args>`` (see :func:`launch`)."""
    from torchx.components.dist import torchrun
    from torchx.specs.overlays import JOIN, set_overlay

    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if nodes < 1:
        raise UserError(f"nodes must be >= 1, got {nodes}")
    procs = procs_per_node if procs_per_node is not None else (gpus_per_node or 2)
    if procs < 1:
        raise UserError(f"procs_per_node must be >= 1, got {procs}")
    if gpus_per_node and procs > gpus_per_node:
        raise UserError(f"procs_per_node={procs} is more than gpus_per_node={gpus_per_node} (one process per GPU)")
    args = list(stage_args)
    output = option_value(args, "--output")
    if not output:
        raise UserError(f"{stage}: the stage arguments need --output (the job resumes from it when relaunched)")
    tokens = mount_tokens(mounts)
    if scheduler == "kubernetes" and "://" not in output and not tokens:
        raise UserError(f"{stage}: --output {output!r} is a local path; a kubernetes job needs an s3:// output "
                        "(or a mounted volume) to keep its checkpoints")

    job_env: dict[str, str] = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    if scheduler == "local_cwd":
        args = absolute_paths(args, stage=stage)
        job_env["MLFLOW_TRACKING_URI"] = _local_tracking_uri()
        # torchrun is started through `bash -c`: the interpreter's own bin dir first, so it is the venv's.
        job_env["PATH"] = os.path.dirname(sys.executable)
    job_env.setdefault("TQDM_MININTERVAL", "10")  # progress bars in a log file: one line per 10 s
    job_env.update({k: str(v) for k, v in (env or {}).items()})

    app = torchrun(*args, m=STAGES[stage], image=image, name=f"blip/{name or _job_name(stage, args)}",
                   cpu=cpu, gpu=gpus_per_node, memMB=mem_mb, j=f"{nodes}x{procs}", env=job_env,
                   mounts=tokens or None, max_retries=max_retries)
    if scheduler == "kubernetes":
        role = app.roles[0]
        env_from = [{"secretRef": {"name": x}} for x in _secret_list(secrets)] + (
            [{"configMapRef": {"name": config_map, "optional": True}}] if config_map else [])
        pod: dict[str, Any] = {"spec": {}}
        if env_from:
            # one container per pod, whose name varies by replica: match it by the image
            pod["spec"][JOIN("containers", on="image")] = [{"image": image, "envFrom": env_from}]
        if node_selector:
            pod["spec"]["nodeSelector"] = dict(node_selector)
        if gpus_per_node:
            pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        set_overlay(role, "kubernetes", "V1Pod", pod)
    return app


def scheduler_cfg(scheduler: str, *, queue: str = QUEUE, namespace: str = NAMESPACE,
                  service_account: str | None = SERVICE_ACCOUNT, log_dir: str | None = None,
                  validate_spec: bool = True, priority_class: str | None = None) -> dict[str, Any]:
    """The TorchX scheduler options for ``scheduler``."""
    if scheduler == "kubernetes":
        cfg: dict[str, Any] = {"queue": queue, "namespace": namespace, "validate_spec": validate_spec}
        if service_account:
            cfg["service_account"] = service_account
        if priority_class:
            cfg["priority_class"] = priority_class
        return cfg
    return {"log_dir": log_dir} if log_dir else {}


# --------------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------------




















def launch(stage: str, stage_args: Sequence[str], *, scheduler: str = "local_cwd", nodes: int = 1,
           procs_per_node: int | None = None, image: str = IMAGE, queue: str = QUEUE, namespace: str = NAMESPACE,
           service_account: str | None = SERVICE_ACCOUNT, gpus_per_node: int = 0, cpu: int = 2,
           mem_mb: int = 4096, env: Mapping[str, str] | None = None, mounts: Iterable[str] | None = None,
           secrets: Sequence[str] | str | None = SECRETS, config_map: str | None = SETTINGS_CONFIG_MAP,
           node_selector: Mapping[str, str] | None = None, priority_class: str | None = None,
           name: str | None = None, run_id: str | None = None, log_dir: str | None = None, dryrun: bool = False,
           stream: bool | Callable[[str], None] = True, timeout_s: float | None = None,
           poll_s: float = 2.0, tail: int = 30) -> LaunchResult:
    """Run ``stage`` (``pretrain``, ``finetune`` or ``capfilt``) as a TorchX torchrun job and wait for it.

    ``stage_args`` are the stage's own command-line arguments (those of ``blip <stage>``, e.g. from
    ``SPEC.argv``) and must include ``--output``. ``procs_per_node`` defaults to ``gpus_per_node`` (2 without
    GPUs). ``mounts`` are TorchX mount specs such as ``"type=volume,src=blip-data,dst=/data"``. ``stream`` prints
    the job's log lines (to stderr, or to a callable); ``tail`` lines are kept for the result and for the error
    of a failed job. ``run_id`` (the pipeline run) goes into the Kubernetes job's name with the stage and the
    output (:func:`job_name`); a job still running under that name is cancelled and deleted first.
    ``dryrun`` builds the scheduler request without submitting (for ``kubernetes`` no cluster is needed, and the
    request is returned as a plain dict in :attr:`LaunchResult.request`).

    Raises :class:`UserError` when a setting is outside the launch policy (kubernetes), or when the job fails,
    is cancelled, times out, or this process gets SIGTERM (the job is cancelled first).
    """
    from torchx.runner import get_runner

    secret_names = _secret_list(secrets)
    tokens = mount_tokens(mounts)
    if scheduler == "kubernetes":
        check_policy(launch_policy(), image=image, namespace=namespace, service_account=service_account,
                     secrets=secret_names, queue=queue, config_map=config_map, priority_class=priority_class,
                     mounts=tokens)
    app = build_app(stage, stage_args, scheduler=scheduler, nodes=nodes, procs_per_node=procs_per_node,
                    image=image, gpus_per_node=gpus_per_node, cpu=cpu, mem_mb=mem_mb, env=env, mounts=tokens,
                    secrets=secret_names, config_map=config_map, node_selector=node_selector, name=name)
    output = option_value(stage_args, "--output")
    if scheduler == "local_cwd" and not dryrun and log_dir is None:
        log_dir = tempfile.mkdtemp(prefix=f"blip-launch-{stage}-")
    cfg = scheduler_cfg(scheduler, queue=queue, namespace=namespace, service_account=service_account,
                        log_dir=log_dir, validate_spec=not dryrun, priority_class=priority_class)
    t0 = time.monotonic()
    with get_runner() as runner:
        job = _Job(runner, stage, scheduler, app, cfg, output, poll_s)
        job.request(namespace, job_name(run_id, _job_name(stage, stage_args), output or ""))
        if dryrun:
            request = job.info.request
            request = request.resource if scheduler == "kubernetes" else request
            return LaunchResult(stage, scheduler, job.handle, "DRYRUN", output, app.name, request=request,
                                scheduler_cfg=cfg)
        done = threading.Event()
        status, followers = job.run(done, _stderr_sink if stream is True else (stream or None), tail, timeout_s, t0)
        result, errors = job.result(status, followers, tail, t0, log_dir)
    if result.state != "SUCCEEDED":
        raise UserError(_failure_message(result, status, errors))
    return result


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise UserError(f"--env expects KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, stage_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="python -m components.launch", description="Launch a training stage as a TorchX torchrun job.",
        epilog="example: python -m components.launch pretrain --nodes 1 --procs 2 -- --data d/web --output o/pre")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--scheduler", choices=SCHEDULERS, default="local_cwd")
    p.add_argument("--nodes", type=int, default=1, help="nodes (replicas); default 1")
    p.add_argument("--procs", type=int, default=None,
                   help="processes per node (default: --gpus, or 2 without GPUs)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (kubernetes)")
    p.add_argument("--cpu", type=int, default=2, help="CPUs per node")
    p.add_argument("--mem-mb", type=int, default=4096, help="memory per node in MB")
    p.add_argument("--image", default=IMAGE)
    p.add_argument("--queue", default=QUEUE, help="Volcano queue (kubernetes)")
    p.add_argument("--namespace", default=NAMESPACE)
    p.add_argument("--service-account", default=SERVICE_ACCOUNT)
    p.add_argument("--secrets", default=",".join(SECRETS),
                   help="secrets given to the pods as environment, comma-separated ('' for none)")
    p.add_argument("--run-id", default=None, help="pipeline run id (part of the kubernetes job's name)")
    p.add_argument("--mount", action="append", default=[], metavar="SPEC",
                   help="e.g. type=volume,src=blip-data,dst=/data (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--log-dir", default=None, help="local_cwd: where the job's logs go")
    p.add_argument("--timeout", type=float, default=None, help="cancel the job after this many seconds")
    p.add_argument("--dryrun", action="store_true", help="print the scheduler request, submit nothing")
    args = p.parse_args(argv)
    if not stage_args:
        p.error("give the stage's arguments after '--'")
    res = launch(args.stage, stage_args, scheduler=args.scheduler, nodes=args.nodes, procs_per_node=args.procs,
                 image=args.image, queue=args.queue, namespace=args.namespace,
                 service_account=args.service_account or None, gpus_per_node=args.gpus, cpu=args.cpu,
                 mem_mb=args.mem_mb, env=_env_pairs(args.env), mounts=args.mount, secrets=args.secrets,
                 run_id=args.run_id, log_dir=args.log_dir, dryrun=args.dryrun, timeout_s=args.timeout)
    if args.dryrun:
        import yaml

        req = res.request if isinstance(res.request, dict) else str(res.request)
        print(yaml.safe_dump(req, sort_keys=False) if isinstance(req, dict) else req)
        return 0
    print(f"{args.stage}: {res.handle} {res.state} in {res.seconds:.0f} s; output {res.output}")
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    try:
        return main(argv)
    except UserError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from components.cli import run_as_process

    run_as_process(_cli)
