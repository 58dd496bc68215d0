"""Stage inputs and outputs as URIs: local paths and ``s3://bucket/key`` (boto3).

S3 access works with AWS and any S3-compatible store (MinIO, moto):

- endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset = AWS), region from
  ``AWS_REGION``/``AWS_DEFAULT_REGION`` (default ``us-east-1``), path-style addressing;
- credentials from the standard AWS chain (environment, ``~/.aws``, instance role). They are never
  logged or put in error messages: errors name the URI and the endpoint only;
- retries: botocore's ``standard`` mode (``BLIP_S3_MAX_ATTEMPTS`` attempts per request, default 5) inside
  an outer loop with exponential backoff and jitter (``BLIP_S3_RETRIES`` tries per operation, default 3)
  for transient failures (5xx, throttling, dropped or refused connections);
- uploads above 8 MiB are multipart.

Writes are atomic: a local file is written under a temporary name in the same directory and renamed; an
S3 object appears only when its PUT or its multipart upload completes. Errors a user can fix (no such
bucket, denied, unreachable endpoint, missing path) raise :class:`StorageError`, a one-line
:class:`~blip_core.errors.UserError`.

Small API: :func:`is_s3`, :func:`join`, :func:`read_bytes`, :func:`write_bytes`, :func:`read_json`,
:func:`write_json`, :func:`upload_file`, :func:`download_file`, :func:`exists`, :func:`delete`,
:func:`list_uris`, :func:`local_copy`, :func:`upload_dir`, :func:`download_dir`, :func:`dataset_sink`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig

from blip_core.data.webdataset_io import LocalSink, is_s3, join_uri
from blip_core.errors import UserError
from blip_core.redact import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}

__all__ = ["StorageError", "is_s3", "split_s3", "join", "endpoint_url", "s3_client", "read_bytes",
           "write_bytes", "read_text", "write_text", "read_json", "write_json", "upload_file",
           "download_file", "exists", "delete", "list_uris", "local_copy", "upload_dir", "download_dir",
           "dataset_sink", "S3Sink", "check_bucket", "s3_user_error", "TooLarge", "list_versions"]


class StorageError(UserError):
    """A storage problem the user can fix: reported as one line, never with credentials."""


def join(base: str, *names: str) -> str:
    """Join path components onto a local directory or an ``s3://`` prefix."""
    out = str(base)
    for n in names:
        out = join_uri(out, n)
    return out


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
    """The one-line :class:`StorageError` for an S3 client error raised by botocore, whether through boto3
    (this module) or through s3fs/aiobotocore (the dataset reader in ``blip_core.data``); None for other errors.

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
                raise FileNotFoundError(uri) from None
            if attempt == tries or not _is_transient(e):
                raise _user_error(e, uri) from None
            log.warning("%s %s failed (%s), retry %d/%d in %.1fs", what, uri, _error_code(e) or type(e).__name__,
                        attempt, tries - 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 20.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _transfer_config() -> TransferConfig:
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4, use_threads=True)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TooLarge(ValueError):
    """A file or object is larger than the ``max_bytes`` a caller accepts (nothing of it was read)."""


def read_bytes(uri: str, max_bytes: int = 0) -> bytes:
    """Whole content of a local file or S3 object; ``FileNotFoundError`` when absent.

    With ``max_bytes`` > 0 a larger file or object raises :class:`TooLarge` without its content being read, and
    a local path that is not a regular file (a device, a FIFO) raises ``OSError``.
    """
    if not is_s3(uri):
        if not max_bytes:
            return Path(uri).read_bytes()
        st = os.stat(uri)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{uri}: not a regular file")
        with open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(f"{uri}: larger than {max_bytes} bytes")
        return data
    bucket, key = split_s3(uri)

    def get() -> bytes:
        resp = s3_client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(resp["Body"]) as body:
            if max_bytes and int(resp.get("ContentLength") or 0) > max_bytes:
                raise TooLarge(f"{uri}: {resp['ContentLength']} bytes, larger than {max_bytes}")
            return body.read()

    return _with_retries("read", uri, get)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if not is_s3(uri):
        _atomic_local_write(Path(uri), data)
        return
    bucket, key = split_s3(uri)
    _with_retries("write", uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
    log.debug("wrote %s (%d bytes)", uri, len(data))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` (multipart above 8 MiB on S3; temp name + rename locally)."""
    if not is_s3(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    bucket, key = split_s3(uri)
    _with_retries("upload", uri, lambda: s3_client().upload_file(str(local), bucket, key,
                                                                  Config=_transfer_config()))
    log.debug("uploaded %s", uri)


def download_file(uri: str, local: str | Path) -> Path:
    """Copy ``uri`` to a local path atomically; returns the path."""
    dest = Path(local)
    if not is_s3(uri):
        upload_file(uri, str(dest))
        return dest
    bucket, key = split_s3(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        _with_retries("download", uri, lambda: s3_client().download_file(bucket, key, tmp,
                                                                          Config=_transfer_config()))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def copy_object(src: str, dst: str) -> None:
    """Copy one ``s3://`` object to another inside the object store (multipart above 8 MiB), no download."""
    src_bucket, src_key = split_s3(src)
    bucket, key = split_s3(dst)
    _with_retries("copy", src, lambda: s3_client().copy({"Bucket": src_bucket, "Key": src_key}, bucket, key,
                                                        Config=_transfer_config()))


def exists(uri: str) -> bool:
    """Does the file/object exist (a local directory counts)?"""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        _with_retries("stat", uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return True
    except FileNotFoundError:
        return False


def size(uri: str) -> int:
    """Size in bytes of a local file or S3 object; ``FileNotFoundError`` when absent."""
    if not is_s3(uri):
        return Path(uri).stat().st_size
    bucket, key = split_s3(uri)
    return int(_with_retries("stat", uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))["ContentLength"])


def delete(uri: str) -> None:
    """Remove a file/object if it exists."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    _with_retries("delete", uri, lambda: s3_client().delete_object(Bucket=bucket, Key=key))


def check_bucket(uri: str) -> None:
    """Raise :class:`StorageError` unless the bucket of ``uri`` exists and is reachable."""
    bucket, _ = split_s3(uri)
    try:
        _with_retries("check", f"s3://{bucket}", lambda: s3_client().head_bucket(Bucket=bucket))
    except FileNotFoundError:
        raise StorageError(f"s3://{bucket} (endpoint {endpoint_url() or 'AWS'}): no such bucket") from None


def list_uris(prefix: str, suffix: str | tuple[str, ...] = "", recursive: bool = True) -> list[str]:
    """Sorted URIs of files under the directory ``prefix`` whose names end with ``suffix`` (or one of them)."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            return []
        it = root.rglob("*") if recursive else root.iterdir()
        return sorted(str(p) for p in it if p.is_file() and p.name.endswith(suffix))
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""

    def page_through() -> list[str]:
        out = []
        kwargs = {"Bucket": bucket, "Prefix": key} | ({} if recursive else {"Delimiter": "/"})
        for page in s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return out

    try:
        return sorted(_with_retries("list", prefix, page_through))
    except FileNotFoundError:
        return []


def list_versions(prefix: str, suffix: str | tuple[str, ...] = "") -> list[tuple[str, int, str]]:
    """``(uri, size, version)`` of the files under ``prefix`` (or of the single file ``prefix``), sorted.

    ``version`` changes whenever a file's content may have: the ETag of an S3 object, the modification time
    (ns) of a local file. Used to tell whether a source changed without reading it.
    """
    if not is_s3(prefix):
        root = Path(prefix)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        out = []
        for p in files:
            if p.name.endswith(suffix) or p == root:
                st = p.stat()
                out.append((str(p), st.st_size, str(st.st_mtime_ns)))
        return out
    bucket, key = split_s3(prefix)
    try:
        head = _with_retries("stat", prefix, lambda: s3_client().head_object(Bucket=bucket, Key=key)) if key else None
    except FileNotFoundError:
        head = None
    if head is not None and not key.endswith("/"):
        return [(prefix, int(head["ContentLength"]), str(head.get("ETag", "")))]
    key = key.rstrip("/") + "/" if key else ""

    def page_through() -> list[tuple[str, int, str]]:
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [(f"s3://{bucket}/{o['Key']}", int(o["Size"]), str(o.get("ETag", "")))
                    for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return out

    try:
        return sorted(_with_retries("list", prefix, page_through))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path with the content of ``uri``: the file itself when local, else a temporary download."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="blip-dl-") as d:
        yield download_file(uri, Path(d) / Path(split_s3(uri)[1]).name)


def upload_dir(local_dir: str | Path, uri_dir: str) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri_dir`` keeping relative paths; returns the URIs."""
    root = Path(local_dir)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            dest = join(uri_dir, *p.relative_to(root).parts)
            upload_file(p, dest)
            out.append(dest)
    return out


def download_dir(uri_dir: str, local_dir: str | Path) -> list[Path]:
    """Copy every file under ``uri_dir`` into ``local_dir`` keeping relative paths; returns the paths.

    An object key that would land outside ``local_dir`` (``..`` segments, a leading ``/``) raises
    :class:`StorageError` before anything is written; zero-byte "folder" markers (keys ending in ``/``) are
    skipped.
    """
    base = uri_dir.rstrip("/") + "/" if is_s3(uri_dir) else str(Path(uri_dir)) + os.sep
    root = Path(local_dir).resolve()
    plan: list[tuple[str, Path]] = []
    for uri in list_uris(uri_dir):
        rel = uri[len(base):]
        if rel.endswith("/"):
            continue
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root) or dest == root:
            raise StorageError(f"{uri}: the object key leads outside the download directory {local_dir}; "
                               "refusing to download it")
        plan.append((uri, dest))
    return [download_file(uri, dest) for uri, dest in plan]


# --------------------------------------------------------------------------------------------------
# Dataset directories
# --------------------------------------------------------------------------------------------------


class S3Sink:
    """A dataset directory under an ``s3://`` prefix (see :class:`blip_core.data.webdataset_io.Sink`)."""

    def __init__(self, prefix: str) -> None:
        split_s3(prefix)
        self.prefix = prefix.rstrip("/")

    def put_file(self, local: Path, name: str) -> None:
        upload_file(local, join(self.prefix, name))

    def put_bytes(self, name: str, data: bytes) -> None:
        write_bytes(join(self.prefix, name), data)

    def delete(self, name: str) -> None:
        delete(join(self.prefix, name))

    def list_names(self) -> list[str]:
        return [u.rsplit("/", 1)[1] for u in list_uris(self.prefix, recursive=False)]


def dataset_sink(uri: str) -> LocalSink | S3Sink:
    """The sink for a dataset directory at ``uri`` (local or ``s3://``); checks an S3 bucket exists."""
    if is_s3(uri):
        check_bucket(uri)
        return S3Sink(uri)
    return LocalSink(uri)
