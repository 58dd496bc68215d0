"""Loading: even split over ranks and workers, determinism, skipped samples, transforms, eval split."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blip_core.config import load_config
from blip_core.data import transforms as T
from blip_core.data.loader import make_loader
from blip_core.data.samples import image_index
from blip_core.data.splits import load_eval_split
from blip_core.data.toyweb import generate
from blip_core.data.toyweb_grammar import caption_matches
from blip_core.data.toyweb_scenes import Scene, render_scene
from blip_core.data.webdataset_io import DatasetWriter, LocalSink, read_manifest
from blip_core.errors import UserError
from blip_core.tokenizer import BlipTokenizer, pre_caption
from components import ingest

LOADER_ARGS = dict(image_size=32, min_scale=0.5, randaugment=True, max_words=30, max_length=24)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [c for s in generate("toyweb://?split=human&n=100") for c in s.json["captions"]]
    return BlipTokenizer.from_corpus(texts + ["a picture of"], vocab_size=200)


@pytest.fixture(scope="module")
def web_dir(tmp_path_factory):
    """53 web samples in 6 shards of uneven size (10, 10, 10, 10, 10, 3)."""
    out = tmp_path_factory.mktemp("web")
    ingest.run(load_config(None, ["ingest.shard_size=10"]), "toyweb://?split=web&n=53&seed=3", str(out),
               progress=False)
    return str(out)


@pytest.fixture(scope="module")
def human_dir(tmp_path_factory):
    """23 human samples (5 captions each) in 3 shards."""
    out = tmp_path_factory.mktemp("human")
    ingest.run(load_config(None, ["ingest.shard_size=9"]), "toyweb://?split=human&n=23&seed=4", str(out),
               progress=False)
    return str(out)


def test_every_rank_and_worker_gets_the_same_number_of_batches(web_dir, tokenizer):
    """2 ranks x 2 workers on 6 uneven shards: 53 // 4 = 13 pairs per stream -> 3 batches of 4 each."""
    per_stream: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        loader = make_loader([web_dir], tokenizer, batch_size=4, train=True, rank=rank, world_size=2,
                             num_workers=2, seed=1, **LOADER_ARGS)
        assert len(loader) == 6
        for worker in range(2):
            batches = list(loader.stream.stream_batches(rank * 2 + worker))
            assert len(batches) == 3 and all(len(b["text"]) == 4 for b in batches)
            per_stream[(rank, worker)] = [i for b in batches for i in b["image_id"]]
        # the same through real DataLoader worker processes
        got = list(loader)
        assert len(got) == 6 and all(b["image"].shape == (4, 3, 32, 32) for b in got)
        ids = sorted(i for b in got for i in b["image_id"])
        assert ids == sorted(per_stream[(rank, 0)] + per_stream[(rank, 1)])
    everything = [i for ids in per_stream.values() for i in ids]
    assert len(everything) == len(set(everything)) == 48  # disjoint streams, 5 pairs dropped


def test_single_process_loader_matches_stream_split(web_dir, tokenizer):
    loader = make_loader([web_dir], tokenizer, batch_size=5, train=False, **LOADER_ARGS)
    batches = list(loader)
    assert len(batches) == len(loader) == 10
    ids = [i for b in batches for i in b["image_id"]]
    assert ids == [f"web-s3-{i:07d}" for i in range(50)]  # eval: stored order, remainder dropped


def test_deterministic_per_seed_and_epoch(web_dir, tokenizer):
    def run(seed, epoch):
        loader = make_loader([web_dir], tokenizer, batch_size=8, train=True, seed=seed, epoch=epoch, **LOADER_ARGS)
        return list(loader)

    a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
    assert all(torch.equal(x["image"], y["image"]) and x["text"] == y["text"] for x, y in zip(a, b))
    order = [i for x in a for i in x["image_id"]]
    assert order != [i for x in c for i in x["image_id"]] and order != [i for x in d for i in x["image_id"]]
    loader = make_loader([web_dir], tokenizer, batch_size=8, train=True, **LOADER_ARGS)
    loader.set_epoch(1)
    assert [i for x in loader for i in x["image_id"]] == [i for x in c for i in x["image_id"]]


