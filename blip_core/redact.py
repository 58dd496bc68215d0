"""Credentials out of URIs: the one function applied to everything that is logged, written or printed.

A URI such as ``https://user:token@host/x?X-Amz-Signature=...`` can carry a secret in two places: the
userinfo before ``@`` and the query string (pre-signed S3/GCS URLs, SAS tokens, ``?token=``). :func:`redact`
replaces those with ``***`` wherever a URI occurs: in a plain string (an error message, a log line), or in
any string inside nested dicts, lists and tuples (a config written as MLflow params, ``config.json`` or
``manifest.json``). Everything else is returned unchanged, so redacting twice is the same as once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# a scheme followed by "://" and everything up to whitespace or a quote/bracket that ends it in text
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# query parameter names (lower case) whose values are secrets
_SECRET_NAMES = {"sig", "key", "pwd", "pass", "auth", "authorization", "code"}
_SECRET_SUFFIXES = ("token", "secret", "password", "passwd", "signature", "credential", "credentials",
                    "apikey", "api_key", "api-key", "accesskeyid", "access_key", "secret_key")


def _secret_param(name: str) -> bool:
    n = name.strip().lower()
    return n in _SECRET_NAMES or n.endswith(_SECRET_SUFFIXES)


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}={MASK}" if eq and _secret_param(name) else item)
    return "&".join(parts)


def redact_uri(uri: str) -> str:
    """One URI with its userinfo password (or token-as-username) and secret query values replaced by ``***``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1:
            cut = min(cut, i)
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        # user:password -> user:***; a lone name before @ is often a token (https://TOKEN@host): mask it
        authority = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    path, q, query = tail.partition("?")
    if q:
        query, hash_, fragment = query.partition("#")
        tail = f"{path}?{_redact_query(query)}{hash_}{fragment}"
    return f"{scheme}://{authority}{tail}"


def redact(value: Any) -> Any:
    """``value`` with every URI's credentials masked: strings (URIs anywhere in the text) and, recursively,
    the strings inside dicts, lists and tuples; other values unchanged."""
    if isinstance(value, str):
        return _URI.sub(lambda m: redact_uri(m.group(0)), value) if "://" in value else value
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    return value


def _redact_arg(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value  # keeps %d / %f formatting
    text = str(value)
    return redact(text) if "://" in text else value


def install_log_redaction() -> None:
    """Redact every log record of this process as it is created (message and arguments), whatever logger and
    handler it goes to. Called by the command-line entry points; installing twice is a no-op."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
