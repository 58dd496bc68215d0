"""Kubernetes side of :mod:`components.launch`: the defaults of a job, the operator's launch policy, the job's
name and the "restricted" Pod Security settings of its pods (see the module documentation of
:mod:`components.launch`)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from blip_core.errors import UserError

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


def _plain(obj: Any) -> Any:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


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
