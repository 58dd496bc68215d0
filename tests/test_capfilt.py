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

from blip_core import build_model, model_preset, save_model_dir
from blip_core.capfilt import choose_threshold, decide, filter_batch, filter_scores, threshold_for_share
from blip_core.config import load_config
from blip_core.data.loader import make_loader
from blip_core.data.splits import load_eval_split
from blip_core.data.webdataset_io import iter_shard, read_manifest
from blip_core.errors import UserError
from blip_core.generation import itm_scores
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
    save_model_dir(d, build_model(model_preset("tiny"), vocab_size=len(tok)), tok)
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


def test_choose_threshold_hand_worked():
    scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
    wrong = [True, True, False, True, False, False]
    # dropped below 0.15: P 1 R 1/3; 0.25: P 1 R 2/3; 0.35: P 2/3 R 2/3; 0.5: P 3/4 R 1; 0.7: P 3/5 R 1
    c = choose_threshold(scores, wrong, 0.9)
    assert c.threshold == pytest.approx(0.25) and c.met
    assert (c.precision, c.recall, c.dropped, c.samples, c.wrong) == (1.0, pytest.approx(2 / 3), 2, 6, 3)
    c = choose_threshold(scores, wrong, 0.75)
    assert c.threshold == pytest.approx(0.5) and c.recall == 1.0 and c.precision == 0.75
    # recall 1 at 0.5, 0.7 and above 0.8 (all precise enough for 0.5): the lowest threshold keeps the most
    assert choose_threshold(scores, wrong, 0.5).threshold == pytest.approx(0.5)
    # order of the input does not matter
    assert choose_threshold(scores[::-1], wrong[::-1], 0.9) == choose_threshold(scores, wrong, 0.9)
    # the chosen threshold drops exactly what it reports (decide keeps score >= threshold)
    assert sum(not decide(s, c.threshold) for s in scores) == c.dropped


def test_choose_threshold_ties_unreachable_target_and_no_wrong():
    # equal scores fall together: below 0.35 drops both 0.2s (P 1/2 R 1/2); above 0.5 drops all (P 2/3 R 1)
    c = choose_threshold([0.2, 0.2, 0.5], [True, False, True], 0.9)
    assert not c.met and c.precision == pytest.approx(2 / 3) and c.recall == 1.0 and c.threshold > 0.5
    c = choose_threshold([0.3, 0.7], [False, False], 0.9)
    assert (c.dropped, c.recall, c.precision, c.met) == (0, 0.0, None, False)
    assert all(decide(s, c.threshold) for s in (0.3, 0.7))
    for args in (([0.1], [True, False], 0.9), ([], [], 0.9), ([0.1], [True], 0.0), ([0.1], [True], 1.5)):
        with pytest.raises(ValueError):
            choose_threshold(*args)


def test_calibrated_threshold_is_chosen_on_the_sample_and_used(tiny_ckpt, toy_data, web_three_shards, tmp_path,
                                                               no_tracking):
    calib = web_three_shards  # labelled toy-web pairs (another seed than the web data)
    cfg = load_config(None, CAPFILT + ["capfilt.target_precision=0.6"])
    out = tmp_path / "cf"
    res = capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [toy_data["web"]], [], str(out), calibration=[calib],
                      progress=False)
    # The same choice, made by hand from the filter's scores of the calibration sample.
    models = capfilt._Models(tiny_ckpt, tiny_ckpt, torch.device("cpu"))
    split = load_eval_split(calib, 32)
    scores = [s for i in range(len(split.samples))
              for s in filter_batch(models.filter, models.filter_tokenizer, split.images[i:i + 1],
                                    [[split.texts[j] for j in split.img2txt[i]]])[0]]
    wrong = [bool(split.samples[i].get("noise")) for i in split.txt2img]
    assert 0 < sum(wrong) < len(wrong)
    expect = choose_threshold(scores, wrong, 0.6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold_source"] == "calibration" and res.threshold_source == "calibration"
    assert summary["threshold"] == pytest.approx(expect.threshold, abs=1e-6) == res.threshold
    cal = summary["calibration"]
    assert (cal["captions"], cal["wrong"], cal["dropped"], cal["met"]) == (
        len(scores), sum(wrong), expect.dropped, expect.met)
    assert cal["target_precision"] == 0.6 and cal["data"] == [calib] and res.calibration == cal
    # Every web caption was decided with that threshold.
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    decided = [p for p in prov if p["source"] in ("web", "synthetic")]
    assert len(decided) == 128
    assert all(p["kept"] == (p["itm_score"] >= res.threshold) for p in decided
               if abs(p["itm_score"] - res.threshold) > 1e-5)

    # A sample without any caption labelled wrong cannot calibrate: a clear error, nothing written.
    with pytest.raises(UserError, match="no caption labelled wrong"):
        capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [toy_data["web"]], [], str(tmp_path / "bad"),
                    calibration=[toy_data["human"]], progress=False)
    assert not (tmp_path / "bad" / "manifest.json").exists()
    with pytest.raises(UserError, match="target_precision"):
        capfilt.run(load_config(None, CAPFILT + ["capfilt.target_precision=0"]), tiny_ckpt, tiny_ckpt,
                    [toy_data["web"]], [], str(tmp_path / "bad2"), calibration=[calib], progress=False)


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


