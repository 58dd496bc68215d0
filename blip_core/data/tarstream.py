"""Streaming tar reading and writing for WebDataset shards, without :mod:`tarfile`'s per-member overhead.

Python's ``tarfile`` costs about 0.1 ms per member to parse or build a header, more than the rest of reading a
small JPEG sample. Shards only need regular files, so this module reads them with one 512-byte header parse
per member and writes them with one pre-laid-out header per member.

Reading (:func:`iter_members`) accepts what tar writers produce: ustar and GNU headers, POSIX pax extended
headers (``path`` and ``size``; global ones too) and GNU long names; other members (directories, links) are
skipped. Unlike ``tarfile``'s stream mode it never stops silently: a truncated header, a bad checksum or a
short member raises :class:`tarfile.ReadError` (a ``TarError``), so a damaged shard is reported, not cut short.

Writing (:class:`TarStreamWriter`) gives the bytes ``tarfile`` writes in its default (pax) format with mode
0644, mtime 0 and no owner, which is what the project's shards have always been: for an ASCII member name of
at most 100 bytes a plain ustar header, otherwise ``tarfile``'s own pax header.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO, Any

BLOCK = 512
RECORD = 20 * BLOCK  # tar files are padded to whole records
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: the size field is ignored
_MAX_EXTENDED_HEADER = 1 << 20  # a pax or GNU long-name header larger than this is refused


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) == n:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data in {what}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _skip(f: IO[bytes], n: int, what: str) -> None:
    """Read past ``n`` bytes in bounded blocks (never all in memory)."""
    while n > 0:
        chunk = f.read(min(n, 1 << 16))
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data in {what}")
        n -= len(chunk)


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit of its first byte is set."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise tarfile.ReadError("invalid header: negative number")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid header: {text!r} is not an octal number") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 0x20
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header) - sum(
        b - 256 if b > 127 else b for b in header[148:156]) + 8 * 0x20
    return stored == signed


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``key=value`` records of a pax extended header (``"%d %s=%s\\n"``, the length counting itself)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError("invalid pax header") from None
        if space < 0 or length <= 0 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise tarfile.ReadError("invalid pax header")
        key, sep, value = data[space + 1:pos + length - 1].partition(b"=")
        if not sep:
            raise tarfile.ReadError("invalid pax header")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_members(f: IO[bytes], max_member_bytes: int = 0) -> Iterator[tuple[str, bytes | None, int]]:
    """``(name, data, size)`` of each regular member of the tar stream ``f``, in order.

    ``data`` is None for a member over ``max_member_bytes`` (0: no limit), which is read past in bounded blocks
    instead. Raises :class:`tarfile.ReadError` on an empty stream, a truncated or invalid header or member, or
    an unsupported member kind (GNU sparse files); the members before it have been yielded.
    """
    global_pax: dict[str, str] = {}
    local_pax: dict[str, str] = {}
    long_name: str | None = None
    first = True
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            if not header:
                if first:
                    raise tarfile.ReadError("empty file")
                return  # end of stream without end-of-archive blocks, as some writers leave it
            header += _read_exact(f, BLOCK - len(header), "a member header")
        if header == _ZERO_BLOCK:
            return  # end of archive
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad checksum" if not first else "not a tar archive (bad header checksum)")
        first = False
        kind = header[156:157]
        size = _number(header[124:136])
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: they describe the next member
            if size > _MAX_EXTENDED_HEADER:
                raise tarfile.ReadError(f"extended header of {size} bytes")
            data = _read_exact(f, size, "an extended header")
            _skip(f, -size % BLOCK, "an extended header")
            if kind == b"x":
                local_pax.update(_pax_records(data))
            elif kind == b"g":
                global_pax.update(_pax_records(data))
            elif kind == b"L":
                long_name = _text(data)
            continue
        pax = {**global_pax, **local_pax} if global_pax or local_pax else {}
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise tarfile.ReadError("invalid pax size") from None
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = _text(header[:100])
            prefix = header[345:500] if header[257:265] == _POSIX_MAGIC else b""
            if prefix[:1] not in (b"", b"\0"):
                name = _text(prefix) + "/" + name
        local_pax, long_name = {}, None
        if kind in _NO_DATA:
            continue
        if kind == b"S":
            raise tarfile.ReadError(f"{name}: GNU sparse members are not supported")
        regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
        if not regular:
            _skip(f, size + (-size % BLOCK), name)
            continue
        if max_member_bytes and size > max_member_bytes:
            _skip(f, size + (-size % BLOCK), name)
            yield name, None, size
            continue
        data = _read_exact(f, size, name)
        _skip(f, -size % BLOCK, name)
        yield name, data, size


def _ustar_header(name: bytes, size: int) -> bytes:
    """The header ``tarfile`` writes (pax format) for a regular file: mode 0644, uid/gid 0, mtime 0, no owner."""
    head = (name.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0" + b"%011o\0" % size
            + b"00000000000\0")
    tail = (b"0" + bytes(100) + _POSIX_MAGIC + bytes(32) + bytes(32) + bytes(8) + bytes(8) + bytes(155)
            + bytes(12))
    checksum = sum(head) + sum(tail) + 8 * 0x20
    return head + b"%06o\0 " % checksum + tail


class TarStreamWriter:
    """Write WebDataset samples to a binary stream as a plain tar (the writer of every shard).

    Each sample is a dict of ``__key__`` and ``extension -> bytes``; its members are written in sorted
    extension order as ``KEY.EXT``; keys starting with ``_`` are not written. :meth:`close` ends the archive
    (two zero blocks, padded to a whole 10,240-byte record) but leaves the stream open.
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.offset = 0
        self.closed = False

    def write_member(self, name: str, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ValueError("write to a closed tar stream")
        size = len(data)
        encoded = name.encode("utf-8", "surrogateescape")
        if name.isascii() and len(encoded) <= 100 and size < 8 ** 11:
            header = _ustar_header(encoded, size)
        else:  # long or non-ASCII names, huge members: tarfile's own pax header
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        pad = -size % BLOCK
        self.fileobj.write(header)
        self.fileobj.write(data)
        if pad:
            self.fileobj.write(bytes(pad))
        self.offset += len(header) + size + pad

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError("a sample must have a __key__")
        key = sample["__key__"]
        members = []
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            value = sample[ext]
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext}: expected bytes, got {type(value).__name__}")
            members.append((f"{key}.{ext}", value))
        for name, value in members:  # checked first: a bad sample writes nothing
            self.write_member(name, value)

    def close(self) -> None:
        if self.closed:
            return
        end = 2 * BLOCK
        end += -(self.offset + end) % RECORD
        self.fileobj.write(bytes(end))
        self.offset += end
        self.closed = True
