"""components.storage: local paths and s3:// URIs against a real S3 HTTP server (moto) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import time

import boto3
import pytest

from components import storage


def _roundtrip(base: str) -> None:
    uri = storage.join(base, "dir", "a.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.exists(uri) and storage.read_text(uri) == "hello"
    storage.write_bytes(uri, b"second")  # overwrite
    assert storage.read_bytes(uri) == b"second"
    storage.write_json(storage.join(base, "dir", "b.json"), {"x": [1, 2]})
    assert storage.read_json(storage.join(base, "dir", "b.json")) == {"x": [1, 2]}
    storage.write_bytes(storage.join(base, "dir", "sub", "c.tar"), b"tar")
    assert storage.list_uris(base, ".json") == [storage.join(base, "dir", "b.json")]
    assert storage.list_uris(storage.join(base, "dir"), ".tar") == [storage.join(base, "dir", "sub", "c.tar")]
    assert len(storage.list_uris(base)) == 3
    with storage.local_copy(uri) as p:
        assert p.read_bytes() == b"second"
    storage.delete(uri)
    storage.delete(uri)  # deleting twice is fine
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    assert storage.list_uris(storage.join(base, "nothing-here")) == []


def test_local_roundtrip_and_atomic_writes(tmp_path):
    _roundtrip(str(tmp_path))
    storage.write_bytes(str(tmp_path / "x.bin"), b"1" * 1000)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary files left behind


def test_s3_roundtrip(s3_bucket):
    _roundtrip(f"s3://{s3_bucket}/prefix")


def test_dir_upload_download(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("t")
    (src / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
    uris = storage.upload_dir(src, f"s3://{s3_bucket}/tree")
    assert uris == [f"s3://{s3_bucket}/tree/a/b/deep.bin", f"s3://{s3_bucket}/tree/top.txt"]
    paths = storage.download_dir(f"s3://{s3_bucket}/tree", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == ["a/b/deep.bin", "top.txt"]
    assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == b"\x00\x01"


def test_multipart_upload_and_download(s3_bucket, s3_env, tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom(storage.MULTIPART_THRESHOLD + 3 * 1024 * 1024)  # 11 MiB: two parts
    big.write_bytes(data)
    uri = f"s3://{s3_bucket}/big.bin"
    storage.upload_file(big, uri)
    head = boto3.client("s3", endpoint_url=s3_env).head_object(Bucket=s3_bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # a completed multipart upload
    out = storage.download_file(uri, tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_missing_bucket_is_one_line_user_error(s3_env):
    with pytest.raises(storage.StorageError) as e:
        storage.write_bytes("s3://no-such-bucket-here/x", b"1")
    msg = str(e.value)
    assert "no such bucket" in msg and "\n" not in msg and "testing" not in msg
    with pytest.raises(storage.StorageError, match="no such bucket"):
        storage.check_bucket("s3://no-such-bucket-here/x")


def test_unreachable_endpoint_fails_fast_with_clear_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("BLIP_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("BLIP_S3_RETRIES", "2")
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes("s3://some-bucket/key")
    assert time.perf_counter() - t0 < 15
    assert "cannot reach the S3 endpoint" in str(e.value) and "http://127.0.0.1:9" in str(e.value)


def test_retries_through_failing_endpoint(s3_bucket, flaky_s3, monkeypatch):
    """503s on the first requests: botocore's retries absorb a few, the outer backoff loop the rest."""
    proxy = flaky_s3(fail_first=3)
    storage.write_bytes(f"s3://{s3_bucket}/k1", b"payload")  # 3 failures < 5 botocore attempts
    assert proxy.failed == 3
    assert storage.read_bytes(f"s3://{s3_bucket}/k1") == b"payload"

    proxy2 = flaky_s3(fail_first=3)
    monkeypatch.setenv("BLIP_S3_MAX_ATTEMPTS", "2")  # botocore gives up after 2: the outer loop retries
    storage.write_bytes(f"s3://{s3_bucket}/k2", b"again")
    assert proxy2.failed == 3
    assert storage.read_bytes(f"s3://{s3_bucket}/k2") == b"again"


