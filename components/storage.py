"""Stage inputs and outputs as URIs: local paths and ``s3://bucket/key``, and the opener blip_core reads through.

S3 access works with AWS and any S3-compatible store (MinIO, moto) and goes through :mod:`components.s3`, the
project's one S3 stack (boto3: endpoint and credentials from the environment, never logged; retries with
backoff; multipart uploads; one-line :class:`StorageError` for what a user can fix).

Writes are atomic: a local file is written under a temporary name in the same directory, fsynced and renamed
(:func:`blip_core.io.atomic_write`); an S3 object appears only when its PUT or its multipart upload completes.

Importing this module installs :class:`S3Opener` as blip_core's default opener
(:func:`blip_core.io.set_default_opener`): the dataset reader in ``blip_core.data`` then streams ``s3://``
shards through :mod:`components.s3` like every other S3 access. Call :func:`install_opener` again after
replacing the default.

Small API: :func:`is_s3`, :func:`join`, :func:`read_bytes`, :func:`write_bytes`, :func:`read_json`,
:func:`write_json`, :func:`upload_file`, :func:`download_file`, :func:`exists`, :func:`delete`,
:func:`list_uris`, :func:`local_copy`, :func:`upload_dir`, :func:`download_dir`, :func:`dataset_sink`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from blip_core.data.writer import LocalSink
from blip_core.io import LocalOpener, atomic_path, atomic_write, is_s3, join_uri, set_default_opener
from components import s3
from components.s3 import (
    MULTIPART_THRESHOLD,
    StorageError,
    TooLarge,
    check_bucket,
    endpoint_url,
    s3_client,
    s3_user_error,
    split_s3,
)

log = logging.getLogger(__name__)

__all__ = ["StorageError", "is_s3", "split_s3", "join", "endpoint_url", "s3_client", "read_bytes",
           "write_bytes", "read_text", "write_text", "read_json", "write_json", "upload_file",
           "download_file", "exists", "delete", "list_uris", "local_copy", "upload_dir", "download_dir",
           "dataset_sink", "S3Sink", "check_bucket", "s3_user_error", "TooLarge", "list_versions", "S3Opener",
           "install_opener", "MULTIPART_THRESHOLD"]


def join(base: str, *names: str) -> str:
    """Join path components onto a local directory or an ``s3://`` prefix."""
    out = str(base)
    for n in names:
        out = join_uri(out, n)
    return out


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def read_bytes(uri: str, max_bytes: int = 0) -> bytes:
    """Whole content of a local file or S3 object; ``FileNotFoundError`` when absent.

    With ``max_bytes`` > 0 a larger file or object raises :class:`TooLarge` without its content being read, and
    a local path that is not a regular file (a device, a FIFO) raises ``OSError``.
    """
    if is_s3(uri):
        return s3.get_bytes(uri, max_bytes)
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


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if is_s3(uri):
        s3.put_bytes(uri, data)
        return
    with atomic_write(uri, "wb") as f:
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` (multipart above 8 MiB on S3; temporary name + rename locally)."""
    if is_s3(uri):
        s3.upload(local, uri)
        return
    with atomic_path(uri) as tmp:
        shutil.copyfile(local, tmp)


def download_file(uri: str, local: str | Path) -> Path:
    """Copy ``uri`` to a local path atomically; returns the path."""
    dest = Path(local)
    if not is_s3(uri):
        upload_file(uri, str(dest))
        return dest
    with atomic_path(dest) as tmp:
        s3.download(uri, tmp)
    return dest


def copy_object(src: str, dst: str) -> None:
    """Copy one ``s3://`` object to another inside the object store (multipart above 8 MiB), no download."""
    s3.copy(src, dst)


def exists(uri: str) -> bool:
    """Does the file/object exist (a local directory counts)?"""
    if not is_s3(uri):
        return Path(uri).exists()
    try:
        s3.head(uri)
        return True
    except FileNotFoundError:
        return False


def size(uri: str) -> int:
    """Size in bytes of a local file or S3 object; ``FileNotFoundError`` when absent."""
    if not is_s3(uri):
        return Path(uri).stat().st_size
    return int(s3.head(uri)["ContentLength"])


def delete(uri: str) -> None:
    """Remove a file/object if it exists."""
    if is_s3(uri):
        s3.delete(uri)
    else:
        Path(uri).unlink(missing_ok=True)


def list_uris(prefix: str, suffix: str | tuple[str, ...] = "", recursive: bool = True) -> list[str]:
    """Sorted URIs of files under the directory ``prefix`` whose names end with ``suffix`` (or one of them)."""
    if is_s3(prefix):
        return [uri for uri, _, _ in s3.list_objects(prefix, suffix, recursive)]
    root = Path(prefix)
    if not root.is_dir():
        return []
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(str(p) for p in it if p.is_file() and p.name.endswith(suffix))


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
    _, key = split_s3(prefix)
    try:
        meta = s3.head(prefix) if key else None
    except FileNotFoundError:
        meta = None
    if meta is not None and not key.endswith("/"):
        return [(prefix, int(meta["ContentLength"]), str(meta.get("ETag", "")))]
    return s3.list_objects(prefix, suffix)


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
# Dataset directories, and the opener of blip_core
# --------------------------------------------------------------------------------------------------


class S3Sink:
    """A dataset directory under an ``s3://`` prefix (see :class:`blip_core.data.writer.Sink`)."""

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


@contextlib.contextmanager
def _upload_on_success(uri: str) -> Iterator[IO[bytes]]:
    """A temporary local file uploaded to ``uri`` when the block succeeds (the object appears whole)."""
    with tempfile.TemporaryDirectory(prefix="blip-up-") as d:
        path = Path(d) / "object"
        with open(path, "wb") as f:
            yield f
        upload_file(path, uri)


class S3Opener(LocalOpener):
    """blip_core's opener for local paths and ``s3://`` (through :mod:`components.s3`)."""

    def open_read(self, uri: str) -> IO[bytes]:
        return s3.open_read(uri) if is_s3(uri) else super().open_read(uri)

    def open_write(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return _upload_on_success(uri) if is_s3(uri) else super().open_write(uri)

    def list(self, uri: str) -> dict[str, int]:
        if not is_s3(uri):
            return super().list(uri)
        base = uri.rstrip("/") + "/"
        return {u[len(base):]: n for u, n, _ in s3.list_objects(uri)}

    def exists(self, uri: str) -> bool:
        return exists(uri) if is_s3(uri) else super().exists(uri)


def install_opener() -> None:
    """Make :class:`S3Opener` blip_core's default opener (done when this module is imported)."""
    set_default_opener(S3Opener())


install_opener()
