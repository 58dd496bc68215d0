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
import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_core.errors import UserError

log = logging.getLogger(__name__)

IMAGE = "blip-capfilt:0.1.0"
NAMESPACE = "blip-jobs"
QUEUE = "blip"
SERVICE_ACCOUNT = "blip-trainer"
S3_SECRET = "blip-s3-credentials"
MLFLOW_SECRET = "blip-mlflow-credentials"
SECRETS = (S3_SECRET, MLFLOW_SECRET)
SETTINGS_CONFIG_MAP = "blip-settings"
SCHEDULERS = ("local_cwd", "kubernetes")
UID = 1000  # the image's user (infra/docker/Dockerfile)

# launch policy: setting -> environment variable holding the allowed values (comma- or space-separated)
POLICY_ENV: dict[str, str] = {
    "image": "BLIP_LAUNCH_IMAGES",
    "namespace": "BLIP_LAUNCH_NAMESPACES",
    "service_account": "BLIP_LAUNCH_SERVICE_ACCOUNTS",
    "secret": "BLIP_LAUNCH_SECRETS",
    "queue": "BLIP_LAUNCH_QUEUES",
    "config_map": "BLIP_LAUNCH_CONFIG_MAPS",
    "priority_class": "BLIP_LAUNCH_PRIORITY_CLASSES",
    "volume": "BLIP_LAUNCH_VOLUMES",
}
POLICY_DEFAULTS: dict[str, frozenset[str]] = {
    "image": frozenset({IMAGE}), "namespace": frozenset({NAMESPACE}), "service_account": frozenset({SERVICE_ACCOUNT}),
    "secret": frozenset(SECRETS), "queue": frozenset({QUEUE}), "config_map": frozenset({SETTINGS_CONFIG_MAP}),
    "priority_class": frozenset(), "volume": frozenset(),
}

# the security context of every training pod and container ("restricted" Pod Security level)
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                      "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
# writable directories on the read-only root filesystem: (volume name, mount path)
WRITABLE_DIRS = (("tmp", "/tmp"), ("home", "/home/blip"), ("workspace", "/workspace"))

# stage -> module run by torchrun -m
STAGES: dict[str, str] = {
    "pretrain": "components.pretrain",
    "finetune": "components.finetune",
    "capfilt": "components.capfilt",
}

# stage options whose values are local paths or URIs (made absolute for local_cwd)
PATH_OPTIONS = frozenset({"--data", "--output", "--init", "--vit-init", "--bert-init", "--config", "--captioner",
                          "--filter", "--web", "--human", "--vocab-data"})

# settings of this process passed on to the job's processes (credentials come from the secret instead)
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "BLIP_PARENT_RUN_ID", "BLIP_TRACKING",
               "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
               "AWS_REGION", "BLIP_S3_ADDRESSING", "HF_HUB_OFFLINE")

_EMPTY_RANK_LINE = re.compile(r"^\[\d+\]:\s*$")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_ERROR_LINE = re.compile(r"(\b[A-Z]\w*(Error|Exception)\b(:|$)|\berror:)")
_RANK_PREFIX = re.compile(r"^(\[\d+\]:)?(\[rank\d+\]:)?\s*")
_ELASTIC_NOISE = re.compile(r"torch\.distributed\.elastic|ChildFailedError|elastic/errors|error_file|"
                            r"To enable traceback|^\s*\[\d+\]:\s*$|^=+$")


@dataclass
class LaunchResult:
    """What :func:`launch` did: the job's handle and final state (or, for a dry run, the request)."""

    stage: str
    scheduler: str
    handle: str | None
    state: str
    output: str | None
    app_name: str
    seconds: float = 0.0
    log_dir: str | None = None
    ui_url: str | None = None
    last_lines: list[str] = field(default_factory=list)
    request: Any = None  # dry run: the scheduler's request (kubernetes: the Volcano Job as a dict)
    scheduler_cfg: dict[str, Any] = field(default_factory=dict)  # the TorchX scheduler options used

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


# --------------------------------------------------------------------------------------------------
# building the job
# --------------------------------------------------------------------------------------------------


def package_root() -> Path:
    """The directory holding the ``components`` package (repository root or site-packages)."""
    return Path(__file__).resolve().parent.parent


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


def absolute_paths(args: Sequence[str], base: Path | None = None) -> list[str]:
    """``args`` with the values of the path options (``--data a b``, ``--output=o``...) made absolute."""
    base = base or Path.cwd()
    out: list[str] = []
    in_paths = False
    for a in args:
        if a.startswith("-"):
            name, eq, value = a.partition("=")
            in_paths = name in PATH_OPTIONS and not eq
            out.append(f"{name}={_absolute(value, base)}" if eq and name in PATH_OPTIONS else a)
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


