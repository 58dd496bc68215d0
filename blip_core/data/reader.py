"""Reading dataset directories: WebDataset tar streams, shards by URI, checking shards against a manifest.

Every URI is opened through an :class:`~blip_core.io.Opener` (passed in, else the default: local files, or
``s3://`` once ``components.storage`` has installed its opener). The contract is described in
:mod:`blip_core.data.webdataset_io`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from blip_core.data.manifest import Manifest, ShardInfo
from blip_core.data.tarstream import TarStreamWriter, iter_members
from blip_core.io import Opener, join_uri, opener_or_default


class ShardReadError(Exception):
    """A shard could not be read to its end (truncated or not a tar file)."""



def open_uri(uri: str, opener: Opener | None = None) -> IO[bytes]:
    """Open a local path or a URI (``s3://`` with the S3 opener installed) for binary reading."""
    return opener_or_default(opener).open_read(uri)


def read_uri_bytes(uri: str, opener: Opener | None = None) -> bytes:
    """Whole content of a local path or a URI."""
    return opener_or_default(opener).read_bytes(uri)


DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is never read into memory
OVERSIZE_KEY = "__oversize__"  # sample key naming members left unread for their size
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_compression(url: str) -> str:
    """``"gz"`` for a shard name that is decompressed (``.tar.gz``/``.tgz``), else ``""`` (a plain tar)."""
    return "gz" if str(url).endswith((".tar.gz", ".tgz")) else ""


def _tar_members(fileobj: IO[bytes], url: str, max_member_bytes: int) -> Iterator[tuple[str, bytes | None, int]]:
    """``(name, data, size)`` of each regular member; ``data`` is None (unread) above ``max_member_bytes``.

    The stream is read without transparent decompression unless the name says so (``.tar.gz``/``.tgz``):
    a compressed stream under a ``.tar`` name is not a tar archive. An oversize member is skipped by reading
    past it in fixed-size blocks, never held in memory.
    """
    if tar_compression(url) == "gz":  # gzip's reader bounds each decompression step to the size asked for
        fileobj = gzip.GzipFile(fileobj=fileobj, mode="rb")
    for name, data, size in iter_members(fileobj, max_member_bytes):
        if not _META_MEMBER.match(name):
            yield name, data, size


def check_shards(dataset_uri: str, manifest: Manifest, opener: Opener | None = None,
                 sha256: bool = False) -> list[tuple[ShardInfo, str]]:
    """Shards of ``manifest`` whose file is missing, of another size, or (with ``sha256``) other content.

    Returns ``(shard, problem)`` pairs, empty when the directory matches its manifest. Sizes come from one
    listing of the directory; ``sha256`` reads every shard. Shards recorded without a size or checksum (older
    manifests) are checked for presence only.
    """
    opener = opener_or_default(opener)
    sizes = opener.list(dataset_uri)
    problems: list[tuple[ShardInfo, str]] = []
    for shard in manifest.shards:
        size = sizes.get(shard.path)
        if size is None:
            problems.append((shard, "missing"))
        elif shard.bytes is not None and size != shard.bytes:
            problems.append((shard, f"{size} bytes, the manifest says {shard.bytes}"))
        elif sha256 and shard.sha256:
            h = hashlib.sha256()
            with opener.open_read(join_uri(dataset_uri, shard.path)) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != shard.sha256:
                problems.append((shard, "sha256 differs from the manifest"))
    return problems


def iter_tar_samples(fileobj: IO[bytes], url: str,
                     max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar stream: dicts of ``__key__``, ``__url__`` and extension -> bytes.

    A member larger than ``max_member_bytes`` (0 = no limit) is not read: its sample gets
    ``__oversize__`` (a one-line description) instead of that extension. Raises :class:`ShardReadError`
    (after yielding every complete sample before it) when the stream is truncated or not a tar archive.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data, size in _tar_members(fileobj, url, max_member_bytes):
            m = _KEY_EXT.match(name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise ValueError(f"{name}: duplicate file name in tar file")
            if data is None:
                current[OVERSIZE_KEY] = f"{name}: {size} bytes, over the {max_member_bytes}-byte member limit"
            else:
                current[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardReadError(f"{url}: {e}") from e


def iter_shard(uri: str, opener: Opener | None = None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Open a shard (a local path or a URI) and yield its samples (see :func:`iter_tar_samples`)."""
    with open_uri(uri, opener) as f:
        yield from iter_tar_samples(f, uri, max_member_bytes)


def decode_json(raw: bytes | None) -> dict:
    """The sample's ``json`` as a dict (empty when absent); raises ``ValueError`` when malformed."""
    if raw is None:
        return {}
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("sample json is not an object")
    return obj


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A WebDataset tar in memory from ``{"__key__": ..., ext: bytes}`` dicts (for tests and tools)."""
    buf = io.BytesIO()
    writer = TarStreamWriter(buf)
    for s in samples:
        writer.write(s)
    writer.close()
    return buf.getvalue()