def _multi_caption_web(directory: Path) -> dict[str, list[str]]:
    """A web dataset whose images carry 1-3 web captions each (written by the project's DatasetWriter)."""
    import io
    import random

    from blip_core.data import toyweb, toyweb_scenes
    from blip_core.data.webdataset_io import DatasetWriter, LocalSink

    rng = random.Random(5)
    writer = DatasetWriter(LocalSink(directory), shard_size=4)
    captions = {}
    for i in range(6):
        scene = toyweb_scenes.sample_scene(rng)
        buf = io.BytesIO()
        toyweb_scenes.render_scene(scene, 32, texture_seed=i).save(buf, format="PNG")
        caps = [toyweb.web_caption(scene, rng), toyweb.unrelated_caption(scene, rng),
                toyweb.boilerplate_caption(rng)][: 1 + i % 3]
        captions[f"img{i}"] = caps
        writer.add(f"img{i}", buf.getvalue(), "png", {"image_id": f"img{i}", "captions": caps, "noise": None})
    writer.finish(6, "test")
    return captions


def test_every_web_caption_of_an_image_is_scored_and_decided_on_its_own(tiny_ckpt, tmp_path, no_tracking):
    web = _multi_caption_web(tmp_path / "web")
    assert sum(len(c) >= 2 for c in web.values()) == 4
    n_web = sum(map(len, web.values()))

    def run(threshold, out):
        cfg = load_config(None, CAPFILT + [f"capfilt.threshold={threshold}", "capfilt.batch_size=4"])
        res = capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [str(tmp_path / "web")], [], str(out), progress=False)
        prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
        outputs = {s["__key__"]: json.loads(s["json"]) for shard in read_manifest(str(out)).shards
                   for s in iter_shard(str(out / shard.path))}
        return res, prov, outputs

    # Keep everything: each web caption is in the provenance once and in the output.
    res, prov, outputs = run(0.0, tmp_path / "all")
    web_prov = [p for p in prov if p["source"] == "web"]
    assert sorted((p["key"], p["caption"]) for p in web_prov) == sorted((k, c) for k, cs in web.items() for c in cs)
    assert all(isinstance(p["itm_score"], float) and p["kept"] for p in web_prov)
    assert res.texts_in["web"] == res.texts_out["web"] == n_web
    for key, caps in web.items():
        assert outputs[key]["captions"][: len(caps)] == caps
        assert [d["source"] for d in outputs[key]["capfilt"]] == ["web"] * len(caps) + ["synthetic"]

    # A threshold between two web scores of one image: its captions are kept or dropped each by its own score.
    by_image = {k: sorted(p["itm_score"] for p in web_prov if p["key"] == k) for k in web}
    low, high = max(((s[0], s[-1]) for s in by_image.values() if len(s) >= 2), key=lambda lh: lh[1] - lh[0])
    assert high - low > 1e-4, by_image
    threshold = (low + high) / 2
    res, prov, outputs = run(threshold, tmp_path / "half")
    web_prov = [p for p in prov if p["source"] == "web"]
    assert len(web_prov) == n_web
    assert all(p["kept"] == (p["itm_score"] >= threshold) for p in web_prov)
    assert res.texts_in["web"] == n_web and res.texts_out["web"] == sum(p["kept"] for p in web_prov)
    mixed = [k for k in web if len({p["kept"] for p in web_prov if p["key"] == k}) == 2]
    assert mixed, "no image with one web caption kept and another dropped"
    for key in web:
        kept = [p["caption"] for p in prov if p["key"] == key and p["kept"]]
        if kept:
            assert outputs[key]["captions"] == kept
        else:
            assert key not in outputs


def test_web_shard_damaged_after_opening_stops_capfilt_naming_it(tiny_ckpt, tmp_path, no_tracking):
    """Sizes match the manifest (so opening passes), but the tail was zeroed: fewer samples than recorded."""
    from blip_core.data.samples import ShardLost

    web = str(tmp_path / "web")
    ingest.run(load_config(None, ["ingest.resolution=32", "ingest.shard_size=10"]),
               "toyweb://?split=web&n=20&seed=2&size=32", web, progress=False)
    shard = tmp_path / "web" / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:3000] + bytes(len(data) - 3000))
    cfg = load_config(None, CAPFILT)
    with pytest.raises(ShardLost, match=r"shard-000001\.tar: \d samples read, the manifest says 10"):
        capfilt.run(cfg, tiny_ckpt, tiny_ckpt, [web], [], str(tmp_path / "cf"), progress=False)


