"""Compile-time settings of the Kubeflow pipeline: image, launcher, per-stage resources, cluster names.

The image and the GPU type can be overridden when compiling, by environment variable or by the options of
``blip pipeline compile``: ``BLIP_IMAGE`` (default ``blip-capfilt:0.1.0``, as built by infra/docker/Dockerfile),
``BLIP_GPU_TYPE`` (the accelerator resource, default ``nvidia.com/gpu``), ``BLIP_GPU_PRODUCT`` (optional node
label value of ``nvidia.com/gpu.product``, e.g. ``NVIDIA-A100-SXM4-80GB``) and ``BLIP_LAUNCHER``.
Run-time values (data, tracking, S3, TorchX sizes) are pipeline parameters instead (pipelines/pipeline.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_IMAGE = "blip-capfilt:0.1.0"
IMAGE = os.environ.get("BLIP_IMAGE") or DEFAULT_IMAGE
GPU_TYPE = os.environ.get("BLIP_GPU_TYPE") or "nvidia.com/gpu"
GPU_PRODUCT = os.environ.get("BLIP_GPU_PRODUCT") or ""
LAUNCHERS = ("inline", "torchx")
LAUNCHER = os.environ.get("BLIP_LAUNCHER") or "inline"

PIPELINE_NAME = "blip-capfilt"
S3_SECRET = "blip-s3-credentials"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
# the pipeline's MLflow account (the server requires authentication; infra/k8s/base/mlflow.yaml)
MLFLOW_SECRET = "blip-mlflow-credentials"
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
# the cluster operator's launch policy (components.launch.POLICY_ENV), read by the steps that launch TorchX jobs
LAUNCH_POLICY_CONFIG_MAP = "blip-launch-policy"
# the image's user: every step's container runs as it
RUN_AS_USER = 1000

# In-cluster endpoints of infra/k8s (ConfigMap blip-settings): the defaults of the pipeline parameters.
MLFLOW_URI = "http://mlflow.blip.svc.cluster.local:5000"
S3_ENDPOINT = "http://minio.blip.svc.cluster.local:9000"
OUTPUT_ROOT = "s3://blip/pipeline"
PARAMS_FILE = "/opt/blip/params.yaml"  # the project's params.yaml inside the image
EXPERIMENT = "blip-capfilt"
REGISTERED_MODEL = "blip-capfilt"

# TorchX job settings used when launcher=torchx (the `torchx` pipeline parameter; keys of components.launch).
# The image, namespace, service account, secrets and queue must also be allowed by the launch policy.
TORCHX = {"scheduler": "kubernetes", "nodes": 1, "gpus_per_node": 1, "cpu": 8, "mem_mb": 65536,
          "image": IMAGE, "queue": "blip", "namespace": "blip-jobs", "service_account": "blip-trainer",
          "secrets": [S3_SECRET, MLFLOW_SECRET]}

# Evaluate names the two pre-trained models so; register promotes the candidate.
BASELINE = "noisy"  # pre-trained on the noisy web pairs (+ human pairs)
CANDIDATE = "capfilt"  # re-pre-trained on the CapFilt-bootstrapped set


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one step's container (gpus 0 = no accelerator)."""

    cpu: str
    memory: str
    gpus: int = 0
    shm: str = ""  # size limit of the memory-backed /dev/shm ('' = no /dev/shm volume)


def resources(launcher: str = LAUNCHER, gpus: int = 1) -> dict[str, Resources]:
    """Resources per step. With ``launcher=torchx`` the training steps only launch and follow TorchX jobs, so
    they ask for no GPU; the jobs' pods get ``torchx.gpus_per_node`` each."""
    train = (Resources(cpu="8", memory="32Gi", gpus=gpus, shm="8Gi") if launcher == "inline"
             else Resources(cpu="1", memory="2Gi"))
    return {
        "start": Resources(cpu="500m", memory="1Gi"),
        "ingest": Resources(cpu="4", memory="8Gi"),
        "pretrain": train,
        "finetune": train,
        "capfilt": train,
        "evaluate": Resources(cpu="8", memory="32Gi", gpus=gpus, shm="8Gi"),
        "register": Resources(cpu="1", memory="4Gi"),
        "end": Resources(cpu="500m", memory="1Gi"),
    }
