"""blip_core.io: the one atomic-write helper and the local opener (no S3 stack in blip_core)."""

from __future__ import annotations

import os

import pytest

from blip_core.errors import UserError
from blip_core.io import (
    LocalOpener,
    atomic_directory,
    atomic_path,
    atomic_write,
    default_opener,
    join_uri,
    set_default_opener,
)


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "a.json"
    with atomic_write(path, "w") as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_write(path, "wb") as f:
        f.write(b"half of the new")
        assert path.read_text() == "first"  # nothing visible under the final name while writing
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "first" and _leftovers(path.parent) == []
    with atomic_write(path, "wb") as f:
        f.write(b"second")
    assert path.read_bytes() == b"second" and _leftovers(path.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    with pytest.raises(ValueError, match="mode"), atomic_write(path, "a"):
        pass


def test_atomic_path_for_writers_taking_a_file_name(tmp_path):
    path = tmp_path / "w.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"x" * 10)
        assert not path.exists()
    assert path.read_bytes() == b"x" * 10 and _leftovers(tmp_path) == []


def test_atomic_directory_keeps_the_old_one_until_the_new_is_complete(tmp_path):
    dst = tmp_path / "model"
    with atomic_directory(dst) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "w.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_directory(dst) as tmp:
        (tmp / "nested").mkdir()
        raise RuntimeError("failed while writing")
    assert (dst / "nested" / "w.bin").read_bytes() == b"old" and _leftovers(tmp_path) == []
    with atomic_directory(dst) as tmp:
        (tmp / "w2.bin").write_bytes(b"new")
    assert sorted(p.name for p in dst.iterdir()) == ["w2.bin"] and _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="not a directory"), atomic_directory(tmp_path / "file"):
        pass
    assert (tmp_path / "file").read_text() == "not a directory" and _leftovers(tmp_path) == []


def test_local_opener_reads_writes_and_lists(tmp_path):
    op = LocalOpener()
    with op.open_write(str(tmp_path / "d" / "x.tar")) as f:
        f.write(b"12345")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "y").write_bytes(b"ab")
    assert op.read_bytes(str(tmp_path / "d" / "x.tar")) == b"12345"
    assert op.list(str(tmp_path / "d")) == {"x.tar": 5, "sub/y": 2}
    assert op.list(str(tmp_path / "missing")) == {}
    assert op.exists(str(tmp_path / "d" / "x.tar")) and not op.exists(str(tmp_path / "d" / "z"))
    with pytest.raises(FileNotFoundError):
        op.open_read(str(tmp_path / "d" / "z"))
    assert join_uri("s3://b/p/", "m.json") == "s3://b/p/m.json" and join_uri(str(tmp_path), "m") == str(tmp_path / "m")


def test_s3_without_an_s3_opener_is_one_line_naming_the_extra():
    """What blip_core alone (no workflow extra, so no components.storage) says about an s3:// dataset."""
    from blip_core.data.webdataset_io import read_manifest

    previous = set_default_opener(LocalOpener())
    try:
        for call in (lambda: read_manifest("s3://bucket/data"), lambda: LocalOpener().list("s3://bucket/data")):
            with pytest.raises(UserError) as err:
                call()
            msg = str(err.value)
            assert "\n" not in msg and "part of the workflow extra: pip install 'blip-capfilt[workflow]'" in msg
        with pytest.raises(UserError, match="not supported"):
            LocalOpener().open_read("gs://bucket/x")
    finally:
        set_default_opener(previous)
    assert default_opener() is previous
