"""Ingest stage: sources, per-reason rejection counts, atomic and deterministic output, local and S3."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_core.config import load_config
from blip_core.data.loader import make_loader
from blip_core.data.toyweb import generate
from blip_core.data.webdataset_io import MANIFEST_NAME, REJECTED_NAME, iter_shard, read_manifest, tar_bytes
from blip_core.errors import UserError
from blip_core.tokenizer import BlipTokenizer
from components import cli, ingest, storage

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3)).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0 if mode != "RGBA" else (255, 0, 0, 128)).save(buf, "PNG")
    return buf.getvalue()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard_hashes(uri: str) -> dict[str, str]:
    return {u.rsplit("/", 1)[1]: hashlib.sha256(storage.read_bytes(u)).hexdigest()
            for u in storage.list_uris(uri, ".tar")}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [c for s in generate("toyweb://?split=human&n=100") for c in s.json["captions"]]
    return BlipTokenizer.from_corpus(texts, vocab_size=200)


# --------------------------------------------------------------------------------------------------
# toy-web, determinism, layout
# --------------------------------------------------------------------------------------------------


def test_toyweb_ingest_layout_and_determinism(tmp_path):
    src = "toyweb://?split=human&n=45&seed=1"
    res = ingest.run(_cfg("ingest.shard_size=20"), src, str(tmp_path / "a"), progress=False)
    m = res.manifest
    assert (m.samples_in, m.samples_out, m.rejected, m.captions_out) == (45, 45, {}, 225)
    assert [(s.path, s.samples, s.captions) for s in m.shards] == [
        ("shard-000000.tar", 20, 100), ("shard-000001.tar", 20, 100), ("shard-000002.tar", 5, 25)]
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, REJECTED_NAME] + [s.path for s in m.shards]
    for s in m.shards:
        assert _sha(out / s.path) == s.sha256 and (out / s.path).stat().st_size == s.bytes
    assert (out / REJECTED_NAME).read_text() == ""
    samples = list(iter_shard(str(out / "shard-000000.tar")))
    assert len(samples) == 20
    first = samples[0]
    meta = json.loads(first["json"])
    assert set(first) >= {"__key__", "jpg", "txt", "json"}
    assert first["txt"].decode() == meta["captions"][0] and len(meta["captions"]) == 5
    assert meta["source"] == "human" and meta["noise"] is None and meta["image_id"] == first["__key__"]
    assert Image.open(io.BytesIO(first["jpg"])).size == (64, 64)
    # a second run elsewhere is byte-identical, manifest included
    ingest.run(_cfg("ingest.shard_size=20"), src, str(tmp_path / "b"), progress=False)
    for name in [MANIFEST_NAME, REJECTED_NAME] + [s.path for s in m.shards]:
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
    out = str(tmp_path / "d")
    ingest.run(_cfg("ingest.shard_size=10"), "toyweb://?n=35", out, progress=False)
    assert len(storage.list_uris(out, ".tar")) == 4
    ingest.run(_cfg("ingest.shard_size=10"), "toyweb://?n=12", out, progress=False)
    assert [Path(u).name for u in storage.list_uris(out, ".tar")] == ["shard-000000.tar", "shard-000001.tar"]
    assert read_manifest(out).samples_out == 12


# --------------------------------------------------------------------------------------------------
# Faults: every input sample is either written or counted under exactly one reason
# --------------------------------------------------------------------------------------------------

FAULT_CFG = ("ingest.max_pixels=4000000", "ingest.min_size=16", "ingest.shard_size=4")
EXPECTED_REJECTED = {"corrupt_image": 1, "truncated_image": 1, "zero_byte": 1, "too_large": 1, "too_small": 1,
                     "empty_caption": 1, "invalid_utf8": 1, "duplicate": 2, "missing_image": 1, "bad_metadata": 1}


def _fault_samples() -> tuple[list[dict], list[str]]:
    """Samples with one fault each (plus good ones); returns them and the keys that must survive."""
    good = [{"__key__": f"good{i}", "jpg": _jpeg(i), "txt": f"a red circle number {i}".encode()} for i in range(6)]
    good[1]["json"] = json.dumps({"image_id": "img-1", "url": "http://example.com/1.jpg"}).encode()
    trunc = _jpeg(100)
    faults = [
        {"__key__": "corrupt", "jpg": os.urandom(500), "txt": b"a blue square"},
        {"__key__": "truncated", "jpg": trunc[: len(trunc) // 2], "txt": b"a blue square"},
        {"__key__": "zero", "jpg": b"", "txt": b"a blue square"},
        {"__key__": "bomb", "png": _png((2100, 2100), "L"), "txt": b"a huge gray image"},
        {"__key__": "tiny", "jpg": _jpeg(101, (8, 8)), "txt": b"a tiny image"},
        {"__key__": "emptycap", "jpg": _jpeg(102), "txt": b" ... !!! ### "},
        {"__key__": "badutf8", "jpg": _jpeg(103), "txt": b"caf\xe9 \xff\xfe square"},
        {"__key__": "dup1", "jpg": good[0]["jpg"], "txt": b"A red circle number 0."},  # same after cleaning
        {"__key__": "dup2", "jpg": good[0]["jpg"], "txt": good[0]["txt"]},
        {"__key__": "noimage", "txt": b"a caption without an image"},
        {"__key__": "badjson", "jpg": _jpeg(104), "txt": b"a green star", "json": b"{not json"},
    ]
    kept = [
        {"__key__": "sameimage_othercaption", "jpg": good[0]["jpg"], "txt": b"a different caption"},
        {"__key__": "rgba", "png": _png((40, 30), "RGBA"), "txt": b"a transparent png"},
        {"__key__": "big", "jpg": _jpeg(105, (320, 160)), "txt": b"a wide image"},
    ]
    samples = good[:3] + faults[:6] + good[3:] + faults[6:] + kept
    return samples, [s["__key__"] for s in good + kept]


def _check_fault_result(m, out: str, expected_keys: list[str], n_in: int) -> None:
    assert m.rejected == EXPECTED_REJECTED
    assert m.samples_in == n_in == m.samples_out + sum(m.rejected.values())
    keys = [s["__key__"] for u in storage.list_uris(out, ".tar") for s in iter_shard(u)]
    assert sorted(keys) == sorted(expected_keys)
    rejected = [json.loads(line) for line in storage.read_text(storage.join(out, REJECTED_NAME)).splitlines()]
    assert sum(1 for _ in rejected) == sum(EXPECTED_REJECTED.values())
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert by_reason == EXPECTED_REJECTED


def test_fault_shards_give_exact_per_reason_counts(tmp_path):
    samples, keep = _fault_samples()
    src = tmp_path / "src"
    src.mkdir()
    (src / "part-00000.tar").write_bytes(tar_bytes(samples[:10]))
    (src / "sub").mkdir()  # listed after part-00000.tar: sorted order
    (src / "sub" / "part-00001.tar").write_bytes(tar_bytes(samples[10:]))
    out = str(tmp_path / "out")
    m = ingest.run(_cfg(*FAULT_CFG), str(src), out, progress=False).manifest
    _check_fault_result(m, out, keep, len(samples))
    rejected = {json.loads(x)["key"]: json.loads(x) for x in (tmp_path / "out" / REJECTED_NAME).read_text().splitlines()}
    assert rejected["badutf8"]["reason"] == "invalid_utf8" and rejected["bomb"]["reason"] == "too_large"
    assert rejected["truncated"]["origin"] == "part-00000.tar"
    stored = {s["__key__"]: s for u in storage.list_uris(out, ".tar") for s in iter_shard(u)}
    assert Image.open(io.BytesIO(stored["big"]["jpg"])).size == (128, 64)  # short side to 64, aspect kept
    assert Image.open(io.BytesIO(stored["rgba"]["jpg"])).mode == "RGB"
    assert stored["good0"]["jpg"] == samples[0]["jpg"]  # a JPEG needing no change is stored as is
    meta1 = json.loads(stored["good1"]["json"])
    assert meta1["image_id"] == "img-1" and meta1["url"] == "http://example.com/1.jpg"  # source json kept
    assert meta1["captions"] == ["a red circle number 1"] and meta1["source"] == "web"


def _write_manifest_source(root: Path, fmt: str) -> tuple[str, list[str], int]:
    samples, keep = _fault_samples()
    (root / "img").mkdir(parents=True)
    rows = []
    for s in samples:
        ext = "png" if "png" in s else "jpg"
        row: dict = {"key": s["__key__"], "caption": s["txt"]}
        if "jpg" in s or "png" in s:
            (root / "img" / f"{s['__key__']}.{ext}").write_bytes(s.get("jpg", s.get("png")))
            row["image"] = f"img/{s['__key__']}.{ext}"
        else:
            row["image"] = "img/does-not-exist.jpg"
        rows.append(row)
    if fmt == "jsonl":
        lines = []
        for r in rows:
            cap = r["caption"]
            if r["key"] == "badjson":
                lines.append(b"{not json")
                continue
            r = dict(r, caption="@@CAP@@")
            line = json.dumps(r).encode()
            lines.append(line.replace(b"@@CAP@@", cap.replace(b'"', b'\\"')))
        (root / "list.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        return str(root / "list.jsonl"), keep, len(samples)
    out = [b"key,image,caption"]
    for r in rows:
        cap = r["caption"].replace(b'"', b'""')
        if r["key"] == "badjson":  # CSV rows have no json; make this one a second bad UTF-8 case instead
            continue
        out.append(b",".join([r["key"].encode(), r["image"].encode(), b'"' + cap + b'"']))
    (root / "list.csv").write_bytes(b"\n".join(out) + b"\n")
    return str(root / "list.csv"), keep, len(samples) - 1


def test_fault_jsonl_manifest_source(tmp_path):
    src, keep, n = _write_manifest_source(tmp_path / "src", "jsonl")
    out = str(tmp_path / "out")
    m = ingest.run(_cfg(*FAULT_CFG), src, out, progress=False).manifest
    expected = dict(EXPECTED_REJECTED, missing_image=1)
    assert m.rejected == expected and m.samples_in == n == m.samples_out + sum(m.rejected.values())
    keys = sorted(s["__key__"] for u in storage.list_uris(out, ".tar") for s in iter_shard(u))
    assert keys == sorted(keep)


def test_csv_manifest_source(tmp_path):
    src, keep, n = _write_manifest_source(tmp_path / "src", "csv")
    m = ingest.run(_cfg(*FAULT_CFG), src, str(tmp_path / "out"), progress=False).manifest
    expected = {k: v for k, v in EXPECTED_REJECTED.items() if k != "bad_metadata"}
    assert m.rejected == expected and m.samples_in == n and m.samples_out == len(keep)


def test_truncated_source_shard_counts_its_remainder(tmp_path):
    samples = [{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": f"caption {i}".encode()} for i in range(6)]
    data = tar_bytes(samples)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "src" / "b.tar").write_bytes(tar_bytes([{"__key__": "z", "jpg": _jpeg(9), "txt": b"last"}]))
    m = ingest.run(_cfg(), str(tmp_path / "src"), str(tmp_path / "out"), progress=False).manifest
    assert m.rejected == {"unreadable_shard": 1}
    assert m.samples_out >= 2 and m.samples_in == m.samples_out + 1


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def test_s3_round_trip_through_loader_without_leaking_credentials(s3_bucket, monkeypatch, caplog, capfd, tokenizer):
    key_id, secret = "AKIAEXAMPLEKEY7Q2X9Z", "s3cr3t/DoNotLog+wJalrXUtnFEMI7K"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)
    src = f"s3://{s3_bucket}/raw"
    # an S3 source of shards (img2dataset layout) -> an S3 dataset directory
    for i in range(3):
        samples = [{"__key__": f"s{i}_{j}", "jpg": _jpeg(10 * i + j), "txt": f"a red circle {i} {j}".encode()}
                   for j in range(9)]
        storage.write_bytes(f"{src}/part-{i:05d}.tar", tar_bytes(samples))
    out = f"s3://{s3_bucket}/datasets/web"
    assert cli.main(["ingest", "--source", src, "--output", out, "--set", "ingest.shard_size=10"]) == 0
    m = read_manifest(out)
    assert (m.samples_in, m.samples_out, len(m.shards)) == (27, 27, 3)
    for s in m.shards:
        data = storage.read_bytes(f"{out}/{s.path}")
        assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.bytes
    # read back through the loader (the S3 opener): every sample exactly once in eval order
    loader = make_loader([out], tokenizer, image_size=32, batch_size=9, train=False, max_length=16)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.skipped == 0
    ids = [i for b in batches for i in b["image_id"]]
    assert sorted(ids) == sorted(f"s{i}_{j}" for i in range(3) for j in range(9))
    assert batches[0]["image"].shape == (9, 3, 32, 32)
    # an S3 JSONL manifest source with relative keys
    storage.write_bytes(f"s3://{s3_bucket}/list/img/a.jpg", _jpeg(1))
    storage.write_text(f"s3://{s3_bucket}/list/rows.jsonl",
                       json.dumps({"image": "img/a.jpg", "caption": "a blue star"}) + "\n"
                       + json.dumps({"image": "img/missing.jpg", "caption": "gone"}) + "\n")
    m2 = ingest.run(_cfg(), f"s3://{s3_bucket}/list/rows.jsonl", f"s3://{s3_bucket}/datasets/list",
                    progress=False).manifest
    assert (m2.samples_out, m2.rejected) == (1, {"missing_image": 1})
    captured = capfd.readouterr()
    everything = captured.out + captured.err + caplog.text + "".join(str(r.args) for r in caplog.records)
    assert secret not in everything
    ours = "".join(r.getMessage() for r in caplog.records if r.name.startswith(("components", "blip_core")))
    assert key_id not in ours and key_id not in captured.out + captured.err
    assert "27 in, 27 out" in captured.out


def test_ingest_to_s3_through_failing_endpoint(s3_bucket, flaky_s3, tmp_path):
    src = "toyweb://?n=50&seed=7"
    ingest.run(_cfg("ingest.shard_size=20"), src, str(tmp_path / "local"), progress=False)
    proxy = flaky_s3(fail_first=4, fail_every=15)
    out = f"s3://{s3_bucket}/flaky"
    m = ingest.run(_cfg("ingest.shard_size=20"), src, out, progress=False).manifest
    assert proxy.failed >= 4
    assert m.samples_out == 50
    assert _shard_hashes(out) == _shard_hashes(str(tmp_path / "local"))
    assert storage.read_bytes(f"{out}/{MANIFEST_NAME}") == (tmp_path / "local" / MANIFEST_NAME).read_bytes()


# --------------------------------------------------------------------------------------------------
# Crash safety and the CLI
# --------------------------------------------------------------------------------------------------


def test_killed_ingest_leaves_no_manifest_and_rerun_gives_identical_shards(tmp_path):
    src, out, ref = "toyweb://?n=1500&seed=11", tmp_path / "out", tmp_path / "ref"
    args = [sys.executable, "-m", "components.cli", "ingest", "--source", src, "--output", str(out),
            "--set", "ingest.shard_size=60", "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not (out / "shard-000002.tar").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "ingest did not start writing shards"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST_NAME).exists()
    assert 3 <= len(list(out.glob("shard-*.tar"))) < 25
    cfg = _cfg("ingest.shard_size=60")
    ingest.run(cfg, src, str(out), progress=False)
    ingest.run(cfg, src, str(ref), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temp files
    assert _shard_hashes(str(out)) == _shard_hashes(str(ref)) and len(_shard_hashes(str(ref))) == 25
    assert (out / MANIFEST_NAME).read_bytes() == (ref / MANIFEST_NAME).read_bytes()


def test_cli_missing_source_is_one_error_line(tmp_path, capsys):
    for source in (str(tmp_path / "nope"), str(tmp_path / "nope.jsonl"), "toyweb://?split=bogus"):
        assert cli.main(["ingest", "--source", source, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("blip ingest: error:") and "\n" not in err, err
    (tmp_path / "empty").mkdir()
    assert cli.main(["ingest", "--source", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no WebDataset shards" in capsys.readouterr().err


def test_cli_unreachable_or_missing_s3_is_one_error_line(s3_env, monkeypatch, capsys, tmp_path):
    args = ["ingest", "--source", "s3://no-such-bucket-zz/raw", "--output", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no such bucket" in err and "\n" not in err
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("BLIP_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("BLIP_S3_RETRIES", "1")
    assert cli.main(["ingest", "--source", "toyweb://?n=3", "--output", "s3://some-bucket/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the S3 endpoint" in err and "\n" not in err


def test_cli_progress_bar_and_config(tmp_path, capsys):
    cfg = tmp_path / "params.yaml"
    cfg.write_text("ingest:\n  shard_size: 7\n  resolution: 32\n")
    assert cli.main(["ingest", "--source", "toyweb://?n=15", "--output", str(tmp_path / "o"), "--config", str(cfg),
                     "--set", "ingest.image_format=png"]) == 0
    captured = capsys.readouterr()
    assert "samples/s" in captured.err and "15/15" in captured.err  # tqdm bar with throughput
    m = read_manifest(str(tmp_path / "o"))
    assert len(m.shards) == 3 and m.config["ingest"]["resolution"] == 32
    sample = next(iter_shard(str(tmp_path / "o" / "shard-000000.tar")))
    assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)
    with pytest.raises(UserError):
        ingest.run(_cfg("ingest.shard_size=0"), "toyweb://?n=1", str(tmp_path / "z"), progress=False)


# --------------------------------------------------------------------------------------------------
# Untrusted inputs: compression bombs, paths outside the manifest, private URLs, response sizes
# --------------------------------------------------------------------------------------------------


def _bomb_tar_gz(member_bytes: int) -> bytes:
    """A gzip-compressed tar holding one sample whose image member is ``member_bytes`` zeros."""
    import gzip

    return gzip.compress(tar_bytes([{"__key__": "boom", "jpg": bytes(member_bytes), "txt": b"a red circle"}]))


def test_compressed_shard_is_not_decompressed_under_a_tar_name_and_oversize_members_are_not_read(tmp_path):
    import tracemalloc

    from blip_core.data.webdataset_io import iter_tar_samples

    bomb = _bomb_tar_gz(2 << 20)
    assert len(bomb) < 10_000  # 2 MiB of image member compressed to a few KB
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-bomb.tar").write_bytes(bomb)
    (src / "b-bomb.tar.gz").write_bytes(bomb)
    (src / "c-good.tar").write_bytes(tar_bytes([{"__key__": "ok", "jpg": _jpeg(1), "txt": b"a blue star"}]))
    m = ingest.run(_cfg("ingest.max_member_bytes=1048576"), str(src), str(tmp_path / "out"), progress=False).manifest
    assert (m.samples_in, m.samples_out) == (3, 1)
    assert m.rejected == {"unreadable_shard": 1, "too_large": 1}
    rejected = {r["origin"]: r for r in map(json.loads, (tmp_path / "out" / REJECTED_NAME).read_text().splitlines())}
    assert rejected["a-bomb.tar"]["reason"] == "unreadable_shard"
    assert rejected["b-bomb.tar.gz"]["reason"] == "too_large" and "boom.jpg" in rejected["b-bomb.tar.gz"]["detail"]
    # the oversize member is skipped without being held in memory
    for name in ("a-bomb.tar", "b-bomb.tar.gz"):
        tracemalloc.start()
        with open(src / name, "rb") as f:
            try:
                list(iter_tar_samples(f, name, max_member_bytes=1 << 20))
            except Exception:  # noqa: BLE001 - the .tar one is not a tar archive
                pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)


def _manifest_rows(root: Path, rows: list[dict]) -> str:
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "list.jsonl")


def test_manifest_paths_stay_inside_its_directory_unless_allowed(tmp_path):
    root = tmp_path / "data" / "list"
    (root / "img").mkdir(parents=True)
    (root / "img" / "in.jpg").write_bytes(_jpeg(1))
    (tmp_path / "data" / "secret.jpg").write_bytes(_jpeg(2))  # exists, outside the manifest's directory
    (root / "img" / "link.jpg").symlink_to(tmp_path / "data" / "secret.jpg")
    rows = [{"key": "in", "image": "img/in.jpg", "caption": "a red circle"},
            {"key": "up", "image": "../secret.jpg", "caption": "a red square"},
            {"key": "up_missing", "image": "../no-such.jpg", "caption": "a red star"},
            {"key": "absolute", "image": str(tmp_path / "data" / "secret.jpg"), "caption": "a blue circle"},
            {"key": "absolute_missing", "image": str(tmp_path / "nothing.jpg"), "caption": "a blue star"},
            {"key": "symlink", "image": "img/link.jpg", "caption": "a green circle"},
            {"key": "device", "image": "/dev/zero", "caption": "a green star"}]
    src = _manifest_rows(root, rows)
    m = ingest.run(_cfg(), src, str(tmp_path / "out"), progress=False).manifest
    assert m.samples_out == 1 and m.rejected == {"outside_root": 6}
    recs = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / REJECTED_NAME).read_text().splitlines())}
    # the same neutral record whether or not the file exists
    for present, missing in (("up", "up_missing"), ("absolute", "absolute_missing")):
        assert recs[present]["reason"] == recs[missing]["reason"] == "outside_root"
        strip = lambda r: r["detail"].split(": ", 1)[1]  # noqa: E731 - the detail names the row's own path first
        assert strip(recs[present]) == strip(recs[missing])
    m = ingest.run(_cfg("ingest.allow_paths_outside=true"), src, str(tmp_path / "out2"), progress=False).manifest
    assert m.samples_out == 4 and m.rejected == {"missing_image": 3}  # two missing files, /dev/zero not a file


class _ImageServer:
    """A local HTTP server: /img.jpg, /big (Content-Length), /chunked (no length), /redirect-ftp."""

    def __init__(self, image: bytes) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        served = self.served = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                served.append(self.path)
                if self.path == "/img.jpg":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                elif self.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(8 << 20))
                    self.end_headers()
                    self.wfile.write(image)  # the client must stop at the header
                elif self.path == "/chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    block = bytes(256 << 10)
                    try:
                        for _ in range(16):  # 4 MiB in all
                            self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                elif self.path == "/redirect-ftp":
                    self.send_response(302)
                    self.send_header("Location", f"ftp://127.0.0.1:{self.server.server_address[1]}/x")
                    self.end_headers()
                else:
                    self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image_server():
    server = _ImageServer(_jpeg(3))
    yield server
    server.close()


def test_manifest_urls_refuse_private_addresses_unless_allowed(tmp_path, image_server):
    rows = [{"key": "local", "image": f"{image_server.url}/img.jpg", "caption": "a red circle"},
            {"key": "meta", "image": "http://169.254.169.254/latest/meta-data/", "caption": "a red star"}]
    src = _manifest_rows(tmp_path, rows)
    m = ingest.run(_cfg(), src, str(tmp_path / "out"), progress=False).manifest
    assert m.samples_out == 0 and m.rejected == {"blocked_url": 2}
    assert image_server.served == []  # refused before connecting
    m = ingest.run(_cfg("ingest.allow_private_urls=true"), str(tmp_path / "list.jsonl"), str(tmp_path / "out2"),
                   progress=False).manifest
    assert m.rejected.get("blocked_url", 0) == 0 and m.samples_out == 1


def test_manifest_url_rebinding_to_a_private_address_is_refused_at_connect(image_server, monkeypatch):
    """A host that resolves to a public address when checked and to 127.0.0.1 when connecting."""
    import socket

    real = socket.getaddrinfo
    port = int(image_server.url.rsplit(":", 1)[1])
    calls = []

    def rebinding(host, *args, **kwargs):
        if host != "images.example":
            return real(host, *args, **kwargs)
        calls.append(host)
        ip = "93.184.216.34" if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(ingest.Rejected) as err:
        ingest.fetch_url(f"http://images.example:{port}/img.jpg", 1 << 20)
    assert err.value.reason == "blocked_url" and len(calls) == 2 and image_server.served == []


def test_manifest_url_redirects_are_checked_and_responses_capped(image_server):
    with pytest.raises(ingest.Rejected) as err:  # a redirect to another scheme, even with private URLs allowed
        ingest.fetch_url(f"{image_server.url}/redirect-ftp", 1 << 20, allow_private=True)
    assert err.value.reason == "blocked_url"
    from components.url_fetch import _RedirectHandler

    handler = _RedirectHandler(allow_private=False)  # a redirect to a private address
    with pytest.raises(ingest.Rejected) as err:
        handler.redirect_request(None, None, 302, "Found", {}, "http://127.0.0.1/admin")
    assert err.value.reason == "blocked_url"
    for path in ("/big", "/chunked"):
        with pytest.raises(ingest.Rejected) as err:
            ingest.fetch_url(f"{image_server.url}{path}", 1 << 20, allow_private=True)
        assert err.value.reason == "too_large", path
    assert ingest.fetch_url(f"{image_server.url}/img.jpg", 1 << 20, allow_private=True) == _jpeg(3)


# --------------------------------------------------------------------------------------------------
# Cached ingest outputs follow the data, not only its URI
# --------------------------------------------------------------------------------------------------


def test_source_fingerprint_follows_the_data_under_an_unchanged_prefix(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/raw"
    for i in range(2):
        storage.write_bytes(f"{src}/part-{i}.tar", tar_bytes([{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": b"a red"}]))
    fp = ingest.source_fingerprint(src)
    assert ingest.source_fingerprint(src) == fp
    storage.write_bytes(f"{src}/part-1.tar", tar_bytes([{"__key__": "s1", "jpg": _jpeg(7), "txt": b"a red"}]))
    fp2 = ingest.source_fingerprint(src)
    assert fp2 != fp
    storage.write_bytes(f"{src}/part-2.tar", tar_bytes([{"__key__": "s2", "jpg": _jpeg(8), "txt": b"a blue"}]))
    assert ingest.source_fingerprint(src) not in (fp, fp2)
    # a local manifest: the images next to it count too
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(1))
    rows = _manifest_rows(tmp_path, [{"image": "img/a.jpg", "caption": "a red circle"}])
    fp = ingest.source_fingerprint(rows)
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(2, size=(80, 64)))
    assert ingest.source_fingerprint(rows) != fp


def test_source_fingerprint_of_an_annotation_file_covers_its_image_root(tmp_path):
    ann, images = tmp_path / "ann", tmp_path / "images"
    ann.mkdir(), images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg(1))
    src = ann / "train.json"
    src.write_text(json.dumps([{"image": "a.jpg", "caption": "a red circle"}]))
    fp = ingest.source_fingerprint(str(src), str(images))
    assert ingest.source_fingerprint(str(src), str(images)) == fp
    (images / "a.jpg").write_bytes(_jpeg(2, size=(80, 64)))  # an image under the root changed
    fp2 = ingest.source_fingerprint(str(src), str(images))
    assert fp2 != fp
    src.write_text(json.dumps([{"image": "a.jpg", "caption": "a blue circle"}]))  # the annotations changed
    assert ingest.source_fingerprint(str(src), str(images)) not in (fp, fp2)


def test_pipeline_ingest_reuses_its_output_only_while_the_source_is_unchanged(s3_bucket, tmp_path, capsys):
    from types import SimpleNamespace

    from pipelines import ingest_steps

    src = f"s3://{s3_bucket}/raw"
    storage.write_bytes(f"{src}/part-0.tar", tar_bytes([{"__key__": f"s{j}", "jpg": _jpeg(j), "txt": b"a red star"}
                                                        for j in range(3)]))

    def run_step(n: int):
        dataset = SimpleNamespace(path=str(tmp_path / f"dataset{n}"), metadata={})
        report = SimpleNamespace(path=str(tmp_path / f"report{n}.md"))
        ingest_steps.ingest("web", src, f"s3://{s3_bucket}/runs", "", "", [], dataset, report)
        return dataset.metadata

    first = run_step(1)
    again = run_step(2)
    assert again["location"] == first["location"]
    out = capsys.readouterr().out
    storage.write_bytes(f"{src}/part-0.tar", tar_bytes([{"__key__": f"s{j}", "jpg": _jpeg(j), "txt": b"a red star"}
                                                        for j in range(5)]))  # new data, same URI
    changed = run_step(3)
    assert changed["location"] != first["location"] and changed["samples"] == 5 and first["samples"] == 3
    assert "reusing" in out  # the second run did not ingest again


def test_shards_and_rejections_reach_the_disk_before_the_manifest(tmp_path, monkeypatch):
    """A power cut after manifest.json is written must not leave it naming shards still in the page cache."""
    synced: list[str] = []
    real = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "out"
    m = ingest.run(_cfg("ingest.shard_size=4"), "toyweb://?n=10&noise=0.5&seed=2", str(out), progress=False).manifest
    names = [Path(p).name for p in synced]
    manifest_at = max(i for i, n in enumerate(names) if n.startswith(f".{MANIFEST_NAME}.tmp-"))
    for shard in m.shards:
        assert shard.path in names[:manifest_at], shard.path  # synced while staged, before the manifest
    assert REJECTED_NAME in names[:manifest_at]
    assert str(out) in synced[manifest_at + 1:]  # the directory entry of the renamed manifest


# --------------------------------------------------------------------------------------------------
# Parallel ingest: parts, merge, --workers
# --------------------------------------------------------------------------------------------------


def _parallel_source(root: Path) -> tuple[str, str]:
    """The fault samples (every rejection reason, duplicates) plus keys repeated across shards, as shards and as
    a JSONL manifest."""
    samples, _ = _fault_samples()
    # keys that become the same output key "same" (suffixed in source order), one of them rejected
    extra = [{"__key__": k, "jpg": _jpeg(200 + i), "txt": f"a yellow star number {i}".encode()}
             for i, k in enumerate(["same", "same!", "same~", "same@"])]
    extra.insert(2, {"__key__": "same%", "jpg": b"", "txt": b"a rejected sample also takes its key"})
    extra += [{"__key__": f"web{i}", "jpg": _jpeg(300 + i), "txt": f"a purple square {i % 7}".encode()} for i in range(24)]
    extra.append(dict(extra[-1], __key__="late_duplicate"))
    shards = root / "shards"
    shards.mkdir(parents=True)
    everything = samples + extra
    for i in range(0, len(everything), 9):
        (shards / f"part-{i // 9:05d}.tar").write_bytes(tar_bytes(everything[i:i + 9]))
    (root / "img").mkdir()
    rows = []
    for i, s in enumerate(everything):
        image = s.get("jpg", s.get("png"))
        if image is not None:
            (root / "img" / f"{i}.img").write_bytes(image)
        rows.append({"key": s["__key__"], "image": f"img/{i}.img", "caption": s["txt"].decode("utf-8", "replace")})
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(shards), str(root / "list.jsonl")


def _dataset_content(out: str) -> tuple[dict, list]:
    """Samples by key (every member) and the sorted rejected records of a dataset directory."""
    samples = {}
    for u in storage.list_uris(out, ".tar"):
        for s in iter_shard(u):
            key = s.pop("__key__")
            s.pop("__url__")
            assert key not in samples, key
            samples[key] = s
    # (a PIL message may name an object's memory address: not part of the comparison)
    rejected = sorted(re.sub(r" at 0x[0-9a-f]+", "", line)
                      for line in storage.read_text(storage.join(out, REJECTED_NAME)).splitlines())
    return samples, rejected


@pytest.mark.parametrize("kind", ["shards", "jsonl", "toyweb"])
def test_parallel_ingest_gives_the_same_samples_and_rejections_for_any_number_of_parts(tmp_path, kind):
    from blip_core.data.webdataset_io import check_shards
    from components import ingest_parts

    shards, jsonl = _parallel_source(tmp_path / "src")
    src = {"shards": shards, "jsonl": jsonl, "toyweb": "toyweb://?split=web&n=60&noise=0.5&seed=4"}[kind]
    cfg = _cfg(*FAULT_CFG)
    single = ingest.run(cfg, src, str(tmp_path / "n1"), progress=False).manifest
    if kind != "toyweb":
        assert single.rejected["duplicate"] == 3 and len(single.rejected) >= 8
    expected = _dataset_content(str(tmp_path / "n1"))
    keys = set(expected[0])
    if kind != "toyweb":
        assert {"same", "same_1", "same_3", "same_4"} <= keys and "same_2" not in keys  # the rejected one took "same_2"
        assert sum('"key": "same%"' in r for r in expected[1]) == 1
    for n in (2, 3):
        out = str(tmp_path / f"workers{n}")
        merged = ingest_parts.run_workers(ingest.run, cfg, src, out, n, progress=False).manifest
        # the same parts written one by one (as N pods would), merged by the CLI
        parts = [str(tmp_path / f"n{n}-part{i}") for i in range(n)]
        counts = [ingest.run(cfg, src, p, progress=False, part=(i, n)).manifest.samples_in for i, p in enumerate(parts)]
        assert sum(counts) == single.samples_in and sum(c > 0 for c in counts) >= 2  # the parts really split the data
        assert cli.main(["ingest", "merge", *reversed(parts), "--output", str(tmp_path / f"cli{n}")]) == 0
        for where, m in ((out, merged), (str(tmp_path / f"cli{n}"), read_manifest(str(tmp_path / f"cli{n}")))):
            assert (m.samples_in, m.samples_out, m.captions_out, m.rejected) == (
                single.samples_in, single.samples_out, single.captions_out, single.rejected), (n, where)
            assert (m.source, m.config, m.extra) == (single.source, single.config, single.extra)
            assert _dataset_content(where) == expected, (n, where)
            assert check_shards(where, m, sha256=True) == []
            assert sorted(p.name for p in Path(where).iterdir()) == [MANIFEST_NAME, REJECTED_NAME] + [
                s.path for s in m.shards]  # no scratch directory left
        # a re-run with the same N is byte-identical
        again = ingest_parts.run_workers(ingest.run, cfg, src, str(tmp_path / f"again{n}"), n, progress=False).manifest
        assert again.to_json() == merged.to_json()


def test_merge_refuses_incomplete_or_mixed_parts(tmp_path, capsys):
    src = "toyweb://?n=20&seed=5"
    for n in (2, 3):
        for i in range(n):
            ingest.run(_cfg(), src, str(tmp_path / f"{n}-{i}"), progress=False, part=(i, n))
    ingest.run(_cfg(), src, str(tmp_path / "whole"), progress=False)
    ingest.run(_cfg("ingest.resolution=32"), src, str(tmp_path / "other-1"), progress=False, part=(1, 2))
    cases = [([f"{tmp_path}/2-0"], "parts 1 of 2 are missing"),
             ([f"{tmp_path}/2-0", f"{tmp_path}/2-0"], "part 0 given twice"),
             ([f"{tmp_path}/2-0", f"{tmp_path}/3-1"], "different --parts"),
             ([f"{tmp_path}/2-0", f"{tmp_path}/other-1"], "parts of different sources or settings"),
             ([f"{tmp_path}/whole"], "not an ingest part"),
             ([f"{tmp_path}/2-0", f"{tmp_path}/2-1/"], "is one of the parts"),
             ([f"{tmp_path}/2-0", f"{tmp_path}/2-1"], "shard-000000.tar missing")]
    (tmp_path / "2-1" / "shard-000000.tar").rename(tmp_path / "2-1" / "moved.tar")  # the last case: damaged part
    for parts, message in cases:
        out = str(tmp_path / ("2-1" if message == "is one of the parts" else "out"))
        assert cli.main(["ingest", "merge", *parts, "--output", out]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert (tmp_path / "2-1" / MANIFEST_NAME).exists()  # a part named as the output is left alone
    for args, message in ((["--part", "2", "--parts", "2"], "--part must be in 0..1"), (["--part", "0"], "go together"),
                          (["--part", "0", "--parts", "2", "--workers", "2"], "exclude each other"),
                          (["--workers", "0"], "--workers must be in")):
        assert cli.main(["ingest", "--source", src, "--output", str(tmp_path / "o"), *args]) == 2
        assert message in capsys.readouterr().err


def test_parts_on_s3_merge_with_server_side_copies(s3_bucket, tmp_path):
    src = "toyweb://?n=30&noise=0.5&seed=6"
    cfg = _cfg("ingest.shard_size=7")
    ref = ingest.run(cfg, src, str(tmp_path / "ref"), progress=False).manifest
    parts = [f"s3://{s3_bucket}/parts/{i}" for i in range(2)]
    for i, p in enumerate(parts):
        ingest.run(cfg, src, p, progress=False, part=(i, 2))
    out = f"s3://{s3_bucket}/merged"
    assert cli.main(["ingest", "merge", *parts, "--output", out]) == 0
    m = read_manifest(out)
    assert (m.samples_in, m.samples_out, m.rejected) == (ref.samples_in, ref.samples_out, ref.rejected)
    assert _dataset_content(out) == _dataset_content(str(tmp_path / "ref"))
    # --workers with an s3 output: parts in a local scratch directory, uploaded by the merge
    assert cli.main(["ingest", "--source", src, "--output", f"s3://{s3_bucket}/workers", "--workers", "2",
                     "--set", "ingest.shard_size=7", "--no-progress"]) == 0
    assert _dataset_content(f"s3://{s3_bucket}/workers") == _dataset_content(str(tmp_path / "ref"))


def test_parallel_ingest_of_vqa_data_keeps_questions_and_the_answer_list(tmp_path):
    """VQA samples (an image with its questions, no caption) split by their questions: the merged data set has
    the same samples, question counts and answer_list.json (from the parts' summed answer counts) as one run."""
    from blip_core.data.webdataset_io import ANSWER_LIST_NAME
    from components import ingest_parts

    src = "toyweb://?split=vqa_train&n=40&seed=2&size=32"
    cfg = _cfg("ingest.resolution=32")
    single = ingest.run(cfg, src, str(tmp_path / "n1"), progress=False).manifest
    assert single.extra["questions_out"] > single.samples_out > 0
    expected = _dataset_content(str(tmp_path / "n1"))
    answers = (tmp_path / "n1" / ANSWER_LIST_NAME).read_text()
    for n in (2, 3):
        out = tmp_path / f"w{n}"
        merged = ingest_parts.run_workers(ingest.run, cfg, src, str(out), n, progress=False).manifest
        assert (merged.samples_out, merged.rejected, merged.extra) == (single.samples_out, single.rejected,
                                                                       single.extra)
        assert sum(s.questions for s in merged.shards) == single.extra["questions_out"]
        assert _dataset_content(str(out)) == expected
        assert (out / ANSWER_LIST_NAME).read_text() == answers


def test_a_new_kind_of_source_is_one_subclass(tmp_path):
    """Defining a Source subclass registers it: ingest, its parts and the fingerprint then read its URIs."""
    from components.ingest_parts import merge
    from components.sources import SOURCES, RawSample, Source, source_class

    class Numbered(Source):
        name = "numbered-test"

        def __init__(self, n: int) -> None:
            self.n = self.total = n

        @classmethod
        def matches(cls, uri: str) -> bool:
            return uri.startswith("numbered://")

        @classmethod
        def open(cls, uri, cfg):
            return cls(int(uri.removeprefix("numbered://")))

        @classmethod
        def listing(cls, uri, image_root=""):
            return [(uri, 0, "v1")]

        def iter_samples(self):
            for i in range(self.n):  # sample 3 repeats sample 2: a duplicate
                j = 2 if i == 3 else i
                yield RawSample(f"n{i}", "numbered", _jpeg(j), f"picture number {j}")

    try:
        assert source_class("numbered://5") is Numbered and source_class(str(tmp_path)) is ingest.ShardSource
        m = ingest.run(_cfg("ingest.shard_size=2"), "numbered://5", str(tmp_path / "one"), progress=False).manifest
        assert (m.samples_in, m.samples_out, m.rejected) == (5, 4, {"duplicate": 1})
        parts = [str(tmp_path / f"p{i}") for i in range(2)]
        for i, p in enumerate(parts):
            ingest.run(_cfg("ingest.shard_size=2"), "numbered://5", p, progress=False, part=(i, 2))
        merged = merge(parts, str(tmp_path / "merged"))
        assert (merged.manifest.samples_out, merged.manifest.rejected) == (4, {"duplicate": 1})
        assert ingest.source_fingerprint("numbered://5") != ingest.source_fingerprint("numbered://6")
    finally:
        SOURCES.remove(Numbered)
    assert source_class("numbered://5") is ingest.ShardSource  # gone again: read as a shard directory