def test_persistent_failure_gives_up_with_user_error(s3_bucket, flaky_s3, monkeypatch):
    monkeypatch.setenv("BLIP_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("BLIP_S3_RETRIES", "2")
    proxy = flaky_s3(fail_first=10_000)
    with pytest.raises(storage.StorageError, match="SlowDown"):
        storage.write_bytes(f"s3://{s3_bucket}/never", b"x")
    assert proxy.failed == 2


def test_multipart_upload_survives_intermittent_failures(s3_bucket, flaky_s3, tmp_path):
    data = os.urandom(storage.MULTIPART_THRESHOLD + 1024 * 1024)
    (tmp_path / "f.bin").write_bytes(data)
    proxy = flaky_s3(fail_every=3)  # every third request, including part uploads, fails once
    storage.upload_file(tmp_path / "f.bin", f"s3://{s3_bucket}/f.bin")
    assert proxy.failed >= 1
    assert storage.read_bytes(f"s3://{s3_bucket}/f.bin") == data


def test_split_and_join():
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.join("s3://bucket/a/", "b", "c.tar") == "s3://bucket/a/b/c.tar"
    with pytest.raises(storage.StorageError):
        storage.split_s3("s3://ab/key")
    assert storage.is_s3("s3://x/y") and not storage.is_s3("/tmp/x")


def test_download_dir_refuses_keys_leading_outside_the_target(s3_bucket, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="ckpt/ok.txt", Body=b"fine")
    client.put_object(Bucket=s3_bucket, Key="ckpt/../../escaped.txt", Body=b"evil")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/")["Contents"]]
    assert "ckpt/../../escaped.txt" in listed  # the store keeps the key as given
    target = tmp_path / "a" / "target"
    with pytest.raises(storage.StorageError, match=r"escaped\.txt.*outside the download directory"):
        storage.download_dir(f"s3://{s3_bucket}/ckpt", target)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert not target.exists() or not any(target.iterdir())  # nothing written, not even the good file
    client.delete_object(Bucket=s3_bucket, Key="ckpt/../../escaped.txt")
    client.put_object(Bucket=s3_bucket, Key="ckpt/sub/", Body=b"")  # a folder marker is skipped
    assert storage.download_dir(f"s3://{s3_bucket}/ckpt", target) == [target / "ok.txt"]


def test_s3_opener_is_blip_cores_default_and_reads_lists_writes(s3_bucket):
    """Importing components.storage installs its opener: blip_core's reader reaches s3:// through boto3."""
    from blip_core.io import default_opener

    op = default_opener()
    assert isinstance(op, storage.S3Opener)
    base = f"s3://{s3_bucket}/ds"
    data = os.urandom(3 * (1 << 20) + 17)
    with op.open_write(f"{base}/shard-000000.tar") as f:
        f.write(data[:1000])
        assert not storage.exists(f"{base}/shard-000000.tar")  # nothing visible before the block ends
        f.write(data[1000:])
    storage.write_bytes(f"{base}/sub/x.json", b"{}")
    assert op.list(base) == {"shard-000000.tar": len(data), "sub/x.json": 2}
    assert op.list(f"s3://{s3_bucket}/nothing") == {}
    assert op.exists(f"{base}/sub/x.json") and not op.exists(f"{base}/y")
    with op.open_read(f"{base}/shard-000000.tar") as f:
        assert f.read(10) == data[:10] and f.read() == data[10:]
    with pytest.raises(FileNotFoundError):
        op.open_read(f"{base}/missing.tar")


def test_s3_read_that_breaks_off_resumes_where_it_stopped(s3_bucket):
    """A connection that drops mid-object is re-requested from the byte reached (Range), not from the start."""
    import botocore.exceptions

    uri = f"s3://{s3_bucket}/big.bin"
    data = os.urandom(5 * (1 << 20))
    storage.write_bytes(uri, data)
    f = storage.S3Opener().open_read(uri)
    stream = f.raw
    real = stream.body
    calls = {"n": 0}

    class Dropping:  # the first response body breaks off after two reads
        def read(self, n=-1):
            calls["n"] += 1
            if calls["n"] > 2:
                raise botocore.exceptions.ResponseStreamingError(error="connection reset")
            return real.read(n)

        def close(self):
            real.close()

    stream.body = Dropping()
    assert f.read() == data
    assert calls["n"] == 3 and stream.pos == len(data)
    f.close()
