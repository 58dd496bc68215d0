"""Files by URI: the opener blip_core reads and writes through, and the one atomic-write helper.

**Openers.** blip_core never talks to an object store itself: whatever reads or writes a URI (the dataset
reader, manifests, answer lists) goes through an :class:`Opener`, passed in or else the process's default
(:func:`default_opener`). The default, :class:`LocalOpener`, handles local paths and refuses any other
``scheme://`` with a one-line :class:`~blip_core.errors.UserError`; for ``s3://`` the message names the
workflow extra, whose ``components.storage`` installs an opener for S3 (:func:`set_default_opener`) when it
is imported. An opener is a small object with no open connections, so it can be handed to DataLoader workers.

**Atomic writes.** :func:`atomic_write` yields a file under a temporary name in the destination's directory;
when the block succeeds the file is flushed, fsynced and renamed over the destination, and the directory entry
is fsynced: a reader (or a crash) sees the old content or the new, never a part. :func:`atomic_path` is the
same for writers that take a file name (``torch.save``, safetensors), and :func:`atomic_directory` for a whole
directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from blip_core.errors import UserError

WORKFLOW_EXTRA = "pip install 'blip-capfilt[workflow]'"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme_of(uri: str) -> str:
    """``"s3"`` for ``s3://...``; ``""`` for a local path."""
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m else ""


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def fsync_path(path: str | Path) -> None:
    """Flush a file's content, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there is fsynced and
    renamed to ``path`` (and the directory fsynced). On failure the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that publishes the file only when the block succeeds (see the module docstring).

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` default UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8"}
        with open(tmp, mode, **kwargs) as f:
            yield f


@contextlib.contextmanager
def atomic_directory(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``dst`` when the block succeeds.

    The files written there and the directory are fsynced before the rename; an existing ``dst`` is moved aside
    first (``.<name>.old-<tag>``) and deleted only after the new directory is in place. On failure the
    temporary directory is removed and ``dst`` is left as it was.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for p in sorted(tmp.rglob("*"), reverse=True):  # files, then their directories, deepest first
            fsync_path(p)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        if not dst.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{dst} exists and is not a directory")
        old = dst.parent / f".{dst.name}.old-{tag}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Openers
# --------------------------------------------------------------------------------------------------


class Opener:
    """How blip_core reaches a URI. Subclasses override what they support; every method takes a full URI."""

    def open_read(self, uri: str) -> IO[bytes]:
        """A binary file object reading ``uri`` from its start; ``FileNotFoundError`` when absent."""
        raise NotImplementedError

    def open_write(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A context manager yielding a binary file; ``uri`` shows the new content only when the block
        succeeds, and whole (atomic)."""
        raise NotImplementedError

    def list(self, uri: str) -> dict[str, int]:
        """Every file under the directory (or prefix) ``uri``, recursively: path relative to it -> size in
        bytes. Empty when there is nothing there."""
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        """Whether the file (or object) ``uri`` exists."""
        raise NotImplementedError

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of ``uri``."""
        with self.open_read(uri) as f:
            return f.read()


def _unsupported(uri: str) -> UserError:
    scheme = scheme_of(uri)
    if scheme == "s3":
        return UserError(f"{scheme}:// URIs ({uri.split('?', 1)[0]}) need the S3 opener of components.storage "
                         f"(boto3), part of the workflow extra: {WORKFLOW_EXTRA}")
    return UserError(f"{scheme}:// URIs are not supported (local paths and s3:// only)")


class LocalOpener(Opener):
    """Local paths; any ``scheme://`` URI is a one-line :class:`UserError` (``s3://`` names the extra)."""

    def _path(self, uri: str) -> Path:
        if scheme_of(uri):
            raise _unsupported(str(uri))
        return Path(uri)

    def open_read(self, uri: str) -> IO[bytes]:
        return open(self._path(uri), "rb")  # noqa: SIM115

    def open_write(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return atomic_write(self._path(uri), "wb")

    def list(self, uri: str) -> dict[str, int]:
        root = self._path(uri)
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    def exists(self, uri: str) -> bool:
        return self._path(uri).exists()


_default: Opener = LocalOpener()


def default_opener() -> Opener:
    """The opener used where none is passed: local files only, until a caller installs another."""
    return _default


def set_default_opener(opener: Opener) -> Opener:
    """Install ``opener`` as the process's default; returns the previous one."""
    global _default
    previous, _default = _default, opener
    return previous


def opener_or_default(opener: Opener | None) -> Opener:
    """``opener``, or the default when None."""
    return opener if opener is not None else _default


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def join_uri(base: str, name: str) -> str:
    """``base/name`` for local paths and ``scheme://`` prefixes (``s3://bucket/prefix``) alike."""
    base = str(base)
    if scheme_of(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(base) / name)
