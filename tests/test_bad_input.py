"""Bad input gets one clear line and exit code 2; credentials never leave the process; untrusted images and
requests cannot read server files or exhaust memory.

The table of malformed ``blip`` invocations below is the one shown in docs/user-guide.md ("When something is
wrong"); every row runs through the real CLI entry point.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from toy_data import TINY

from blip_core import build_model, load_model_dir, model_preset, save_model_dir
from blip_core.errors import UserError
from blip_core.images import ImageTooLarge, open_rgb
from blip_core.redact import install_log_redaction, redact
from blip_core.tokenizer import BlipTokenizer
from components.cli import main as blip

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red cube on a wooden table", "two blue balls next to a green box", "a yellow cat sitting on a mat",
            "a small dog running on the grass", "a picture of a white cup", "three red apples in a basket"]
SECRET = "s3cr3t-Tok3n"
SIGNATURE = "f00dfacecafe"


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of ``width x height`` zeros: kilobytes on disk, huge once decoded."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint, one whose tokenizer is larger than its vocabulary, and good and bad input files."""
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    tok = BlipTokenizer.from_corpus(CAPTIONS * 4, vocab_size=200)
    save_model_dir(root / "ckpt", build_model(model_preset("tiny"), vocab_size=len(tok)), tok)
    big_tok = BlipTokenizer.from_corpus(CAPTIONS * 4 + [f"word{i} extra{i}" for i in range(60)], vocab_size=400)
    assert len(big_tok) > len(tok)
    save_model_dir(root / "ckpt-bigtok", build_model(model_preset("tiny"), vocab_size=len(tok)), big_tok)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty").mkdir()
    (root / "bad.yaml").write_text("pretrain: [unclosed\n  lr: 1\n")
    bomb_png(root / "big.png", 12000, 12000)
    return {"ck": str(root / "ckpt"), "bigtok": str(root / "ckpt-bigtok"), "img": str(root / "img.png"),
            "txt": str(root / "notes.txt"), "empty": str(root / "empty"), "badyaml": str(root / "bad.yaml"),
            "big": str(root / "big.png"), "missing": str(root / "missing"), "out": str(root / "out")}


# --------------------------------------------------------------------------------------------------
# The bad-input table: invocation -> a part of the one-line message
# --------------------------------------------------------------------------------------------------

