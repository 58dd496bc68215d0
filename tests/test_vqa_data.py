"""VQA data: toy-web VQA ingest, the answer list, question checks, the VQA loader and the evaluation split."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from blip_core.config import load_config
from blip_core.data import toyweb, toyweb_scenes, toyweb_vqa
from blip_core.data.loader import make_loader
from blip_core.data.samples import answer_weights, read_answer_list, sample_texts
from blip_core.data.splits import load_vqa_split
from blip_core.data.vqa_loader import make_vqa_loader
from blip_core.data.webdataset_io import DatasetWriter, LocalSink, iter_shard, read_manifest
from blip_core.errors import UserError
from blip_core.eval.vqa import majority_answer_baseline, vqa_report
from blip_core.tokenizer import BlipTokenizer
from components import ingest

ARGS = dict(image_size=32, min_scale=0.5)


def _ingest(src: str, out: Path, *overrides: str) -> str:
    ingest.run(load_config(None, ["ingest.resolution=32", *overrides]), src, str(out), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def vqa_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    train = _ingest("toyweb://?split=vqa_train&n=30&seed=1&size=32", root / "train", "ingest.shard_size=7")
    test = _ingest("toyweb://?split=vqa_test&n=12&seed=1&size=32", root / "test")
    return train, test


@pytest.fixture(scope="module")
def tokenizer(vqa_dirs):
    texts = [t for d in vqa_dirs for u in sorted(Path(d).glob("shard-*.tar")) for s in iter_shard(str(u))
             for t in sample_texts(s)]
    return BlipTokenizer.from_corpus(texts, vocab_size=300)


def _stored(uri: str) -> list[dict]:
    return [s for u in sorted(Path(uri).glob("shard-*.tar")) for s in iter_shard(str(u))]


def test_toyweb_vqa_ingest_layout_and_answer_list(vqa_dirs):
    train, _ = vqa_dirs
    m = read_manifest(train)
    assert (m.samples_in, m.samples_out, m.rejected, m.captions_out) == (30, 30, {}, 0)
    assert m.extra["questions_out"] == 120 and [s.questions for s in m.shards] == \
        [s.samples * 4 for s in m.shards]
    generated = {s.key: s.json["questions"] for s in toyweb.generate("toyweb://?split=vqa_train&n=30&seed=1")}
    counts: Counter[str] = Counter()
    for s in _stored(train):
        meta = json.loads(s["json"])
        assert "txt" not in s and meta["captions"] == []
        assert meta["questions"] == generated[s["__key__"]]  # toy questions are already clean
        counts.update(a for q in meta["questions"] for a in q["answers"])
    answers = read_answer_list(train)
    assert answers == sorted(counts, key=lambda a: (-counts[a], a))  # most frequent first
    assert set(answers) <= set(toyweb_vqa.vqa_answer_list())
    with pytest.raises(UserError, match="not a VQA data set"):
        read_answer_list(_ingest("toyweb://?split=test&n=3", Path(train).parent / "captions"))


def _write_raw(path: Path, samples: list[tuple[str, bytes, dict]]) -> str:
    writer = DatasetWriter(LocalSink(path), shard_size=50)
    for key, jpg, meta in samples:
        writer.add(key, jpg, "jpg", meta)
    writer.finish(len(samples), "test")
    return str(path)


def test_question_checks_and_dedupe_keep_different_questions_of_one_image(tmp_path):
    a, b = list(toyweb.generate("toyweb://?split=vqa_train&n=2&seed=3&size=32"))
    q = lambda i, text, answers=("red",): {"question_id": i, "question": text, "answers": list(answers)}  # noqa: E731
    raw = tmp_path / "raw"
    raw.mkdir()
    from blip_core.data.webdataset_io import tar_bytes

    members = {
        "s0": (a.jpg, {"questions": [q("1", "What color is it?")]}),
        "s1": (a.jpg, {"questions": [q("2", "What shape is it?")]}),  # same image, another question: kept
        "s2": (a.jpg, {"questions": [q("1", "What color is it?")]}),  # same image and question: duplicate
        "s3": (b.jpg, {"questions": [q("3", "...?!"), q(4, "Is it BIG?", ["Yes ", " yes", ""])]}),
        "s4": (b.jpg, {"questions": [q("5", "?")]}),  # nothing left: the sample is rejected
        "s5": (b.jpg, {"questions": "not a list"}),
        "s6": (b.jpg, {"questions": [{"question": "no id?"}]}),
    }
    data = tar_bytes([{"__key__": k, "jpg": jpg, "json": json.dumps(meta).encode()}
                      for k, (jpg, meta) in members.items()])
    (raw / "part.tar").write_bytes(data)
    out = _ingest(str(raw), tmp_path / "out")
    m = read_manifest(out)
    assert (m.samples_in, m.samples_out) == (7, 3)
    assert m.rejected == {"duplicate": 1, "empty_question": 1, "bad_metadata": 2}
    assert m.extra["questions_out"] == 3 and m.extra["questions_dropped"] == {"empty_question": 1}
    kept = {s["__key__"]: json.loads(s["json"]) for s in _stored(out)}
    assert sorted(kept) == ["s0", "s1", "s3"]
    assert kept["s3"]["questions"] == [{"question_id": "4", "question": "is it big?", "answers": ["yes", "yes"]}]
    assert kept["s3"]["dropped_questions"][0]["question_id"] == "3"
    rejected = {json.loads(line)["key"]: json.loads(line) for line in Path(out, "rejected.jsonl").read_text().splitlines()}
    assert rejected["s4"]["reason"] == "empty_question" and rejected["s2"]["reason"] == "duplicate"


def test_answer_weights():
    ten = {"answers": ["2"] * 6 + ["two"] * 3 + ["3"]}
    assert answer_weights(ten) == (["2", "two", "3"], pytest.approx([0.6, 0.3, 0.1]))
    assert answer_weights({"answers": ["blue", "navy"], "dataset": "vg"}) == (["blue", "navy"], [0.2, 0.2])
    assert answer_weights({"answers": []}) == ([], [])


def test_vqa_batch_contents(vqa_dirs, tokenizer):
    train, _ = vqa_dirs
    loader = make_vqa_loader([train], tokenizer, batch_size=8, train=False, **ARGS)
    assert len(loader) == 120 // 8
    questions = {q["question_id"]: q for s in _stored(train) for q in json.loads(s["json"])["questions"]}
    for batch in loader:
        B = 8
        assert batch["image"].shape == (B, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["question_ids"].shape == batch["question_mask"].shape and batch["question_ids"].shape[0] == B
        assert (batch["question_ids"][:, 0] == tokenizer.enc_id).all()
        n = batch["n"]
        assert n.dtype == torch.long and n.shape == (B,) and (n >= 1).all()
        assert batch["answer_ids"].shape[0] == batch["answer_mask"].shape[0] == batch["weights"].shape[0] == n.sum()
        assert (batch["answer_ids"][:, 0] == tokenizer.dec_id).all()
        last = batch["answer_mask"].sum(1) - 1  # [DEC] answer [SEP]: the last real token is [SEP]
        assert (batch["answer_ids"].gather(1, last[:, None]).squeeze(1) == tokenizer.sep_id).all()
        per_question = torch.zeros(B).index_add_(0, torch.repeat_interleave(torch.arange(B), n), batch["weights"])
        assert torch.allclose(per_question, torch.ones(B))  # weights sum to 1 per question
        starts = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]])
        for i, qid in enumerate(batch["question_id"]):
            q = questions[qid]
            assert batch["question"][i] == q["question"] and batch["kind"][i] == q["kind"]
            assert tokenizer.decode(batch["question_ids"][i]) == q["question"]
            got = [tokenizer.decode(batch["answer_ids"][j]) for j in range(starts[i], starts[i] + n[i])]
            assert got == list(dict.fromkeys(q["answers"]))
            counts = Counter(q["answers"])
            assert batch["weights"][starts[i]:starts[i] + n[i]].tolist() == \
                pytest.approx([counts[a] / 10 for a in got])


def test_ranks_see_disjoint_questions_and_epochs_are_deterministic(vqa_dirs, tokenizer):
    train, _ = vqa_dirs
    seen = []
    for rank in range(2):
        loader = make_vqa_loader([train], tokenizer, batch_size=4, train=True, rank=rank, world_size=2,
                                 num_workers=2, seed=5, **ARGS)
        assert len(loader) == 2 * ((120 // 4) // 4)  # 4 streams of 30 questions, 7 batches of 4 each
        ids = [i for b in loader for i in b["question_id"]]  # through DataLoader worker processes
        assert len(ids) == len(set(ids)) == len(loader) * 4
        seen.append(set(ids))
    assert not seen[0] & seen[1]

    def run(seed, epoch):
        loader = make_vqa_loader([train], tokenizer, batch_size=8, train=True, seed=seed, epoch=epoch, **ARGS)
        return list(loader)

    a, b, c = run(0, 0), run(0, 0), run(0, 1)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["answer_ids"], y["answer_ids"])
               and x["question_id"] == y["question_id"] for x, y in zip(a, b))
    order = [i for x in a for i in x["question_id"]]
    assert order != [i for x in c for i in x["question_id"]] and sorted(order) == sorted(
        i for x in c for i in x["question_id"])
    loader = make_vqa_loader([train], tokenizer, batch_size=8, train=True, seed=0, **ARGS)
    loader.set_epoch(1)
    assert [i for x in loader for i in x["question_id"]] == [i for x in c for i in x["question_id"]]


def test_flip_swaps_left_and_right_in_question_and_answers(vqa_dirs, tokenizer):
    train, _ = vqa_dirs
    loader = make_vqa_loader([train], tokenizer, batch_size=2, train=True, randaugment=False, **ARGS)
    sample = next(toyweb.generate("toyweb://?split=vqa_train&n=1&seed=0"))
    img = toyweb_scenes.render_scene(toyweb_scenes.Scene.from_json(sample.json["scene"]), 32, 0)
    q = {"question_id": "x", "question": "is the red circle to the left or to the right of the blue square?",
         "answers": ["left"] * 9 + ["right"], "kind": "position"}
    flips = 0
    for seed in range(16):
        batch = loader.stream._collate([(img, q, "i")], random.Random(seed))
        answers = [tokenizer.decode(x) for x in batch["answer_ids"]]
        flipped = batch["question"][0].startswith("is the red circle to the right")
        assert answers == (["right", "left"] if flipped else ["left", "right"])
        flips += flipped
    assert 0 < flips < 16


def test_unanswered_questions_are_skipped_and_counted(tmp_path, tokenizer):
    samples = list(toyweb.generate("toyweb://?split=vqa_test&n=6&seed=8&size=32"))
    metas = []
    for s in samples:
        qs = [dict(q) for q in s.json["questions"]]
        qs[0]["answers"] = []  # a test-split question: no answers
        metas.append((s.key, s.jpg, {"image_id": s.key, "questions": qs, "captions": []}))
    out = _write_raw(tmp_path / "d", metas)
    loader = make_vqa_loader([out], tokenizer, batch_size=6, train=False, **ARGS)
    ids = [i for b in loader for i in b["question_id"]]
    assert len(ids) == 24 and loader.skipped == 6
    assert not {s.json["questions"][0]["question_id"] for s in samples} & set(ids)


def test_loaders_refuse_the_wrong_kind_of_data_set(vqa_dirs, tokenizer, tmp_path):
    train, _ = vqa_dirs
    with pytest.raises(UserError, match="a VQA data set"):
        make_loader([train], tokenizer, batch_size=4, train=True, **ARGS)
    captions = _ingest("toyweb://?split=human&n=5", tmp_path / "human")
    with pytest.raises(UserError, match="not a VQA data set"):
        make_vqa_loader([captions], tokenizer, batch_size=2, train=True, **ARGS)


def test_load_vqa_split_and_baselines(vqa_dirs):
    train, test = vqa_dirs
    split = load_vqa_split(test, image_size=24)
    assert split.images.shape == (12, 3, 24, 24) and len(split.image_ids) == 12
    assert len(split.questions) == len(split.answers) == len(split.kinds) == len(split.question_ids) == 48
    assert split.image_index.tolist() == [i for i in range(12) for _ in range(4)]
    generated = {q["question_id"]: q for s in toyweb.generate("toyweb://?split=vqa_test&n=12&seed=1")
                 for q in s.json["questions"]}
    assert all(generated[qid]["answers"] == a for qid, a in zip(split.question_ids, split.answers))
    # the majority answer of each question (the right one) scores 100
    best = [Counter(a).most_common(1)[0][0] for a in split.answers]
    assert vqa_report(best, split.answers, split.kinds)["accuracy"] == 100.0
    tr = load_vqa_split(train, image_size=24)
    base = majority_answer_baseline(tr.answers, split.answers, split.kinds, tr.kinds)
    assert 0.0 < base["accuracy"] < base["per_kind_prior"]["accuracy"] < 100.0
    assert set(base["per_kind"]) <= set(toyweb_vqa.VQA_KINDS)


def test_sample_texts_hold_captions_or_questions_and_answers(vqa_dirs, tokenizer):
    train, _ = vqa_dirs
    s = _stored(train)[0]
    texts = sample_texts(s)
    meta = json.loads(s["json"])
    assert texts[:4] == [q["question"] for q in meta["questions"]]
    assert set(texts[4:]) == {a for q in meta["questions"] for a in q["answers"]}
    human = next(toyweb.generate("toyweb://?split=human&n=1"))
    assert sample_texts({"__key__": "k", "txt": human.txt.encode(), "json": json.dumps(human.json).encode()}) == \
        human.json["captions"]
    unk = tokenizer.hf.unk_token_id
    assert all(unk not in tokenizer([t])[0][0].tolist() for t in texts)


def test_pre_question_follows_the_official_cleaning():
    from blip_core.tokenizer import pre_question

    assert pre_question("What's the COLOR (of) the #1 shape?!") == "what's the color of the 1 shape?"
    assert pre_question("Is it red,  or blue?  ") == "is it red,  or blue?"  # inner spaces stay, as the official
    assert pre_question(" ".join(["word"] * 60) + "?") == " ".join(["word"] * 50)
    assert pre_question("...") == ""
