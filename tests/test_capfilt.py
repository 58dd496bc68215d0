import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from toy_data import TINY

from blip_core import build_model, model_preset
from blip_core.capfilt import decide, filter_batch
from blip_core.config import load_config
from blip_core.data.loader import make_loader
from blip_core.data.webdataset_io import iter_shard, read_manifest
from blip_core.tokenizer import BlipTokenizer
from components import capfilt, ingest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, toy_data):
    """An untrained tiny model + corpus tokenizer saved as a checkpoint (used as captioner and filter)."""
    from components.training import corpus_captions

    d = tmp_path_factory.mktemp("ckpt") / "model"
    tok = BlipTokenizer.from_corpus(corpus_captions([toy_data["web"], toy_data["human"]], 30), 300)
    torch.manual_seed(0)
    build_model(model_preset("tiny"), vocab_size=len(tok)).save(d, tok)
    return str(d)


@pytest.fixture(scope="module")
def web_three_shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("web3") / "web")
    cfg = load_config(None, ["ingest.resolution=32", "ingest.shard_size=10"])
    ingest.run(cfg, "toyweb://?split=web&n=30&seed=2&size=32", out, progress=False)
    return out


CAPFILT = TINY + ["capfilt.max_length=8", "capfilt.min_length=3", "capfilt.batch_size=8"]


def test_filter_batch_shares_image_kv_and_decides():
    torch.manual_seed(0)
    tok = BlipTokenizer.from_corpus(["a red circle", "two blue squares", "a green triangle"], 100)
    model = build_model(model_preset("tiny"), vocab_size=len(tok)).eval()
    images = torch.randn(2, 3, 32, 32)
    texts = [["a red circle", "two blue squares"], ["a green triangle"]]
    scores = filter_batch(model, tok, images, texts)
    assert [len(s) for s in scores] == [2, 1]
    # Same numbers as scoring each pair on its own.
    for i, group in enumerate(texts):
        for j, t in enumerate(group):
            alone = filter_batch(model, tok, images[i:i + 1], [[t]])[0][0]
            assert alone == pytest.approx(scores[i][j], abs=1e-5)
    assert decide(0.5, 0.5) and not decide(0.4999, 0.5)


def test_every_caption_appears_once_in_provenance(tiny_ckpt, toy_data, tmp_path, no_tracking):
    cfg = load_config(None, CAPFILT + ["capfilt.threshold=0.0"])  # keep everything
    out = tmp_path / "cf"
    res = capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [toy_data["web"]], [toy_data["human"]], str(out), progress=False)
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    by_source = Counter(p["source"] for p in prov)
    assert by_source == {"web": 64, "synthetic": 64, "human": 24 * 5}
    web_keys = [p["key"] for p in prov if p["source"] == "web"]
    assert len(set(web_keys)) == 64  # every web caption exactly once
    wrong = [p for p in prov if p["noise"] == "wrong_attribute"]  # toy-web's labels reach the provenance
    assert wrong and all(p["source"] == "web" and p["noise_detail"] in ("color", "shape") for p in wrong)
    assert all(p["noise"] is None and "noise_detail" not in p for p in prov if p["source"] != "web")
    assert res.texts_in == dict(by_source) and res.texts_out == dict(by_source)
    manifest = read_manifest(str(out))
    manifest.check_counts()
    assert manifest.samples_out == 64 + 24
    # The output is a dataset the training loader reads: web images with 2 captions, human with 5.
    tok = BlipTokenizer.from_dir(Path(tiny_ckpt) / "tokenizer")
    loader = make_loader([str(out)], tok, image_size=32, batch_size=8, train=True, expand_captions=True)
    assert loader.pairs_per_epoch == (64 * 2 + 24 * 5) // 8 * 8
    sample = next(iter_shard(str(out / "capfilt-000000.tar")))
    meta = json.loads(sample["json"])
    assert [d["source"] for d in meta["capfilt"]] == ["web", "synthetic"] and len(meta["captions"]) == 2

    # With the threshold at 1.0 nothing from the web survives; human pairs stay.
    cfg = load_config(None, CAPFILT + ["capfilt.threshold=1.0"])
    res = capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [toy_data["web"]], [toy_data["human"]], str(tmp_path / "none"),
                      progress=False)
    assert res.images_out == 0 and res.texts_out == {"human": 120}
    assert read_manifest(str(tmp_path / "none")).rejected == {"no_caption_kept": 64}


@pytest.mark.slow
def test_kill_and_resume_redoes_only_unfinished_shards(tiny_ckpt, web_three_shards, tmp_path):
    env = {**os.environ, "BLIP_TRACKING": "0", "OMP_NUM_THREADS": "1"}
    sets = sum((["--set", s] for s in CAPFILT + ["capfilt.batch_size=2"]), [])

    def cmd(out):
        return [sys.executable, "-m", "components.capfilt", "--captioner", tiny_ckpt, "--filter", tiny_ckpt,
                "--web", web_three_shards, "--output", str(out), *sets]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_part = out / "parts" / "capfilt-000000.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first_part.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "capfilt finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = sorted(p.name for p in (out / "parts").glob("capfilt-*.json"))
    assert 1 <= len(done_before) < 3
    stamp = {n: (out / "parts" / n).stat().st_mtime_ns for n in done_before}
    subprocess.run(cmd(out), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] == len(done_before) and summary["shards_done"] == 3 - len(done_before)
    assert all((out / "parts" / n).stat().st_mtime_ns == stamp[n] for n in done_before)  # not redone
    for name in ("capfilt-000000.tar", "capfilt-000001.tar", "capfilt-000002.tar", "provenance.jsonl"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    ref_m, out_m = read_manifest(str(ref)), read_manifest(str(out))
    assert [s.sha256 for s in ref_m.shards] == [s.sha256 for s in out_m.shards]