def test_batch_contents(human_dir, tokenizer):
    loader = make_loader([human_dir], tokenizer, batch_size=10, train=False, prompt="a picture of ",
                         expand_captions=True, **LOADER_ARGS)
    assert len(loader) == 115 // 10
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (10, 3, 32, 32)
    assert batch["image_idx"].dtype == torch.long
    ids, mask = tokenizer(batch["text"], max_length=24, padding="longest")
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert all(t.startswith("a picture of ") for t in batch["text"])
    # expanded captions: the 5 captions of an image share image_id and image_idx (retrieval positives)
    counts = Counter(batch["image_id"])
    assert list(counts.values()) == [5, 5]
    assert batch["image_idx"].tolist() == [image_index(i) for i in batch["image_id"]]
    assert len(set(batch["image_idx"].tolist())) == 2
    first = batch["image_id"][0]
    manifest = read_manifest(human_dir)
    assert manifest.captions_out == 115
    # eval images equal a bicubic resize + CLIP normalisation of the stored image
    from blip_core.data.webdataset_io import iter_shard
    stored = next(iter_shard(f"{human_dir}/shard-000000.tar"))
    assert stored["__key__"] == first
    img = Image.open(io.BytesIO(stored["jpg"])).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    ref = (torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
           - torch.tensor(T.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(T.CLIP_STD).view(3, 1, 1)
    assert torch.allclose(batch["image"][0], ref, atol=1e-5)
    assert batch["text"][0] == "a picture of " + pre_caption(json.loads(stored["json"])["captions"][0])


def test_bad_samples_are_skipped_and_counted_without_changing_batch_counts(tmp_path, tokenizer):
    good = list(generate("toyweb://?split=web&n=40&seed=9"))
    writer = DatasetWriter(LocalSink(tmp_path), shard_size=10)
    for i, s in enumerate(good):
        image = b"\x00garbage" if i in (3, 17, 31) else s.jpg
        writer.add(s.key, image, "jpg", s.json)
    writer.finish(samples_in=40, source="test")
    loader = make_loader([str(tmp_path)], tokenizer, batch_size=4, train=True, world_size=2, rank=0,
                         **LOADER_ARGS)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    loader1 = make_loader([str(tmp_path)], tokenizer, batch_size=4, train=True, world_size=2, rank=1,
                          **LOADER_ARGS)
    assert len(list(loader1)) == 5
    assert loader.skipped + loader1.skipped == 3
    bad = {good[i].key for i in (3, 17, 31)}
    assert not bad & {i for b in batches for i in b["image_id"]}


def test_incomplete_dataset_directory_is_refused(tmp_path, tokenizer):
    writer = DatasetWriter(LocalSink(tmp_path), shard_size=2)
    for s in generate("toyweb://?n=5"):
        writer.add(s.key, s.jpg, "jpg", s.json)
    writer.close()  # crashed before finish(): shards, but no manifest
    assert list(tmp_path.glob("shard-*.tar")) and not (tmp_path / "manifest.json").exists()
    with pytest.raises(UserError, match="not a complete dataset"):
        make_loader([str(tmp_path)], tokenizer, batch_size=2, train=False, **LOADER_ARGS)
    with pytest.raises(UserError, match="cannot fill one batch"):
        writer = DatasetWriter(LocalSink(tmp_path), shard_size=2)
        writer.add("k", next(generate("toyweb://?n=1")).jpg, "jpg", {"captions": ["x"], "image_id": "k"})
        writer.finish(1, "test")
        make_loader([str(tmp_path)], tokenizer, batch_size=2, train=False, **LOADER_ARGS)


def test_load_eval_split(human_dir):
    split = load_eval_split(human_dir, image_size=48)
    images, texts, txt2img, img2txt, samples = split
    assert images.shape == (23, 3, 48, 48) and len(texts) == 115 and len(samples) == 23
    for i, tids in enumerate(img2txt):
        assert len(tids) == 5 and all(txt2img[t] == i for t in tids)
        scene = Scene.from_json(samples[i]["scene"])
        assert all(caption_matches(scene, texts[t]) for t in tids)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def test_flip_swaps_left_and_right_in_the_caption():
    assert T.swap_left_right("a red circle to the left of a blue square, right?") == \
        "a red circle to the right of a blue square, left?"
    assert T.swap_left_right("bright leftover") == "bright leftover"
    sample = next(s for s in generate("toyweb://?split=human&n=50")
                  if any("left" in c for c in s.json["captions"]))
    scene = Scene.from_json(sample.json["scene"])
    caption = next(c for c in sample.json["captions"] if "left" in c)
    tf = T.TrainTransform(64, min_scale=1.0, randaugment=False)
    img = render_scene(scene, 64, 0)
    flipped = 0
    for seed in range(20):
        out, cap = tf(img, caption, random.Random(seed))
        mirrored = Scene(tuple(o.__class__(o.shape, o.color, o.size, 1 - o.x, o.y, o.radius)
                               for o in scene.objects), scene.background, scene.texture)
        if cap != caption:
            flipped += 1
            assert torch.allclose(out, T.to_tensor_normalized(ImageOps.mirror(img)), atol=1e-5)
            assert caption_matches(mirrored, cap) and not caption_matches(scene, cap)
        else:
            assert torch.allclose(out, T.to_tensor_normalized(img), atol=1e-5)
            assert caption_matches(scene, cap)
    assert 3 <= flipped <= 17


def test_random_resized_crop_box_respects_scale():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = T.random_resized_crop_box(100, 80, (0.2, 1.0), rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        area = (right - left) * (bottom - top) / 8000
        assert 0.15 <= area <= 1.0


def test_randaugment_ops():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype("uint8"))
    assert set(T.RANDAUG_OPS) == {"Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX",
                                  "ShearY", "TranslateX", "TranslateY", "Rotate"}
    for name, op in T.RANDAUG_OPS.items():
        out = op(img, 5, random.Random(1))
        assert out.size == img.size and out.mode == "RGB", name
    for name in ("Identity", "Brightness", "Sharpness"):  # factor 1.8 * 5/10 + 0.1 = 1.0 at M=5: no-ops
        assert np.array_equal(np.asarray(T.RANDAUG_OPS[name](img, 5, random.Random(1))), np.asarray(img))
    for name in ("ShearX", "Rotate", "TranslateY"):
        assert not np.array_equal(np.asarray(T.RANDAUG_OPS[name](img, 5, random.Random(1))), np.asarray(img))
    a = T.rand_augment(img, random.Random(3))
    b = T.rand_augment(img, random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    changed = sum(not np.array_equal(np.asarray(T.rand_augment(img, random.Random(s))), np.asarray(img))
                  for s in range(50))
    assert 10 < changed < 50  # each of 2 ops applies with p=0.5 and some ops are no-ops


def test_train_transform_output():
    img = Image.new("RGB", (90, 60), (255, 0, 0))
    out, cap = T.TrainTransform(32, min_scale=0.2)(img, "a red square", random.Random(0))
    assert out.shape == (3, 32, 32) and cap == "a red square"
    eval_out, _ = T.EvalTransform(32)(img)
    red = (1.0 - T.CLIP_MEAN[0]) / T.CLIP_STD[0]
    assert torch.allclose(eval_out[0], torch.full((32, 32), red), atol=1e-4)


def test_blip_core_data_does_not_import_pipeline_libraries():
    import subprocess
    import sys

    code = ("import sys, blip_core.data.loader, blip_core.data.toyweb, blip_core.data.checks; "
            "print(sorted(m for m in ('boto3', 'mlflow', 'kfp', 'dvc', 'torchx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_ingest_stage_starts_without_the_model_libraries():
    """Ingest needs neither torch nor timm: each ingest process (a DVC stage, a KFP task, a worker pod)
    starts in well under a second instead of several."""
    import subprocess
    import sys

    code = ("import sys, blip_core, components.ingest, components.ingest_parts, pipelines.ingest_steps; "
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_manifest_round_trip_keeps_stage_specific_keys(tmp_path):
    writer = DatasetWriter(LocalSink(tmp_path), shard_size=3)
    for s in generate("toyweb://?n=4"):
        writer.add(s.key, s.jpg, "jpg", s.json)
    writer.reject("k9", "duplicate", "same as k1")
    m = writer.finish(samples_in=5, source="toyweb://?n=4", extra={"capfilt": {"threshold": 0.5}})
    back = read_manifest(str(tmp_path))
    assert back == m and back.extra == {"capfilt": {"threshold": 0.5}}
    assert json.loads((tmp_path / "manifest.json").read_text())["capfilt"] == {"threshold": 0.5}
    assert [(s.samples, s.captions) for s in back.shards] == [(3, 3), (1, 1)] and back.rejected == {"duplicate": 1}
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a valid dataset manifest"):
        read_manifest(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Shards checked against the manifest: nothing lost silently
# --------------------------------------------------------------------------------------------------


def _dataset(path, n=40, shard_size=10):
    ingest.run(load_config(None, [f"ingest.shard_size={shard_size}"]), f"toyweb://?split=web&n={n}&seed=5",
               str(path), progress=False)
    return read_manifest(str(path))


def test_missing_or_truncated_shard_is_refused_naming_it(tmp_path, tokenizer):
    from blip_core.data.samples import ShardLost

    _dataset(tmp_path / "gone")
    (tmp_path / "gone" / "shard-000002.tar").unlink()
    with pytest.raises(ShardLost, match=r"shard-000002\.tar: missing .*data\.allow_partial") as err:
        make_loader([str(tmp_path / "gone")], tokenizer, batch_size=4, train=True, **LOADER_ARGS)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    m = _dataset(tmp_path / "cut")
    shard = tmp_path / "cut" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: m.shards[1].bytes // 2])
    with pytest.raises(ShardLost, match=rf"shard-000001\.tar: {m.shards[1].bytes // 2} bytes, the manifest says"):
        make_loader([str(tmp_path / "cut")], tokenizer, batch_size=4, train=True, **LOADER_ARGS)


def test_allow_partial_trains_on_the_rest_and_counts_the_loss(tmp_path, tokenizer, caplog):
    m = _dataset(tmp_path / "d")
    (tmp_path / "d" / "shard-000002.tar").unlink()
    lost_keys = {s.key for s in generate("toyweb://?split=web&n=40&seed=5")} - {
        k for u in sorted((tmp_path / "d").glob("shard-*.tar")) for k in _keys(u)}
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, allow_partial=True,
                         **LOADER_ARGS)
    assert loader.lost_samples == m.shards[2].samples == 10 and len(loader.lost) == 1
    assert "10 samples lost" in caplog.text
    ids = [i for b in loader for i in b["image_id"]]
    assert len(ids) == 30 == len(set(ids))  # the rest once each: no refill with duplicates
    assert not set(ids) & lost_keys


def _keys(shard_path):
    from blip_core.data.webdataset_io import iter_shard

    return [s["__key__"] for s in iter_shard(str(shard_path))]


def test_sha256_is_checked_when_asked(tmp_path, tokenizer):
    from blip_core.data.samples import ShardLost

    _dataset(tmp_path / "d")
    shard = tmp_path / "d" / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    make_loader([str(tmp_path / "d")], tokenizer, batch_size=4, train=True, **LOADER_ARGS)  # sizes match
    with pytest.raises(ShardLost, match=r"shard-000003\.tar: sha256 differs"):
        make_loader([str(tmp_path / "d")], tokenizer, batch_size=4, train=True, verify_sha256=True, **LOADER_ARGS)


def test_manifest_without_sizes_still_loads(tmp_path, tokenizer):
    _dataset(tmp_path / "d")
    path = tmp_path / "d" / "manifest.json"
    doc = json.loads(path.read_text())
    for s in doc["shards"]:
        del s["bytes"], s["sha256"]
    path.write_text(json.dumps(doc))
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=4, train=False, **LOADER_ARGS)
    assert len(loader) == 10 and loader.lost == []


def test_shard_deleted_during_training_stops_it_unless_partial_is_allowed(tmp_path, tokenizer):
    from blip_core.data.samples import ShardLost

    _dataset(tmp_path / "d")
    shard = tmp_path / "d" / "shard-000003.tar"
    data = shard.read_bytes()
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, **LOADER_ARGS)
    shard.unlink()
    with pytest.raises(ShardLost, match=r"shard-000003\.tar: became unreadable during training"):
        list(loader)
    shard.write_bytes(data)
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, **LOADER_ARGS)
    loader.num_workers = loader.stream.workers = 1  # the same stream, read in a worker process
    shard.write_bytes(data[:1000])  # truncated while training
    with pytest.raises(ShardLost) as err:
        list(loader)
    assert str(err.value).startswith(str(shard)) and "\n" not in str(err.value)
    shard.unlink()
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, allow_partial=True,
                         **LOADER_ARGS)
    assert loader.lost_samples == 10


def test_missing_shard_on_s3_is_refused_naming_it(s3_bucket, tokenizer):
    from blip_core.data.samples import ShardLost
    from components import storage

    out = f"s3://{s3_bucket}/web"
    ingest.run(load_config(None, ["ingest.shard_size=10"]), "toyweb://?split=web&n=30&seed=5", out, progress=False)
    assert len(make_loader([out], tokenizer, batch_size=5, train=False, **LOADER_ARGS)) == 6
    storage.delete(f"{out}/shard-000001.tar")
    with pytest.raises(ShardLost, match=r"web/shard-000001\.tar: missing"):
        make_loader([out], tokenizer, batch_size=5, train=False, **LOADER_ARGS)
    loader = make_loader([out], tokenizer, batch_size=5, train=False, allow_partial=True, **LOADER_ARGS)
    assert loader.lost_samples == 10 and len(loader) == 4


@pytest.mark.parametrize("status", [500, 503])
def test_s3_error_storm_while_streaming_is_retried_and_loses_nothing(s3_bucket, flaky_s3, web_dir, tokenizer,
                                                                      status):
    """5xx answers to the loader's S3 requests (listing, manifest, shard reads, in DataLoader workers too)
    are retried (botocore's standard mode inside :mod:`components.s3`'s backoff loop): every sample is read
    exactly once, as from the local copy."""
    from components import storage

    out = f"s3://{s3_bucket}/web"
    storage.upload_dir(web_dir, out)
    proxy = flaky_s3(fail_first=3, fail_every=4, status=status)  # 3 failures in a row, then every 4th request
    loader = make_loader([out], tokenizer, batch_size=1, train=False, **LOADER_ARGS)
    ids = [i for b in loader for i in b["image_id"]]
    assert ids == [f"web-s3-{i:07d}" for i in range(53)] and loader.skipped == 0
    local = make_loader([web_dir], tokenizer, batch_size=4, train=True, num_workers=2, seed=1, **LOADER_ARGS)
    remote = make_loader([out], tokenizer, batch_size=4, train=True, num_workers=2, seed=1, **LOADER_ARGS)
    expected = [i for b in local for i in b["image_id"]]
    assert [i for b in remote for i in b["image_id"]] == expected and len(set(expected)) == len(expected) == 48
    assert remote.skipped == 0 and remote.lost_samples == 0
    assert proxy.failed >= 3 + proxy.requests // 4 - 1


def test_shard_with_a_zeroed_tail_is_refused_in_training_and_evaluation(tmp_path, tokenizer):
    """A tar whose tail was zeroed reads as a shorter valid archive: the manifest's sample count catches it."""
    from blip_core.data.samples import ShardLost

    m = _dataset(tmp_path / "d", n=20)
    shard = tmp_path / "d" / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:3000] + bytes(len(data) - 3000))  # same size, the tail zeroed
    with pytest.raises(ShardLost, match=r"shard-000001\.tar: unreadable .*samples read, the manifest says 10"):
        load_eval_split(str(tmp_path / "d"), image_size=32)
    loader = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, **LOADER_ARGS)
    with pytest.raises(ShardLost, match=r"shard-000001\.tar: became unreadable"):
        list(loader)
    partial = make_loader([str(tmp_path / "d")], tokenizer, batch_size=5, train=False, allow_partial=True,
                          **LOADER_ARGS)
    assert len(list(partial)) == 4 and partial.skipped >= 1  # counted, batch count unchanged
    shard.write_bytes(data)
    assert len(load_eval_split(str(tmp_path / "d"), image_size=32).samples) == m.samples_out == 20