BAD_INPUT = [
    ("pretrain --data {missing} --output {out} --set pretrain.lr=fast", "pretrain.lr: expected a number"),
    ("pretrain --data {missing} --output {out} --set pretrain.nosuch=1", "pretrain.nosuch: unknown key"),
    ("pretrain --data {missing} --output {out} --set pretrain.lr", "expected key=value"),
    ("pretrain --data {missing} --output {out} --set model.preset=huge", "unknown preset 'huge'"),
    ("pretrain --data {missing} --output {out} --set pretrain.batch_size=0", "pretrain.batch_size: 0 is out of range"),
    ("pretrain --data {missing} --output {out} --set pretrain.lr=-1", "pretrain.lr: -1.0 is out of range (must be > 0)"),
    ("pretrain --data {missing} --output {out} --set model.vision.width=33",
     "model.vision.width: 33 is not divisible by model.vision.heads"),
    ("pretrain --data {missing} --output {out} --set model.preset=tiny --set model.vision.image_size=7",
     "model.vision.patch_size: 8 is larger than model.vision.image_size (7)"),
    ("ingest --source toyweb://?split=web --output {out} --set ingest.resolution=-3",
     "ingest.resolution: -3 is out of range"),
    ("pretrain --data {missing} --output {out} --set model.preset=tiny", "no manifest.json"),
    ("pretrain --data {missing} --output {out} --config {missing}.yaml", "config file not found"),
    ("pretrain --data {missing} --output {out} --config {badyaml}", "not valid YAML at line"),
    ("pretrain --output {out}", "the following arguments are required: --data"),
    ("finetune --task nosuch --init {ck} --data {missing} --output {out}", "invalid choice: 'nosuch'"),
    ("finetune --task captioner --init {missing} --data {missing} --output {out} --set model.preset=tiny",
     "checkpoint directory not found"),
    ("ingest --source {missing} --output {out}", "source not found"),
    ("ingest --source ftp://user:" + SECRET + "@host/x --output {out}", "source not found: ftp://user:***@host/x"),
    ("ingest --source toyweb://?split=nosuch --output {out}", "split must be one of"),
    ("ingest --source s3://ab/x --output {out}", "bucket name must have at least 3 characters"),
    ("caption --checkpoint {ck} {txt}", "cannot read image"),
    ("caption --checkpoint {ck} {missing}.png", "no such file"),
    ("caption --checkpoint {ck} {big}", "144.0 megapixels, more than the limit"),
    ("caption --checkpoint {missing} {img}", "checkpoint directory not found"),
    ("caption --checkpoint {empty} {img}", "is not a blip_core checkpoint"),
    ("caption --checkpoint {img} {img}", "is not a directory"),
    ("caption --checkpoint {bigtok} {img}", "tokens but the model's vocabulary has"),
    ("caption --checkpoint {ck} {img} --decoding foo", "argument --decoding: invalid choice"),
    ("caption --checkpoint {ck} {img} --num-beams 0", "--num-beams must be >= 1"),
    ("caption --checkpoint {ck} {img} --num-beams x", "invalid int value: 'x'"),
    ("caption --checkpoint {ck} {img} --top-p 2", "--top-p must be in (0, 1]"),
    ("caption --checkpoint {ck} {img} --decoding nucleus --temperature 0", "--temperature must be > 0"),
    ("caption --checkpoint {ck} {img} --min-length 50", "--min-length must be between 0 and --max-length"),
    ("caption --checkpoint {ck} {img} --max-length 2 --min-length 0", "max_length 2 must exceed the prompt length"),
    ("caption --checkpoint {ck} {img} --device nosuch", "--device 'nosuch'"),
    ("itm --checkpoint {ck} {img} ''", "TEXT 1 is empty"),
    ("itm --checkpoint {ck} {img}", "the following arguments are required: TEXT"),
    ("itm --checkpoint {ck} {txt} 'a cat'", "cannot read image"),
    ("ingest --source toyweb://?split=web&n=2&size=32 --output {txt}", "notes.txt: File exists"),
    ("evaluate --model bad --test {missing} --output {out}", "--model expects NAME=URI, got 'bad'"),
    ("capfilt --captioner {missing} --filter {ck} --web {missing} --output {out} --set model.preset=tiny",
     "checkpoint directory not found"),
    ("register --model {ck} --metrics {missing}.json --candidate x", "evaluate metrics not found"),
    ("convert --from hf {missing} --to {out}", "not a Hugging Face model directory"),
    ("convert --from official {txt} --to {out}", "cannot read as a PyTorch checkpoint (not a weights-only"),
    ("pipeline nosuch", "argument command: invalid choice: 'nosuch'"),
    ("nosuchcommand", "unknown command 'nosuchcommand'"),
]


def _argv(invocation: str, files: dict[str, str]) -> list[str]:
    import shlex

    return [a.format(**files) for a in shlex.split(invocation)]


