"""The one S3 stack of the project (boto3): client, retries, error mapping and the object operations.

Everything that reaches S3 (stage inputs and outputs through :mod:`components.storage`, the dataset reader of
``blip_core.data`` through the opener storage installs) calls this module:

- endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset = AWS), region from
  ``AWS_REGION``/``AWS_DEFAULT_REGION`` (default ``us-east-1``), path-style addressing;
- credentials from the standard AWS chain (environment, ``~/.aws``, instance role). They are never
  logged or put in error messages: errors name the URI (redacted) and the endpoint only;
- retries: botocore's ``standard`` mode (``BLIP_S3_MAX_ATTEMPTS`` attempts per request, default 5) inside
  an outer loop with exponential backoff and jitter (``BLIP_S3_RETRIES`` tries per operation, default 3)
  for transient failures (5xx, throttling, dropped or refused connections); a streamed read that breaks off
  resumes from where it stopped with a ranged request;
- uploads above 8 MiB are multipart.

Errors a user can fix (no such bucket, denied, unreachable endpoint) raise :class:`StorageError`, a one-line
:class:`~blip_core.errors.UserError`; a missing object raises ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig

from blip_core.errors import UserError
from blip_core.io import is_s3
from blip_core.redact import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class StorageError(UserError):
    """A storage problem the user can fix: reported as one line, never with credentials."""


class TooLarge(ValueError):
    """A file or object is larger than the ``max_bytes`` a caller accepts (nothing of it was read)."""


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if len(bucket) < 3:
        raise StorageError(f"{uri}: bucket name must have at least 3 characters")
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (None = AWS)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default
@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str, attempts: int, pid: int, cred_fingerprint: int) -> Any:
    cfg = botocore.config.Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
        connect_timeout=5,
        read_timeout=60,
        signature_version="s3v4",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def s3_client() -> Any:
    """A boto3 S3 client for the current environment (cached per endpoint, process and credentials)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    creds = hash((os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                  os.environ.get("AWS_PROFILE")))
    return _client(endpoint_url(), region, _env_int("BLIP_S3_MAX_ATTEMPTS", 5), os.getpid(), creds)


