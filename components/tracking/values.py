"""Values made loggable: keys, params, tags and metrics within MLflow's limits, credentials redacted."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blip_core.redact import redact

# MLflow's limits (mlflow.utils.validation); copied so a change there cannot break logging here.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")
_BAD_IMAGE_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_\-./ ]")


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