def test_threshold_for_share_hand_worked():
    scores = [0.3, 0.9, 0.1, 0.5, 0.7]  # sorted: 0.9 0.7 0.5 0.3 0.1
    assert threshold_for_share(scores, 2) == pytest.approx(0.6)  # keeps 0.9 and 0.7
    assert threshold_for_share(scores, 4) == pytest.approx(0.2)
    assert threshold_for_share(scores, 5) == 0.1  # keeps everything
    top = threshold_for_share(scores, 0)
    assert top > 0.9 and not decide(0.9, top)  # drops everything
    for keep in range(6):
        assert sum(decide(s, threshold_for_share(scores, keep)) for s in scores) == keep
    # A tie across the cut is kept whole: asked for 2 of (0.9, 0.5, 0.5, 0.1), the filter keeps 3.
    tied = [0.5, 0.9, 0.1, 0.5]
    assert threshold_for_share(tied, 2) == pytest.approx(0.3)
    assert sum(decide(s, threshold_for_share(tied, 2)) for s in tied) == 3
    assert threshold_for_share([0.4, 0.4], 1) == 0.4
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            threshold_for_share(scores, bad)
    with pytest.raises(ValueError):
        threshold_for_share([], 0)


def test_filter_scores_itc_cosine_is_the_retrieval_cosine():
    """filter_scores' ITC cosine of each pair is what generation.itm_scores computes for it on its own, and its
    ITM scores are filter_batch's."""
    torch.manual_seed(0)
    tok = BlipTokenizer.from_corpus(["a red circle", "two blue squares", "a green triangle"], 100)
    model = build_model(model_preset("tiny"), vocab_size=len(tok)).eval()
    images = torch.randn(2, 3, 32, 32)
    texts = [["a red circle", "two blue squares"], ["a green triangle"]]
    itm, itc = filter_scores(model, tok, images, texts)
    assert itm == filter_batch(model, tok, images, texts)
    for i, group in enumerate(texts):
        prob, cos = itm_scores(model, tok, images[i], group)
        assert itc[i] == pytest.approx(cos.tolist(), abs=1e-5)
        assert itm[i] == pytest.approx(prob.tolist(), abs=1e-5)
    assert len({round(c, 4) for g in itc for c in g}) == 3  # three different pairs, three cosines


def test_evaluate_compares_the_filter_with_an_itc_filter_at_the_same_share(tiny_ckpt, toy_data, web_three_shards,
                                                                          tmp_path, no_tracking):
    """A small real CapFilt run (calibrated threshold) records each web caption's ITC cosine; evaluate puts the
    ITC-cosine filter that keeps as many web captions next to the ITM filter."""
    from components import evaluate

    out = tmp_path / "cf"
    capfilt.run(load_config(None, CAPFILT + ["capfilt.target_precision=0.6"]), tiny_ckpt, tiny_ckpt,
                [toy_data["web"]], [], str(out), calibration=[web_three_shards], progress=False)
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    web = [p for p in prov if p["source"] == "web"]
    assert len(web) == 64 and all(isinstance(p["itc_cosine"], float) for p in prov if p["source"] != "human")
    # The recorded cosine is the filter's ITC cosine of that image and caption.
    models = capfilt._Models(tiny_ckpt, tiny_ckpt, torch.device("cpu"))
    split = load_eval_split(toy_data["web"], 32)
    i = next(n for n, s in enumerate(split.samples) if s["__key__"] == web[0]["key"])
    _, cos = itm_scores(models.filter, models.filter_tokenizer, split.images[i], [web[0]["caption"]])
    assert web[0]["itc_cosine"] == pytest.approx(cos.item(), abs=1e-5)

    ev = evaluate.run(load_config(None, ["model.preset=tiny", "evaluate.k_test=4", "evaluate.batch_size=8",
                                         "evaluate.log_samples=0"]),
                      {"m": tiny_ckpt}, toy_data["test"], str(tmp_path / "eval"), capfilt=str(out))
    itm, itc = ev.metrics["filter"], ev.metrics["filter_itc"]
    kept = sum(p["kept"] for p in web)
    assert itc["itm_kept"] == kept == itm["web_captions"] - itm["dropped"] and itc["kept"] == kept
    # By hand: drop all but the `kept` web captions of highest cosine.
    ranked = sorted(web, key=lambda p: p["itc_cosine"], reverse=True)
    dropped = ranked[kept:]
    noisy = [p for p in web if p["noise"]]
    tp = sum(bool(p["noise"]) for p in dropped)
    assert itc["dropped"] == len(dropped) and itc["noisy_dropped"] == tp
    if dropped:
        assert itc["precision"] == pytest.approx(tp / len(dropped))
    assert itc["recall"] == pytest.approx(tp / len(noisy))
    for kind in {p["noise"] for p in noisy}:
        assert itc[kind]["dropped"] == sum(p["noise"] == kind for p in dropped)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["filter_itc"]["recall"] == pytest.approx(itc["recall"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## ITM filter against an ITC-cosine filter at the same kept share" in md
    assert f"the ITM filter kept {kept};" in md
    row = next(line for line in md.splitlines() if line.startswith("| all noise | ") and "ITC" not in line
               and line.count("|") == 7)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == str(len(noisy)) and cells[5] == f"{itc['recall']:.3f}"
    assert (tmp_path / "eval" / "report.html").read_text().count("<table>") == 4