@pytest.mark.parametrize(("invocation", "message"), BAD_INPUT, ids=[row[0][:60] for row in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(invocation, message, files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BLIP_TRACKING", "0")
    try:
        code = blip(_argv(invocation, files))
    except SystemExit as e:  # argparse exits from inside the stage's main
        code = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("blip") and "error:" in lines[0], lines[0]
    assert message in lines[0], lines[0]
    assert SECRET not in captured.err + captured.out


# --------------------------------------------------------------------------------------------------
# Credentials in URIs (redacted wherever they are logged, written or printed)
# --------------------------------------------------------------------------------------------------


def test_redact_masks_userinfo_and_signed_query_values():
    signed = (f"https://bucket.example.com/a.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F{SECRET}"
              f"&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token={SECRET}&n=3#frag")
    out = redact(signed)
    assert SECRET not in out and SIGNATURE not in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "&n=3#frag" in out
    assert redact(f"https://user:{SECRET}@host:8443/p") == "https://user:***@host:8443/p"
    assert redact(f"https://{SECRET}@github.com/x.git") == "https://***@github.com/x.git"
    assert redact(f"blob?sv=1&sig={SIGNATURE}") == f"blob?sv=1&sig={SIGNATURE}"  # not a URI: left alone
    text = f"cannot read 'https://u:{SECRET}@h/x?token={SECRET}': 404"
    assert redact(text) == "cannot read 'https://u:***@h/x?token=***': 404"
    nested = {"sources": {"web": f"s3://b/p?sig={SIGNATURE}", "list": [f"http://a:{SECRET}@b"]}, "n": 3}
    assert SECRET not in json.dumps(redact(nested)) and SIGNATURE not in json.dumps(redact(nested))
    for plain in ("toyweb://?split=web&n=3000&noise=0.3&seed=0", "s3://bucket/key", "sqlite:////tmp/m.db",
                  "/local/path", "a picture of "):
        assert redact(plain) == plain
    assert redact(redact(signed)) == redact(signed)


@pytest.fixture
def restore_log_records():
    previous = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(previous)


def test_log_records_are_redacted(caplog, restore_log_records):
    install_log_redaction()
    install_log_redaction()  # twice is once
    log = logging.getLogger("blip.test")
    with caplog.at_level(logging.INFO, logger="blip.test"):
        log.info("reading %s (%d tries)", f"https://u:{SECRET}@h/x?sig={SIGNATURE}", 3)
        log.warning(f"cannot open https://{SECRET}@h/y")
        log.info("from %(src)s", {"src": f"s3://b/k?X-Amz-Credential={SECRET}"})
    assert SECRET not in caplog.text and SIGNATURE not in caplog.text
    assert "https://u:***@h/x?sig=*** (3 tries)" in caplog.text and "X-Amz-Credential=***" in caplog.text


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p.relative_to(root)))
    return hits


def test_credentials_in_config_are_not_written(toy_data, tmp_path, monkeypatch, capsys):
    """A URI with a password and a signed query, given with --set, reaches no MLflow param, config.json,
    checkpoint, manifest or output: every byte under the working directory is searched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    for name in ("BLIP_PARENT_RUN_ID", "BLIP_TRACKING", "RANK", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    web = f"https://user:{SECRET}@data.example.com/web.jsonl?X-Amz-Signature={SIGNATURE}"
    sets = sum((["--set", s] for s in TINY + ["pretrain.max_steps=2", "pretrain.checkpoint_every=1",
                                              f"sources.web={web}"]), [])
    assert blip(["pretrain", "--data", toy_data["human"], "--output", str(tmp_path / "pre"), *sets]) == 0
    assert blip(["ingest", "--source", "toyweb://?split=web&n=8&size=32", "--output", str(tmp_path / "ds"),
                 "--set", f"ingest.source={web}"]) == 0
    out = capsys.readouterr()

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stage = [r for r in runs if r.data.params.get("section") == "pretrain"]
    assert stage and stage[0].data.params["sources.web"] == \
        "https://user:***@data.example.com/web.jsonl?X-Amz-Signature=***"
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert "user:***@data.example.com" in json.dumps(manifest)
    assert list((tmp_path / "pre").rglob("config.json")), "no config.json written beside the checkpoints"
    assert _files_containing(tmp_path, SECRET) == [] and _files_containing(tmp_path, SIGNATURE) == []
    assert SECRET not in out.out + out.err


# --------------------------------------------------------------------------------------------------
# Images: a pixel limit before decoding; the served model reads no files
# --------------------------------------------------------------------------------------------------


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    big = bomb_png(tmp_path / "big.png", 12000, 12000)
    assert big.stat().st_size < 100_000  # small on disk: 144 megapixels once decoded
    with pytest.raises(ImageTooLarge, match=r"12000x12000 = 144.0 megapixels"):
        open_rgb(big)
    with pytest.raises(ImageTooLarge, match="too large"):  # past PIL's own bomb limit too
        open_rgb(bomb_png(tmp_path / "huge.png", 20000, 20000).read_bytes())
    assert open_rgb(big, max_pixels=10**9).size == (12000, 12000)  # the limit is the only thing refusing it


@pytest.fixture(scope="module")
def served(files):
    """The MLflow pyfunc model class, loaded the way MLflow loads it (load_context with the artifact)."""
    from components.tracking.mlflow_model import BlipPyfunc

    model = BlipPyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": files["ck"]}, model_config={"device": "cpu"}))
    return model


def test_served_model_reads_no_server_files(served, files, tmp_path):
    import pandas as pd

    image_b64 = base64.b64encode(Path(files["img"]).read_bytes()).decode()
    ok = served.predict(None, pd.DataFrame({"image": [image_b64, Path(files["img"]).read_bytes()]}))
    assert ok["caption"].map(lambda c: isinstance(c, str)).all()
    # an existing image path, a file URI and a missing path all get the same refusal: no read, no oracle
    for value in (files["img"], f"file://{files['img']}", str(tmp_path / "absent.png")):
        with pytest.raises(ValueError, match=r"row 0: image is not base64-encoded image bytes"):
            served.predict(None, pd.DataFrame({"image": [value]}))


def test_served_model_refuses_decompression_bombs(served, files):
    import pandas as pd

    payload = base64.b64encode(Path(files["big"]).read_bytes()).decode()
    with pytest.raises(ValueError, match=r"row 0: image is 12000x12000 = 144.0 megapixels"):
        served.predict(None, pd.DataFrame({"image": [payload]}))


def test_caption_reports_every_bad_image_and_still_captions_the_rest(files, capsys):
    code = blip(["caption", "--checkpoint", files["ck"], files["img"], files["txt"], files["big"]])
    out = capsys.readouterr()
    assert code == 2
    assert out.out.startswith(files["img"] + "\t") and len(out.out.strip().splitlines()) == 1
    errors = out.err.strip().splitlines()
    assert len(errors) == 2 and "cannot read image" in errors[0] and "megapixels" in errors[1]


# --------------------------------------------------------------------------------------------------
# Checkpoints whose tokenizer does not fit the model
# --------------------------------------------------------------------------------------------------


def test_tokenizer_larger_than_vocabulary_is_refused_at_load(files):
    with pytest.raises(UserError, match=r"the tokenizer has \d+ tokens but the model's vocabulary has \d+"):
        load_model_dir(files["bigtok"])
    ckpt = load_model_dir(files["ck"])
    assert len(ckpt.tokenizer) == ckpt.model.cfg.text.vocab_size


# --------------------------------------------------------------------------------------------------
# S3 reads through the dataset reader (the S3 opener): one line, exit 2, like the other storage calls
# --------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pretrain_on_s3(endpoint: str, tmp_path: Path, keys: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "BLIP_"))}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BLIP_TRACKING": "0",
                "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true"})
    if keys:
        env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    return subprocess.run([sys.executable, "-m", "components.cli", "pretrain", "--data", "s3://blip-data/web",
                           "--output", str(tmp_path / "out"), "--set", "model.preset=tiny"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_s3_dataset_without_credentials_is_one_line(s3_server, tmp_path):
    r = _run_pretrain_on_s3(s3_server, tmp_path, keys=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("blip pretrain: error:") and "no AWS credentials found" in lines[0]


@pytest.mark.slow
def test_s3_dataset_on_unreachable_endpoint_is_one_line(tmp_path):
    r = _run_pretrain_on_s3(f"http://127.0.0.1:{_closed_port()}", tmp_path, keys=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "s3://blip-data/web/manifest.json" in lines[0] and "cannot reach the S3 endpoint" in lines[0]