def job_name(run_id: str | None, stage: str, output: str) -> str:
    """The Kubernetes name of the job that runs ``stage`` of pipeline run ``run_id`` into ``output``.

    The same three values always give the same name, and a different value another one (a hash of all three), so
    a relaunch finds the job of an earlier attempt. A valid DNS-1123 label of at most 36 characters: TorchX
    names the pods ``<job>-<role>-<replica>-0``, which must fit in 63.
    """
    digest = hashlib.sha256("\0".join([run_id or "", stage, output]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")[:18].rstrip("-") or "stage"
    return f"blip-{slug}-{digest}"


def _secret_list(secrets: Sequence[str] | str | None) -> list[str]:
    if not secrets:
        return []
    items = re.split(r"[,\s]+", secrets) if isinstance(secrets, str) else [str(x) for x in secrets]
    return [x for x in items if x]


def launch_policy(environ: Mapping[str, str] | None = None) -> dict[str, frozenset[str]]:
    """The allowed values per setting: from the ``BLIP_LAUNCH_*`` variables of :data:`POLICY_ENV` where set
    (an empty value allows nothing), else :data:`POLICY_DEFAULTS`."""
    environ = os.environ if environ is None else environ
    policy = dict(POLICY_DEFAULTS)
    for setting, var in POLICY_ENV.items():
        if var in environ:
            policy[setting] = frozenset(x for x in re.split(r"[,\s]+", environ[var]) if x)
    return policy


def check_policy(policy: Mapping[str, frozenset[str]], *, image: str, namespace: str,
                 service_account: str | None, secrets: Sequence[str], queue: str, config_map: str | None,
                 priority_class: str | None, mounts: Sequence[str]) -> None:
    """Raise a one-line :class:`UserError` unless every setting of a Kubernetes job is in ``policy``."""
    asked: list[tuple[str, str]] = [("image", image), ("namespace", namespace),
                                    ("service_account", service_account or "default"), ("queue", queue)]
    asked += [("secret", x) for x in secrets]
    asked += [("config_map", config_map)] if config_map else []
    asked += [("priority_class", priority_class)] if priority_class else []
    for token in mounts:
        key, _, value = token.partition("=")
        if key == "type" and value != "volume":
            raise UserError(f"launch policy: {value} mounts are not allowed on kubernetes (only type=volume "
                            f"with a PersistentVolumeClaim listed in {POLICY_ENV['volume']})")
        if key == "src":
            asked.append(("volume", value))
    for setting, value in asked:
        if value not in policy[setting]:
            allowed = ", ".join(sorted(policy[setting])) or "none"
            raise UserError(f"launch policy: {setting} {value!r} is not allowed (allowed: {allowed}; the cluster "
                            f"operator sets {POLICY_ENV[setting]})")


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
        args = absolute_paths(args)
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


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def _job_cwd(scheduler: str):
    """local_cwd takes the job's working directory from ``os.getcwd()`` at submission."""
    if scheduler != "local_cwd":
        yield
        return
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(package_root())
        try:
            yield
        finally:
            os.chdir(old)


def _plain(obj: Any) -> Any:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


# --------------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------------


class _LogFollower:
    """Streams one replica's log lines to ``sink`` in a thread and keeps the last ones."""

    def __init__(self, runner, handle: str, role: str, replica: int, prefix: str,
                 sink: Callable[[str], None] | None, keep: int, done: threading.Event) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self.errors: deque[str] = deque(maxlen=keep)
        self._args = (runner, handle, role, replica)
        self._prefix, self._sink, self._done = prefix, sink, done
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"log-{prefix}")
        self.thread.start()

    def _run(self) -> None:
        runner, handle, role, replica = self._args
        seen = 0
        while True:  # the pod (or log file) may not exist yet; retry until the job has ended
            try:
                n = 0
                for line in runner.log_lines(handle, role, k=replica, should_tail=True):
                    n += 1
                    if n <= seen:  # a re-opened stream starts from the beginning
                        continue
                    seen = n
                    self._add(line.rstrip("\n"))
                return
            except Exception:  # noqa: BLE001 - not there yet (pending pod, no file): try again
                if self._done.wait(2.0):
                    return

    def _add(self, line: str) -> None:
        if not line.strip() or _EMPTY_RANK_LINE.match(line):
            return
        self.lines.append(line)
        if _ERROR_LINE.search(line) and not _ELASTIC_NOISE.search(line):
            self.errors.append(line)
        if self._sink is not None:
            self._sink(f"[{self._prefix}] {line}")


def _collect(runner, handle: str, role: str, replica: int, keep: int) -> list[str]:
    try:
        return [ln.rstrip("\n") for ln in deque(runner.log_lines(handle, role, k=replica), maxlen=keep)]
    except Exception:  # noqa: BLE001 - logs may be gone (pod deleted): report what was streamed
        return []


def _stderr_sink(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM while a job is followed (see :func:`_cancel_on_sigterm`)."""


@contextlib.contextmanager
def _cancel_on_sigterm():
    """Turn SIGTERM (Kubernetes deleting or evicting the pipeline step) into :class:`_Terminated`, so that the
    job is cancelled before this process ends. Signal handlers can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rename_job(resource: dict, name: str) -> dict:
    """The Volcano job ``resource`` (as a plain dict) with TorchX's random job id replaced by ``name``."""
    old = resource["metadata"]["name"]

    def swap(value):
        if isinstance(value, str):
            return value.replace(old, name)
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {swap(k): swap(v) for k, v in value.items()}
        return value

    return swap(_plain(resource))


def secure_pods(resource: dict) -> dict:
    """Give every pod of the Volcano job ``resource`` (a plain dict) the "restricted" security context
    (:data:`POD_SECURITY`, :data:`CONTAINER_SECURITY`), no service account token, and ``emptyDir`` volumes for
    the directories written on the read-only root filesystem (:data:`WRITABLE_DIRS`)."""
    for task in resource["spec"]["tasks"]:
        spec = task["template"]["spec"]
        spec["securityContext"] = {**spec.get("securityContext", {}), **POD_SECURITY}
        spec["automountServiceAccountToken"] = False  # the training processes never call the Kubernetes API
        volumes = spec.setdefault("volumes", [])
        volumes += [{"name": f"blip-{v}", "emptyDir": {}} for v, _ in WRITABLE_DIRS]
        for c in spec.get("initContainers", []) + spec["containers"]:
            c["securityContext"] = {**c.get("securityContext", {}), **CONTAINER_SECURITY}
            mounts = c.setdefault("volumeMounts", [])
            mounts += [{"name": f"blip-{v}", "mountPath": path} for v, path in WRITABLE_DIRS
                       if path not in {m["mountPath"] for m in mounts}]
    return resource


def _wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _stop_existing(runner, handle: str, stage: str, *, timeout_s: float = 300.0, poll_s: float = 2.0) -> None:
    """Cancel (if still running) and delete the job ``handle`` left by an earlier attempt, and wait until it is
    gone, so that its name is free and it no longer writes to the output."""
    status = runner.status(handle)
    if status is None:
        return
    if status.state.name not in TERMINAL:
        log.warning("%s: job %s of an earlier attempt is still %s; cancelling it", stage, handle, status.state.name)
        runner.cancel(handle)

        def stopped() -> bool:
            st = runner.status(handle)
            return st is None or st.state.name in TERMINAL

        if not _wait_until(stopped, timeout_s, poll_s):
            raise UserError(f"{stage}: the earlier job {handle} did not stop within {timeout_s:.0f} s of being "
                            "cancelled; delete it (kubectl delete vcjob) and retry")
    runner.delete(handle)
    if not _wait_until(lambda: runner.status(handle) is None, timeout_s, poll_s):
        raise UserError(f"{stage}: the earlier job {handle} was not deleted within {timeout_s:.0f} s; retry later")
    log.info("%s: removed the earlier job %s", stage, handle)


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

    ``stage_args`` are the stage's own command-line arguments (those of ``blip <stage>``) and must include
    ``--output``. ``procs_per_node`` defaults to ``gpus_per_node`` (2 without GPUs). ``mounts`` are TorchX mount
    specs such as ``"type=volume,src=blip-data,dst=/data"``. ``stream`` prints the job's log lines (to stderr,
    or to a callable); ``tail`` lines are kept for the result and for the error of a failed job.
    ``run_id`` (the pipeline run) goes into the Kubernetes job's name with the stage and the output
    (:func:`job_name`); a job still running under that name is cancelled and deleted first.
    ``dryrun`` builds the scheduler request without submitting (for ``kubernetes`` no cluster is needed, and the
    request is returned as a plain dict in :attr:`LaunchResult.request`).

    Raises :class:`UserError` when a setting is outside the launch policy (kubernetes), or when the job fails,
    is cancelled, times out, or this process gets SIGTERM (the job is cancelled first).
    """
    from torchx.runner import get_runner
    from torchx.specs.builders import make_app_handle

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
    role = app.roles[0]
    sink = _stderr_sink if stream is True else (stream or None)
    t0 = time.monotonic()
    with get_runner() as runner:
        handle: str | None = None
        try:
            with _job_cwd(scheduler):
                info = runner.dryrun(app, scheduler, cfg=cfg)
            if scheduler == "kubernetes":
                job = job_name(run_id, _job_name(stage, stage_args), output or "")
                info.request.resource = secure_pods(_rename_job(info.request.resource, job))
                handle = make_app_handle(scheduler, runner.name(), f"{namespace}:{job}")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - no cluster, no permission, bad spec: one clear line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{stage}: cannot submit the TorchX job to {scheduler}: {msg}") from None
        if dryrun:
            request = info.request
            request = request.resource if scheduler == "kubernetes" else request
            return LaunchResult(stage, scheduler, handle, "DRYRUN", output, app.name, request=request,
                                scheduler_cfg=cfg)
        done = threading.Event()
        status = None
        try:
            with _cancel_on_sigterm():
                try:
                    if handle is not None:
                        _stop_existing(runner, handle, stage, poll_s=poll_s)
                    with _job_cwd(scheduler):
                        handle = runner.schedule(info)
                except (UserError, _Terminated):
                    raise
                except Exception as e:  # noqa: BLE001 - no cluster, no permission, bad spec: one clear line
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise UserError(f"{stage}: cannot submit the TorchX job to {scheduler}: {msg}") from None
                log.info("%s: launched %s (%d x %s)", stage, handle, role.num_replicas, procs_per_node)
                followers = [_LogFollower(runner, handle, role.name, k, f"{app.name}/{k}", sink, tail, done)
                             for k in range(role.num_replicas)]
                misses = 0
                while True:
                    try:
                        status = runner.status(handle)
                        misses = 0
                    except Exception as e:  # noqa: BLE001 - a hiccup of the API server is not the job's failure
                        misses += 1
                        if misses >= 10:
                            raise UserError(f"{stage}: cannot get the status of TorchX job {handle}: {e}") from None
                        log.warning("%s: status of %s unavailable (%s); retrying", stage, handle, e)
                    if status is not None and status.state.name in TERMINAL:
                        break
                    if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                        runner.cancel(handle)
                        raise UserError(f"{stage}: TorchX job {handle} did not finish in {timeout_s:.0f} s; "
                                        "cancelled (relaunch to resume from its last checkpoint)")
                    time.sleep(poll_s)
        except BaseException as e:
            if handle is not None and (status is None or status.state.name not in TERMINAL):
                with contextlib.suppress(Exception):
                    runner.cancel(handle)
            done.set()
            if isinstance(e, _Terminated):
                raise UserError(f"{stage}: stopped by {e}; cancelled TorchX job {handle} "
                                "(a relaunch resumes from its last checkpoint)") from None
            raise
        done.set()  # followers still waiting for a log to appear give up; streaming ones finish their stream
        for f in followers:
            f.thread.join(timeout=10)
        state = status.state.name
        last: list[str] = []
        errors: list[str] = []
        for k, f in enumerate(followers):
            lines = list(f.lines) or _collect(runner, handle, role.name, k, tail)
            last += lines
            errors += [ln for ln in f.errors if ln not in errors]
            if not f.lines:
                errors += [ln for ln in lines if _ERROR_LINE.search(ln) and not _ELASTIC_NOISE.search(ln)]
        result = LaunchResult(stage, scheduler, handle, state, output, app.name, time.monotonic() - t0,
                              log_dir=log_dir, ui_url=status.ui_url, last_lines=last[-tail:], scheduler_cfg=cfg)
    if state != "SUCCEEDED":
        raise UserError(_failure_message(result, status, errors))
    return result


def _failure_message(res: LaunchResult, status, errors: list[str]) -> str:
    head = f"{res.stage}: TorchX job {res.handle} {res.state}"
    if status is not None and status.msg and status.msg != "<NONE>":
        head += f" ({status.msg})"
    if errors:
        head += ": " + _RANK_PREFIX.sub("", errors[0], count=1)
    where = f"; logs: {res.ui_url or res.log_dir}" if (res.ui_url or res.log_dir) else ""
    parts = [head + where]
    if errors:
        parts.append("error lines:\n  " + "\n  ".join(errors[-8:]))
    if res.last_lines:
        parts.append("last log lines:\n  " + "\n  ".join(res.last_lines))
    parts.append(f"a relaunch resumes from the newest checkpoint in {res.output}, if there is one")
    return "\n".join(parts)


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
    raise SystemExit(_cli())