def _error_code(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code if code and not code.isdigit() else (status or code)
    return ""


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, botocore.exceptions.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(e) in _TRANSIENT_CODES or int(status or 0) >= 500
    if isinstance(e, S3UploadFailedError | S3TransferFailedError):
        return any(c in str(e) for c in _TRANSIENT_CODES)
    return isinstance(e, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionClosedError
                      | botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectTimeoutError)


def _user_error(e: BaseException, uri: str | None) -> StorageError:
    endpoint = redact(endpoint_url() or "AWS")
    where = f"{redact(uri)} (endpoint {endpoint})" if uri else f"S3 endpoint {endpoint}"
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return StorageError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(e, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        return StorageError(f"{where}: cannot reach the S3 endpoint")
    code = _error_code(e) or type(e).__name__
    if code == "NoSuchBucket":
        return StorageError(f"{where}: no such bucket")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return StorageError(f"{where}: access denied ({code}); check the credentials")
    return StorageError(f"{where}: S3 request failed ({code})")


def s3_user_error(e: BaseException, uri: str | None = None) -> StorageError | None:
    """The one-line :class:`StorageError` for an S3 client error raised by botocore that reached a caller
    unmapped (a request made outside :func:`_with_retries`); None for other errors.

    Credentials never appear: the message names the URI (redacted) and the endpoint only.
    """
    if not isinstance(e, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
        return None
    if uri is None and isinstance(e, botocore.exceptions.EndpointConnectionError
                                  | botocore.exceptions.ConnectTimeoutError):
        url = str(getattr(e, "kwargs", {}).get("endpoint_url") or "")  # the request: endpoint/bucket/key
        endpoint = (endpoint_url() or "").rstrip("/")
        if endpoint and url.startswith(endpoint + "/"):
            uri = "s3://" + url[len(endpoint) + 1:].split("?", 1)[0]
    return _user_error(e, uri)


def _with_retries(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with exponential backoff on transient S3 errors; map final errors to StorageError."""
    tries = _env_int("BLIP_S3_RETRIES", 3)
    delay = 0.5
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                S3UploadFailedError, S3TransferFailedError) as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                raise FileNotFoundError(redact(uri)) from None
            if attempt == tries or not _is_transient(e):
                raise _user_error(e, uri) from None
            log.info("%s %s failed (%s), retry %d/%d in %.1fs", what, redact(uri), _error_code(e) or type(e).__name__,
                     attempt, tries - 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 20.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _transfer_config() -> TransferConfig:
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4, use_threads=True)



# --------------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------------


def get_bytes(uri: str, max_bytes: int = 0) -> bytes:
    """Whole content of an object; ``FileNotFoundError`` when absent; :class:`TooLarge` above ``max_bytes`` > 0
    (nothing of it read)."""
    bucket, key = split_s3(uri)

    def get() -> bytes:
        resp = s3_client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(resp["Body"]) as body:
            if max_bytes and int(resp.get("ContentLength") or 0) > max_bytes:
                raise TooLarge(f"{redact(uri)}: {resp['ContentLength']} bytes, larger than {max_bytes}")
            return body.read()

    return _with_retries("read", uri, get)


def put_bytes(uri: str, data: bytes) -> None:
    """One PUT: the object appears whole or not at all."""
    bucket, key = split_s3(uri)
    _with_retries("write", uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
    log.debug("wrote %s (%d bytes)", redact(uri), len(data))


def upload(local: str | Path, uri: str) -> None:
    """Upload a local file (multipart above 8 MiB: the object appears when the upload completes)."""
    bucket, key = split_s3(uri)
    _with_retries("upload", uri, lambda: s3_client().upload_file(str(local), bucket, key, Config=_transfer_config()))
    log.debug("uploaded %s", redact(uri))


def download(uri: str, local: str | Path) -> None:
    """Download an object into the local file ``local`` (overwritten)."""
    bucket, key = split_s3(uri)
    _with_retries("download", uri, lambda: s3_client().download_file(bucket, key, str(local),
                                                                      Config=_transfer_config()))


def copy(src: str, dst: str) -> None:
    """Copy one object to another inside the object store (multipart above 8 MiB), no download."""
    src_bucket, src_key = split_s3(src)
    bucket, key = split_s3(dst)
    _with_retries("copy", src, lambda: s3_client().copy({"Bucket": src_bucket, "Key": src_key}, bucket, key,
                                                        Config=_transfer_config()))


def head(uri: str) -> dict:
    """The object's metadata (``ContentLength``, ``ETag``); ``FileNotFoundError`` when absent."""
    bucket, key = split_s3(uri)
    return _with_retries("stat", uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))


def delete(uri: str) -> None:
    """Remove an object (no error when absent)."""
    bucket, key = split_s3(uri)
    _with_retries("delete", uri, lambda: s3_client().delete_object(Bucket=bucket, Key=key))


def check_bucket(uri: str) -> None:
    """Raise :class:`StorageError` unless the bucket of ``uri`` exists and is reachable."""
    bucket, _ = split_s3(uri)
    try:
        _with_retries("check", f"s3://{bucket}", lambda: s3_client().head_bucket(Bucket=bucket))
    except FileNotFoundError:
        raise StorageError(f"s3://{bucket} (endpoint {redact(endpoint_url() or 'AWS')}): no such bucket") from None


def list_objects(prefix: str, suffix: str | tuple[str, ...] = "",
                 recursive: bool = True) -> list[tuple[str, int, str]]:
    """``(uri, size, ETag)`` of the objects under the "directory" ``prefix`` whose keys end with ``suffix``,
    sorted; empty when there are none (or no such bucket)."""
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""

    def page_through() -> list[tuple[str, int, str]]:
        out = []
        kwargs = {"Bucket": bucket, "Prefix": key} | ({} if recursive else {"Delimiter": "/"})
        for page in s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
            out += [(f"s3://{bucket}/{o['Key']}", int(o["Size"]), str(o.get("ETag", "")))
                    for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return out

    try:
        return sorted(_with_retries("list", prefix, page_through))
    except FileNotFoundError:
        return []


_STREAM_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.ReadTimeoutError,
                  botocore.exceptions.ConnectionClosedError, botocore.exceptions.IncompleteReadError,
                  ConnectionError, TimeoutError)


class _ObjectStream(io.RawIOBase):
    """An object read front to back; a read that breaks off re-requests the rest (``Range``) and carries on."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.size: int | None = None
        self.body: Any = None
        self._request()

    def _request(self) -> None:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = _with_retries("read", self.uri, lambda: s3_client().get_object(Bucket=self.bucket, Key=self.key,
                                                                              **extra))
        if self.size is None:
            self.size = int(resp.get("ContentLength") or 0)
        self.body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        tries = _env_int("BLIP_S3_RETRIES", 3)
        for attempt in range(1, tries + 1):
            try:
                data = self.body.read(len(buffer))
                break
            except _STREAM_ERRORS as e:
                if attempt == tries:
                    raise StorageError(f"{redact(self.uri)}: the read broke off at byte {self.pos} "
                                       f"({type(e).__name__})") from None
                log.warning("reading %s broke off at byte %d (%s), resuming", redact(self.uri), self.pos,
                            type(e).__name__)
                with contextlib.suppress(Exception):
                    self.body.close()
                self._request()
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
            self.body = None
        super().close()


def open_read(uri: str) -> io.BufferedReader:
    """A binary file object streaming the object (``FileNotFoundError`` when absent)."""
    return io.BufferedReader(_ObjectStream(uri), buffer_size=1 << 20)
