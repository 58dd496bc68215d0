"""The MLflow model registry: versions, their tags and aliases."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from components.tracking.store import _activate, _client


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


def get_version_tags(name: str, version: int | str, uri: str | None = None) -> dict[str, str]:
    """The tags of version ``version`` of registered model ``name``."""
    return dict(_client(uri).get_model_version(name, str(version)).tags or {})


def set_version_tag(name: str, version: int | str, key: str, value: Any, uri: str | None = None) -> None:
    """Set tag ``key`` of version ``version`` of registered model ``name`` to ``str(value)``."""
    _client(uri).set_model_version_tag(name, str(version), key, str(value))
