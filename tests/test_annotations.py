"""Ingest of BLIP's official annotation files: pre-training lists, Karpathy train/val/test, VQA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_core import build_model, model_preset, save_model_dir
from blip_core.config import load_config
from blip_core.data.loader import make_loader
from blip_core.data.splits import load_eval_split
from blip_core.data.toyweb import generate
from blip_core.data.webdataset_io import iter_shard, read_manifest
from blip_core.errors import UserError
from blip_core.tokenizer import BlipTokenizer, pre_caption, pre_question
from components import cli, evaluate, ingest, storage, training

CFG = ["ingest.resolution=32"]


def _cfg(*overrides: str):
    return load_config(None, [*CFG, *overrides])


def _images(root: Path, names: list[str], split: str = "test", seed: int = 1) -> list[list[str]]:
    """Write one generated toy-web image per name under ``root``; returns each image's captions."""
    caps = []
    for name, s in zip(names, generate(f"toyweb://?split={split}&n={len(names)}&seed={seed}&size=32")):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s.jpg)
        caps.append(list(s.json["captions"]))
    return caps


def _write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _samples(out: str) -> list[dict]:
    res = []
    for uri in storage.list_uris(out, ".tar"):
        for s in iter_shard(uri):
            res.append({"key": s["__key__"], "txt": s["txt"].decode(), **json.loads(s["json"])})
    return res


