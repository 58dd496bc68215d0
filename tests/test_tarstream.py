"""The shard tar reader and writer (blip_core.data.tarstream) against Python's tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest

from blip_core.data.reader import tar_bytes
from blip_core.data.tarstream import TarStreamWriter, iter_members

SAMPLES = [
    {"__key__": "000000001", "jpg": b"\xff\xd8" + bytes(range(256)) * 7, "txt": b"a red circle", "json": b"{}"},
    {"__key__": "000000002", "png": b"", "txt": "a caf\u00e9 caption", "__url__": "ignored"},
    {"__key__": "k" * 120, "jpg": b"long key"},  # name over 100 bytes: a pax header
    {"__key__": "dir/\u00fcber", "jpg": b"non-ascii key"},  # non-ASCII name: a pax header
    {"__key__": "exact", "bin": bytes(512)},  # a member of exactly one block: no padding
]


def _tarfile_written(samples) -> bytes:
    """The same samples through tarfile (pax format, mode 0644, mtime 0, no owner), members sorted per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        for s in samples:
            for ext in sorted(k for k in s if not k.startswith("_")):
                data = s[ext].encode("utf-8") if isinstance(s[ext], str) else s[ext]
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tarfile_read(data: bytes) -> list[tuple[str, bytes, int]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for info in tf:
            if info.isreg():
                out.append((info.name, tf.extractfile(info).read(), info.size))
    return out


@pytest.mark.parametrize("n", [0, 1, 2, len(SAMPLES)])
def test_writer_bytes_equal_tarfiles_for_the_same_members(n):
    assert tar_bytes(SAMPLES[:n]) == _tarfile_written(SAMPLES[:n])
    assert len(tar_bytes(SAMPLES[:n])) % (20 * 512) == 0


def test_written_shards_read_back_the_same_through_tarfile_and_the_stream_reader():
    data = tar_bytes(SAMPLES)
    ours = list(iter_members(io.BytesIO(data)))
    assert ours == _tarfile_read(data)
    assert [name for name, _, _ in ours][:3] == ["000000001.jpg", "000000001.json", "000000001.txt"]
    assert ("dir/\u00fcber.jpg", b"non-ascii key", 13) in ours and ("k" * 120 + ".jpg", b"long key", 8) in ours


def test_a_sample_with_a_non_bytes_value_writes_nothing():
    buf = io.BytesIO()
    writer = TarStreamWriter(buf)
    with pytest.raises(ValueError, match="expected bytes"):
        writer.write({"__key__": "a", "jpg": b"x", "txt": 3})
    with pytest.raises(ValueError, match="__key__"):
        writer.write({"jpg": b"x"})
    assert buf.getvalue() == b""


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_reader_takes_the_tar_formats_of_other_writers(fmt):
    long_name = ("p" * 60 + "/" + "q" * 90) if fmt == tarfile.USTAR_FORMAT else "d/" + "y" * 150  # prefix / long
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt,
                      pax_headers={"comment": "global"} if fmt == tarfile.PAX_FORMAT else None) as tf:
        for name, data in ((long_name + ".jpg", b"1" * 700), ("a.txt", b"hi"), ("big.bin", b"z" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("alink")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tf.addfile(link)
    data = buf.getvalue()
    assert list(iter_members(io.BytesIO(data))) == _tarfile_read(data)
    assert [m[0] for m in iter_members(io.BytesIO(data))] == [long_name + ".jpg", "a.txt", "big.bin"]
    # a member over the limit is read past, not returned
    assert list(iter_members(io.BytesIO(data), max_member_bytes=1000))[2] == ("big.bin", None, 5000)


def test_damage_is_an_error_not_a_silent_end():
    data = tar_bytes(SAMPLES[:2])
    first_data = 512 + 512  # after the first member's header and first data block
    for cut, what in ((first_data, "unexpected end of data"), (512 * 3 + 100, "unexpected end of data"),
                      (100, "unexpected end of data")):
        with pytest.raises(tarfile.ReadError, match=what):
            list(iter_members(io.BytesIO(data[:cut])))
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(iter_members(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError, match="not a tar archive"):
        list(iter_members(io.BytesIO(b"\x1f\x8b" + bytes(600))))
    # a corrupted header after the first member: tarfile's stream mode stops there without a word
    second = 512 + 2048  # the first member (1794 bytes) takes 4 data blocks
    bad = bytearray(data)
    bad[second + 10] ^= 0xFF
    assert len(_tarfile_read(bytes(bad))) == 1
    members = iter_members(io.BytesIO(bytes(bad)))
    assert next(members)[0] == "000000001.jpg"
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        next(members)


def test_stream_without_end_blocks_ends_cleanly():
    data = tar_bytes(SAMPLES[:1])
    end = data.rindex(b"a red circle") + len(b"a red circle")
    end += -end % 512
    assert [m[0] for m in iter_members(io.BytesIO(data[:end]))] == ["000000001.jpg", "000000001.json",
                                                                    "000000001.txt"]