def _rejected(out: str) -> list[dict]:
    return [json.loads(line) for line in Path(out, "rejected.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Caption lists: pre-training files and Karpathy train
# --------------------------------------------------------------------------------------------------


def test_pretrain_list_groups_captions_and_rejects_missing_and_outside(tmp_path):
    images = tmp_path / "images"
    caps = _images(images, ["cc3m/a.jpg", "cc3m/b.jpg", "cc3m/c.jpg"], split="web")
    _images(tmp_path, ["secret.jpg"], split="web", seed=7)  # beside the root, not under it
    ann = _write(tmp_path / "ann" / "cc3m.json", [
        {"image": "cc3m/a.jpg", "caption": "A photo of a dog."},
        {"image": "cc3m/b.jpg", "caption": caps[1][0]},
        {"image": "cc3m/a.jpg", "caption": ["a second caption", "a third"]},
        {"image": "cc3m/missing.jpg", "caption": "not on disk"},
        {"image": "../secret.jpg", "caption": "escapes the root"},
        {"image": str(tmp_path / "secret.jpg"), "caption": "absolute, elsewhere"},
        {"image": str(images / "cc3m/c.jpg"), "caption": "absolute, inside the root"},
    ])
    out = str(tmp_path / "out")
    m = ingest.run(_cfg(f"ingest.image_root={images}"), ann, out, progress=False).manifest
    assert (m.samples_in, m.samples_out) == (6, 3)  # 7 entries, 6 distinct images
    assert m.rejected == {"missing_image": 1, "outside_root": 2}
    by_path = {s["image_path"]: s for s in _samples(out)}
    a = by_path["cc3m/a.jpg"]
    assert a["captions"] == ["a photo of a dog", "a second caption", "a third"] and a["txt"] == "a photo of a dog"
    assert a["image_id"] == "cc3m/a.jpg" and a["source"] == "web" and a["key"] == "cc3m_a"
    assert by_path["cc3m/b.jpg"]["captions"] == [pre_caption(caps[1][0], 30)]
    rej = {r["origin"]: r for r in _rejected(out)}
    assert rej["entry 3"]["reason"] == "missing_image" and "not found" in rej["entry 3"]["detail"]
    assert rej["entry 4"]["reason"] == rej["entry 5"]["reason"] == "outside_root"
    # the opt-in of manifests admits paths outside the root
    m2 = ingest.run(_cfg(f"ingest.image_root={images}", "ingest.allow_paths_outside=true"), ann,
                    str(tmp_path / "out2"), progress=False).manifest
    assert (m2.samples_out, m2.rejected) == (5, {"missing_image": 1})


def test_image_paths_default_to_the_annotation_files_directory(tmp_path):
    _images(tmp_path, ["imgs/x.jpg"])
    ann = _write(tmp_path / "list.json", [{"image": "imgs/x.jpg", "caption": "a caption"}])
    m = ingest.run(_cfg(), ann, str(tmp_path / "out"), progress=False).manifest
    assert (m.samples_in, m.samples_out, m.rejected) == (1, 1, {})


def test_symlink_out_of_the_root_is_refused(tmp_path):
    _images(tmp_path, ["outside/x.jpg"])
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x.jpg").symlink_to(tmp_path / "outside" / "x.jpg")
    ann = _write(tmp_path / "root" / "a.json", [{"image": "x.jpg", "caption": "a caption"}])
    m = ingest.run(_cfg(), ann, str(tmp_path / "out"), progress=False).manifest
    assert m.rejected == {"outside_root": 1}


def test_karpathy_train_one_sample_per_image_one_pair_per_caption(tmp_path):
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(4)]
    caps = _images(tmp_path / "coco", names, split="human")
    entries = [{"image": n, "caption": c, "image_id": f"coco_{i}"} for i, n in enumerate(names) for c in caps[i]]
    ann = _write(tmp_path / "coco_karpathy_train.json", entries)
    out = str(tmp_path / "train")
    m = ingest.run(_cfg("ingest.caption_source=human", f"ingest.image_root={tmp_path / 'coco'}"), ann, out,
                   progress=False).manifest
    assert (m.samples_in, m.samples_out, m.rejected) == (4, 4, {})
    assert m.captions_out == len(entries) == 20
    samples = sorted(_samples(out), key=lambda s: s["image_id"])
    assert [s["image_id"] for s in samples] == [f"coco_{i}" for i in range(4)]
    assert all(s["source"] == "human" and s["captions"] == [pre_caption(c, 30) for c in caps[i]]
               for i, s in enumerate(samples))
    # training expands every caption into a pair, as the official dataset iterates its entries
    tok = BlipTokenizer.from_corpus([c for cs in caps for c in cs], vocab_size=120)
    loader = make_loader([out], tok, image_size=32, batch_size=4, train=True, expand_captions=True)
    assert loader.pairs_per_epoch == 20
    ids = [i for b in loader for i in b["image_id"]]
    assert sorted(ids) == sorted(e["image_id"] for e in entries)


def test_flickr_karpathy_train_integer_image_ids(tmp_path):
    caps = _images(tmp_path / "flickr30k-images", ["1000092795.jpg", "10002456.jpg"], split="human")
    entries = [{"image": f"flickr30k-images/{n}", "caption": c, "image_id": i}
               for i, n in enumerate(["1000092795.jpg", "10002456.jpg"]) for c in caps[i][:2]]
    ann = _write(tmp_path / "flickr30k_train.json", entries)
    out = str(tmp_path / "out")
    m = ingest.run(_cfg(), ann, out, progress=False).manifest
    assert (m.samples_out, m.captions_out) == (2, 4)
    assert sorted(s["image_id"] for s in _samples(out)) == ["0", "1"]  # 0 is an id, not a missing one


# --------------------------------------------------------------------------------------------------
# Karpathy val/test: the evaluation split
# --------------------------------------------------------------------------------------------------


def test_karpathy_test_file_is_an_evaluation_split(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "0")
    torch.set_num_threads(1)
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(6)]
    caps = _images(tmp_path / "coco", names)
    ann = _write(tmp_path / "ann" / "coco_karpathy_test.json",
                 [{"image": n, "caption": c} for n, c in zip(names, caps)])
    out = str(tmp_path / "test")
    rc = cli.main(["ingest", "--source", ann, "--image-root", str(tmp_path / "coco"), "--output", out,
                   "--set", "ingest.resolution=32", "--set", "ingest.caption_source=human", "--no-progress"])
    assert rc == 0 and read_manifest(out).samples_out == 6
    split = load_eval_split(out, 32)
    assert split.texts == [pre_caption(c, 30) for cs in caps for c in cs]
    assert [len(t) for t in split.img2txt] == [len(c) for c in caps]
    assert all(split.txt2img[j] == i for i, js in enumerate(split.img2txt) for j in js)
    assert [s["image_path"] for s in split.samples] == names
    # evaluation runs on it unchanged: retrieval over all captions, captioning against all references
    tok = BlipTokenizer.from_corpus(training.corpus_captions([out], 30), vocab_size=150)
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    ckpt = str(save_model_dir(tmp_path / "model", model, tok))
    cfg = load_config(None, ["model.preset=tiny", "evaluate.k_test=4", "evaluate.batch_size=8",
                             "evaluate.itm_batch_size=16", "evaluate.log_samples=2"])
    evaluate.run(cfg, {"m": ckpt}, out, str(tmp_path / "eval"))
    metrics = json.loads(Path(tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"]["images"] == 6 and metrics["test"]["texts"] == sum(len(c) for c in caps)
    m = metrics["models"]["m"]
    assert all(0.0 <= m[k] <= 100.0 for k in ("tr_r1", "tr_r10", "ir_r1", "ir_r5", "bleu4", "cider"))
    assert m["ir_r10"] == 100.0  # text -> image among 6 images: the right one is always in the top 10


# --------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------


def test_vqa_questions_grouped_by_image_with_an_answer_list(tmp_path):
    _images(tmp_path / "vqa", ["val2014/a.jpg", "val2014/b.jpg"])
    vqa_answers = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    entries = [
        {"question_id": 11, "image": "val2014/a.jpg", "question": "Is the circle red?", "answer": vqa_answers,
         "dataset": "vqa", "answer_type": "yes/no"},
        {"question_id": 13, "image": "val2014/b.jpg", "question": "What color is it?", "answer": "Blue ",
         "dataset": "vg"},
        {"question_id": 12, "image": "val2014/a.jpg", "question": "How many shapes?", "answer": ["2", "3", "2"]},
        {"question_id": 14, "image": "val2014/b.jpg", "question": "What shape is left?"},  # test: no answer
        {"question_id": 16, "image": "val2014/b.jpg", "question": "?!.", "answer": ["x"]},  # empty when cleaned
        {"question_id": 15, "image": "val2014/gone.jpg", "question": "Where?", "answer": ["here"]},
        {"question_id": 17, "image": "val2014/c.jpg", "question": "...", "answer": ["x"]},
    ]
    _images(tmp_path / "vqa", ["val2014/c.jpg"], seed=4)
    ann = _write(tmp_path / "vqa_train.json", entries)
    out = str(tmp_path / "out")
    m = ingest.run(_cfg(f"ingest.image_root={tmp_path / 'vqa'}", "ingest.caption_source=human"), ann, out,
                   progress=False).manifest
    assert (m.samples_in, m.samples_out) == (4, 2)  # one sample per image
    assert m.rejected == {"missing_image": 1, "empty_question": 1}
    assert m.captions_out == 0 and m.extra["questions_out"] == 4 and [s.questions for s in m.shards] == [4]
    assert m.extra["questions_dropped"] == {"empty_question": 1}
    s = {x["image_path"]: x for x in _samples_any(out)}
    a, b = s["val2014/a.jpg"], s["val2014/b.jpg"]
    assert "txt" not in a and a["captions"] == [] and a["key"] == "val2014_a" and a["image_id"] == "val2014/a.jpg"
    assert [q["question_id"] for q in a["questions"]] == ["11", "12"]  # file order, ids as strings
    assert a["questions"][0] == {"question_id": "11", "question": pre_question("Is the circle red?"),
                                 "answers": vqa_answers, "kind": "yes/no", "dataset": "vqa"}
    assert a["questions"][1]["answers"] == ["2", "3", "2"] and "kind" not in a["questions"][1]
    assert b["questions"][0]["answers"] == ["blue"] and b["questions"][0]["dataset"] == "vg"
    assert b["questions"][1]["answers"] == []
    assert b["dropped_questions"] == [{"question_id": "16", "reason": "empty_question",
                                       "detail": "no question left after cleaning"}]
    # every annotator answer counted: yes 7, 2 2, no 2, then the singletons alphabetically
    answer_list = json.loads(Path(out, "answer_list.json").read_text())
    assert answer_list == ["yes", "2", "no", "3", "blue", "maybe"]
    assert json.loads(Path(out, "manifest.json").read_text())["shards"][0]["questions"] == 4


def test_vqa_duplicate_question_id_is_refused(tmp_path):
    _images(tmp_path, ["a.jpg"])
    ann = _write(tmp_path / "v.json", [{"question_id": 1, "image": "a.jpg", "question": "q?"},
                                       {"question_id": "1", "image": "a.jpg", "question": "r?"}])
    with pytest.raises(UserError, match="entry 1: question_id 1 repeats entry 0"):
        ingest.run(_cfg(), ann, str(tmp_path / "o"), progress=False)


def _samples_any(out: str) -> list[dict]:
    res = []
    for uri in storage.list_uris(out, ".tar"):
        for s in iter_shard(uri):
            d = {"key": s["__key__"], **json.loads(s["json"])}
            if "txt" in s:
                d["txt"] = s["txt"].decode()
            res.append(d)
    return res


# --------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, the entry named
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"},", "not valid JSON"),
    ("{\"annotations\": []}", "must be a JSON list"),
    ("{\"images\": [], \"dataset\": \"coco\"}", "Karpathy"),
    ("[]", "empty"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, 3]", "entry 1: not a JSON object"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, {\"image\": \"b.jpg\"}]", "entry 1: missing key 'caption'"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, {\"caption\": \"y\"}]", "entry 1: missing key 'image'"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, {\"image\": \"b.jpg\", \"caption\": [\"y\", 2]}]",
     "entry 1: 'caption' must be"),
    ("[{\"image\": 5, \"caption\": \"x\"}]", "entry 0: 'image' must be"),
    ("[{\"question_id\": 1, \"image\": \"a.jpg\", \"question\": \"q?\"}, {\"image\": \"a.jpg\", \"question\": \"q\"}]",
     "entry 1: missing key 'question_id'"),
    ("[{\"question_id\": 1, \"image\": \"a.jpg\", \"question\": \"q?\", \"answer\": [1]}]",
     "entry 0: 'answer' must be"),
])
def test_malformed_annotation_files_fail_in_one_line(tmp_path, capsys, content, message):
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    out = tmp_path / "out"
    rc = cli.main(["ingest", "--source", str(ann), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_missing_file_and_image_root(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        ingest.run(_cfg(), str(tmp_path / "nope.json"), str(tmp_path / "o"), progress=False)
    ann = _write(tmp_path / "a.json", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(UserError, match="image root not found"):
        ingest.run(_cfg(f"ingest.image_root={tmp_path / 'nope'}"), ann, str(tmp_path / "o"), progress=False)


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def test_annotation_file_and_images_on_s3(tmp_path, s3_bucket):
    _images(tmp_path / "up" / "imgs", ["a.jpg", "b.jpg"])
    _images(tmp_path / "up", ["private/k.jpg"], seed=3)
    storage.upload_dir(tmp_path / "up", f"s3://{s3_bucket}/data")
    ann = f"s3://{s3_bucket}/ann/list.json"
    storage.write_bytes(ann, json.dumps([
        {"image": "a.jpg", "caption": "first"}, {"image": "b.jpg", "caption": ["second", "more"]},
        {"image": "../private/k.jpg", "caption": "escapes"}, {"image": "c.jpg", "caption": "missing"},
    ]).encode())
    out = f"s3://{s3_bucket}/clean"
    m = ingest.run(_cfg(f"ingest.image_root=s3://{s3_bucket}/data/imgs"), ann, out, progress=False).manifest
    assert (m.samples_out, m.rejected) == (2, {"missing_image": 1, "outside_root": 1})
    assert read_manifest(out).captions_out == 3
