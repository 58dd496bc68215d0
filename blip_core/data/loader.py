"""Training and evaluation loaders over dataset directories (local or ``s3://``).

:func:`make_loader` streams image-text *pairs* from the shards of one or more dataset directories
(see :mod:`blip_core.data.webdataset_io`): one pair per sample using ``txt``, or with
``expand_captions=True`` one pair per caption in ``json["captions"]`` (human data, COCO-like).

Even split, so DDP never hangs: the ``P`` pairs of an epoch, in shard order (shuffled per ``(seed, epoch)``
when training), are cut into ``G = world_size * max(1, num_workers)`` contiguous ranges of ``P // G`` pairs,
one per (rank, worker) stream; stream ``u = rank * workers + worker`` reads only the shards its range
touches. Every stream yields exactly ``(P // G) // batch_size`` batches (the remainder is dropped). Samples
that cannot be decoded are skipped and counted (:attr:`BlipLoader.skipped`); a stream left short by
skipped samples refills from its own range, so the batch count never changes.

Shards are checked against their manifest when the loader is made (present, same size; same sha256 with
``verify_sha256``): a missing or damaged shard raises :class:`ShardLost` naming it, and so does a shard that
becomes unreadable during training. With ``allow_partial`` such shards are left out instead, and their samples
counted and logged (:attr:`BlipLoader.lost_samples`; mid-training losses count as skipped). Everything random (shard
order, shuffle buffer, crops, flips, RandAugment) comes from generators seeded by ``(seed, epoch, stream)``,
so an epoch is reproducible.

A batch is a dict: ``image`` float ``(B, 3, S, S)`` normalised with the CLIP mean/std, ``input_ids`` and
``attention_mask`` ``(B, L)`` (prompt + cleaned caption, padded to the longest), ``image_idx`` long ``(B,)``
(a stable id per image, equal for all captions of one image: the retrieval positives), ``text`` and
``image_id`` (lists of str).

:func:`make_vqa_loader` runs the same machinery over VQA data sets (one image per sample, its questions in
``json["questions"]``; see :mod:`blip_core.data.webdataset_io`) with one item per *question*: the split over
ranks and workers, epochs, seeding, shuffling and the counting of skipped and lost samples are those above,
with questions in place of pairs. Its batches are described at :class:`VQAStream`;
:func:`load_vqa_split` loads a VQA split for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip_core.data.images import to_rgb
from blip_core.data.transforms import EvalTransform, TrainTransform
from blip_core.data.webdataset_io import (
    ANSWER_LIST_NAME,
    IMAGE_EXTS,
    OVERSIZE_KEY,
    ShardReadError,
    check_shards,
    decode_json,
    iter_shard,
    join_uri,
    read_manifest,
    read_uri_bytes,
)
from blip_core.errors import UserError
from blip_core.io import default_opener
from blip_core.tokenizer import BlipTokenizer, pre_caption, pre_question

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """A shard to read and its counts from the manifest."""

    uri: str
    samples: int
    captions: int
    questions: int = 0  # VQA questions (0 in a caption data set)


@dataclass(frozen=True)
class LostShard:
    """A shard listed in a manifest that could not be used, and why."""

    uri: str
    samples: int
    captions: int
    problem: str


class ShardLost(UserError):
    """A shard of a dataset is missing or damaged and ``data.allow_partial`` is off."""


_VERIFIED: set[tuple[str, str]] = set()  # (shard uri, sha256) already hashed in this process


def open_datasets(data_uris: Sequence[str], *, allow_partial: bool = False,
                  verify_sha256: bool = False) -> tuple[list[ShardRef], list[LostShard]]:
    """The shards of every dataset directory in ``data_uris`` (each needs its manifest), checked against it.

    A shard that is missing or has another size than its manifest records (or, with ``verify_sha256``, other
    content) raises :class:`ShardLost` naming it, unless ``allow_partial``: then it is left out, logged, and
    returned in the second list.
    """
    opener = default_opener()
    out: list[ShardRef] = []
    lost: list[LostShard] = []
    for uri in data_uris:
        manifest = read_manifest(uri, opener)
        need_hash = verify_sha256 and any((join_uri(uri, s.path), s.sha256) not in _VERIFIED
                                          for s in manifest.shards)
        bad = {s.path: problem for s, problem in check_shards(uri, manifest, opener, sha256=need_hash)}
        for s in manifest.shards:
            ref = ShardRef(join_uri(uri, s.path), s.samples, s.captions, s.questions or 0)
            if s.path not in bad:
                if need_hash and s.sha256:
                    _VERIFIED.add((ref.uri, s.sha256))
                out.append(ref)
                continue
            if not allow_partial:
                raise ShardLost(f"{ref.uri}: {bad[s.path]} ({s.samples} samples); the dataset is incomplete: "
                                "re-run the stage that wrote it, or set data.allow_partial=true to train on the rest")
            lost.append(LostShard(ref.uri, s.samples, s.captions, bad[s.path]))
            log.warning("data.allow_partial: leaving out %s (%s): %d samples lost", ref.uri, bad[s.path], s.samples)
    if lost:
        log.warning("data.allow_partial: %d shard(s), %d samples lost from %s", len(lost),
                    sum(x.samples for x in lost), ", ".join(data_uris))
    return out, lost


def dataset_shards(data_uris: Sequence[str], *, allow_partial: bool = False,
                   verify_sha256: bool = False) -> list[ShardRef]:
    """The usable shards of every dataset directory in ``data_uris``, in order (see :func:`open_datasets`)."""
    return open_datasets(data_uris, allow_partial=allow_partial, verify_sha256=verify_sha256)[0]


def _check_count(shard: ShardRef, seen: int) -> None:
    """Raise :class:`ShardReadError` when a shard read to its end held another number of samples than its
    manifest records (a tar whose tail was zeroed reads as a shorter, valid archive)."""
    if seen != shard.samples:
        raise ShardReadError(f"{seen} samples read, the manifest says {shard.samples}")


def image_index(image_id: str) -> int:
    """A stable non-negative 63-bit integer for an image id (the same on every rank and run)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def decode_image(data: bytes) -> Image.Image:
    """Decode stored image bytes to upright RGB (:func:`~blip_core.data.images.to_rgb`; raises on corrupt data)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def sample_captions(sample: dict[str, Any]) -> tuple[list[str], str]:
    """``(captions, image_id)`` of a stored sample: ``json["captions"]`` (or ``[txt]``) and its image id."""
    meta = decode_json(sample.get("json"))
    caps = meta.get("captions")
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps) or not caps:
        txt = sample.get("txt")
        if txt is None:
            raise ValueError("sample has no caption")
        caps = [txt.decode("utf-8")]
    elif "txt" in sample:
        txt = sample["txt"].decode("utf-8")
        caps = [txt] + [c for c in caps if c != txt]
    return caps, str(meta.get("image_id") or sample["__key__"])


VG_ANSWER_WEIGHT = 0.2  # weight of each Visual Genome answer (question ``dataset: "vg"``), as the official code


def sample_questions(sample: dict[str, Any]) -> tuple[list[dict], str]:
    """``(questions, image_id)`` of a stored VQA sample: ``json["questions"]`` (each a dict with
    ``question_id``, ``question``, ``answers`` and optionally ``kind``) and its image id."""
    meta = decode_json(sample.get("json"))
    qs = meta.get("questions")
    if not isinstance(qs, list) or not all(isinstance(q, dict) and isinstance(q.get("question"), str)
                                           and isinstance(q.get("answers", []), list) for q in qs):
        raise ValueError("sample has no questions")
    return qs, str(meta.get("image_id") or sample["__key__"])


def sample_texts(sample: dict[str, Any], max_words: int = 30) -> list[str]:
    """Every cleaned text of a stored sample, to build a vocabulary: its captions (``pre_caption``), or for a
    VQA sample its questions (``pre_question``) and their answers. Raises ``ValueError`` for a sample with
    neither."""
    meta = decode_json(sample.get("json"))
    if isinstance(meta.get("questions"), list) and not meta.get("captions"):
        qs, _ = sample_questions(sample)
        texts = [pre_question(q["question"]) for q in qs]
        texts += [a for q in qs for a in q.get("answers", []) if isinstance(a, str)]
    else:
        texts = [pre_caption(c, max_words) for c in sample_captions(sample)[0]]
    return [t for t in texts if t]


def answer_weights(question: dict) -> tuple[list[str], list[float]]:
    """The unique answers of a question (first-seen order) and their training weights: count / number of
    answers (VQAv2), or :data:`VG_ANSWER_WEIGHT` each for a Visual Genome question (``dataset: "vg"``)."""
    answers = [t for t in (" ".join(a.split()) for a in question.get("answers", []) if isinstance(a, str)) if t]
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    if question.get("dataset") == "vg":
        return list(counts), [VG_ANSWER_WEIGHT] * len(counts)
    return list(counts), [c / len(answers) for c in counts.values()]


def read_answer_list(dataset_uri: str) -> list[str]:
    """``answer_list.json`` of a VQA data set (its distinct answers, most frequent first)."""
    uri = join_uri(dataset_uri, ANSWER_LIST_NAME)
    try:
        answers = json.loads(read_uri_bytes(uri))
    except FileNotFoundError:
        raise UserError(f"{dataset_uri}: no {ANSWER_LIST_NAME}: not a VQA data set") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{uri}: unreadable answer list ({e})") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{uri}: not a JSON list of answers")
    return answers


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError("sample has no image")


class PairStream(IterableDataset):
    """The batches of one rank, split evenly over its DataLoader workers (see the module docstring).

    The items of a sample are its pairs; :class:`VQAStream` overrides :meth:`_shard_items`,
    :meth:`_sample_items` and :meth:`_collate` to read questions instead.
    """

    ITEMS = "image-text pairs"

    def __init__(self, shards: Sequence[ShardRef], tokenizer: BlipTokenizer, *, image_size: int,
                 batch_size: int, train: bool, min_scale: float, randaugment: bool, max_words: int,
                 max_length: int, prompt: str, rank: int, world_size: int, num_workers: int, seed: int,
                 epoch: int, expand_captions: bool, shuffle_buffer: int, allow_partial: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.transform = (TrainTransform(image_size, min_scale, randaugment) if train
                          else EvalTransform(image_size))
        self.batch_size = batch_size
        self.train = train
        self.max_words = max_words
        self.max_length = max_length
        self.prompt = prompt
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, num_workers)
        self.seed = seed
        self.epoch = epoch
        self.expand = expand_captions
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.allow_partial = allow_partial
        self.opener = default_opener()  # taken to the DataLoader workers
        self.total_pairs = sum(self._shard_items(s) for s in self.shards)
        self.streams = world_size * self.workers
        self.quota = self.total_pairs // self.streams
        self.steps = self.quota // batch_size
        if self.steps == 0:
            raise UserError(f"{self.total_pairs} {self.ITEMS} cannot fill one batch of {batch_size} on each of "
                            f"{self.streams} (rank, worker) streams; lower the batch size, world size or workers")

    # ------------------------------------------------------------------ reading
    def _shard_items(self, shard: ShardRef) -> int:
        """How many items (global indices) a shard holds."""
        return shard.captions if self.expand else shard.samples

    def _sample_items(self, sample: dict[str, Any]) -> tuple[list[Any], str]:
        """``(items, image_id)`` of a sample (raises ``ValueError`` for an unreadable one); an item ``None``
        holds an index but is skipped and counted."""
        return sample_captions(sample)

    def _shard_order(self) -> list[ShardRef]:
        order = list(self.shards)
        if self.train:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def _pairs(self, start: int, end: int, counter: list[int], count: bool) -> Iterator[tuple[Image.Image, str, str]]:
        """Pairs with global index in ``[start, end)``: ``(image, caption, image_id)``; bad ones skipped."""
        offset = 0
        for shard in self._shard_order():
            n = self._shard_items(shard)
            if offset + n <= start:
                offset += n
                continue
            if offset >= end:
                return
            g = offset  # global pair index of the next sample's first pair
            seen = 0  # samples of this shard read so far
            try:
                for sample in iter_shard(shard.uri, self.opener):
                    if g >= end:
                        break
                    seen += 1
                    try:
                        if OVERSIZE_KEY in sample:
                            raise ValueError(sample[OVERSIZE_KEY])
                        caps, image_id = self._sample_items(sample)
                    except (ValueError, UnicodeDecodeError):
                        counter[0] += count
                        g += 1
                        continue
                    k = len(caps) if self.expand else 1
                    lo, hi = max(g, start), min(g + k, end)
                    if lo < hi:
                        try:
                            img = decode_image(_image_bytes(sample))
                        except Exception as e:  # noqa: BLE001 - any decoder failure skips the sample
                            log.debug("skipping %s in %s: %s", sample.get("__key__"), shard.uri, e)
                            counter[0] += count
                        else:
                            for j in range(lo - g, hi - g):
                                if caps[j] is None:
                                    counter[0] += count
                                    continue
                                yield img, caps[j], image_id
                    g += k
                else:
                    _check_count(shard, seen)
            except (ShardReadError, OSError) as e:
                if not self.allow_partial:
                    raise ShardLost(f"{shard.uri}: became unreadable during training ({e}); re-run the stage "
                                    "that wrote it, or set data.allow_partial=true to train on the rest") from None
                lost = max(0, min(offset + n, end) - max(g, start))
                log.warning("data.allow_partial: shard %s unreadable (%s): %d pairs of this stream lost",
                            shard.uri, e, lost)
                counter[0] += count * lost
            offset += n

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        buf: list[Any] = []
        for it in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(it)
                continue
            j = rng.randrange(len(buf))
            buf[j], it = it, buf[j]
            yield it
        rng.shuffle(buf)
        yield from buf

    def stream_pairs(self, stream: int, skipped: list[int] | None = None) -> Iterator[tuple[Image.Image, str, str]]:
        """Exactly ``steps * batch_size`` pairs of stream ``stream`` (in training order).

        ``skipped[0]`` is incremented for every sample skipped in the first pass over the range.
        """
        rng = random.Random(f"stream/{self.seed}/{self.epoch}/{stream}")
        start, end = stream * self.quota, (stream + 1) * self.quota
        needed = self.steps * self.batch_size
        done = 0
        counter = skipped if skipped is not None else [0]
        for attempt in range(1 + needed):  # refill passes when skipped samples left the stream short
            got = 0
            items = self._pairs(start, end, counter, count=attempt == 0)
            if self.train:
                items = self._shuffled(items, rng)
            for it in items:
                yield it
                got += 1
                done += 1
                if done == needed:
                    return
            if got == 0:
                raise RuntimeError(f"stream {stream}: no readable samples in its range [{start}, {end})")

    def stream_batches(self, stream: int) -> Iterator[dict[str, Any]]:
        """The batches of stream ``stream``; each carries ``_skipped`` (new skips since the last batch)."""
        rng = random.Random(f"augment/{self.seed}/{self.epoch}/{stream}")
        pending: list[tuple[Image.Image, str, str]] = []
        skipped, reported = [0], 0
        for pair in self.stream_pairs(stream, skipped):
            pending.append(pair)
            if len(pending) == self.batch_size:
                batch = self._collate(pending, rng)
                batch["_skipped"] = skipped[0] - reported
                reported = skipped[0]
                pending = []
                yield batch

    def _collate(self, pairs: list[tuple[Image.Image, str, str]], rng: random.Random) -> dict[str, Any]:
        images, texts, ids = [], [], []
        for img, caption, image_id in pairs:
            tensor, caption = self.transform(img, caption, rng)
            images.append(tensor)
            texts.append(self.prompt + pre_caption(caption, self.max_words))
            ids.append(image_id)
        input_ids, attention_mask = self.tokenizer(texts, max_length=self.max_length, padding="longest")
        return {
            "image": torch.stack(images),  # (B, 3, S, S)
            "input_ids": input_ids,  # (B, L)
            "attention_mask": attention_mask,  # (B, L)
            "image_idx": torch.tensor([image_index(i) for i in ids], dtype=torch.long),  # (B,)
            "text": texts,
            "image_id": ids,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"stream was built for {self.workers} workers but runs in {workers}")
        if info is not None:
            torch.set_num_threads(1)
        yield from self.stream_batches(self.rank * self.workers + worker)


def pin_memory_for(device: torch.device | str) -> bool:
    """Whether batches bound for ``device`` should come in pinned (page-locked) host memory: only for CUDA.

    Pinned batches let ``.to(device, non_blocking=True)`` copy asynchronously; on a CPU-only run pinning
    would only cost time (and needs a CUDA runtime).
    """
    return torch.device(device).type == "cuda"


class BlipLoader:
    """Iterable of batches for one rank and epoch; ``len()`` is the number of batches per epoch.

    ``skipped`` counts samples skipped (unreadable or undecodable) since the loader was created;
    :meth:`set_epoch` selects the epoch the next iteration runs. With ``pin_memory`` the batches' tensors
    come in pinned memory (set it for a CUDA device: :func:`pin_memory_for`).
    """

    def __init__(self, stream: PairStream, num_workers: int, pin_memory: bool = False,
                 lost: Sequence[LostShard] = ()) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.skipped = 0
        self.lost = list(lost)  # shards left out when opening (data.allow_partial)

    @property
    def lost_samples(self) -> int:
        """Samples of the shards left out when the datasets were opened (``data.allow_partial``)."""
        return sum(x.samples for x in self.lost)

    def __len__(self) -> int:
        return self.stream.steps * self.stream.workers

    @property
    def pairs_per_epoch(self) -> int:
        """Pairs this rank sees per epoch."""
        return len(self) * self.stream.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def data_loader(self) -> DataLoader | None:
        """The :class:`DataLoader` the batches come through (``None``: read in this process, unpinned)."""
        if self.num_workers == 0 and not self.pin_memory:
            return None
        if self.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                          prefetch_factor=2 if self.num_workers else None, pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = self.data_loader()
        source: Any = self.stream if loader is None else loader
        try:
            for batch in source:
                self.skipped += int(batch.pop("_skipped", 0))
                yield batch
        except ShardLost as e:  # from a worker process: keep only the message, not the worker's traceback
            text = str(e)
            if "Traceback" in text:
                last = [line for line in text.splitlines() if line.strip()][-1]
                raise ShardLost(last.split(": ", 1)[1] if ": " in last else last) from None
            raise


def make_loader(data_uris: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int, batch_size: int,
                train: bool, min_scale: float = 0.5, randaugment: bool = True, max_words: int = 30,
                max_length: int = 30, prompt: str = "", rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, epoch: int = 0, expand_captions: bool = False,
                shuffle_buffer: int = 1000, pin_memory: bool = False, allow_partial: bool = False,
                verify_sha256: bool = False) -> BlipLoader:
    """A loader of image-text batches from dataset directories (see the module docstring).

    ``train`` selects BLIP's train transform (crop scale ``(min_scale, 1)``, flip with left/right swap,
    RandAugment when ``randaugment``), shard shuffling and a shuffle buffer; otherwise the eval transform in
    stored order. ``prompt`` is prepended to every cleaned caption (``"a picture of "`` for the captioner).
    ``pin_memory`` (for a CUDA device, :func:`pin_memory_for`) returns batches in pinned host memory.
    ``allow_partial`` and ``verify_sha256``: see :func:`open_datasets`; a shard that becomes unreadable while
    training raises :class:`ShardLost` unless ``allow_partial`` (then its remaining pairs count as skipped).
    """
    if isinstance(data_uris, str):
        data_uris = [data_uris]
    shards, lost = open_datasets(data_uris, allow_partial=allow_partial, verify_sha256=verify_sha256)
    if shards and all(s.questions and not s.captions for s in shards):
        raise UserError(f"{', '.join(data_uris)}: a VQA data set (questions, no captions): it trains the VQA "
                        "model, not image-text pairs")
    stream = PairStream(shards, tokenizer, image_size=image_size, batch_size=batch_size, train=train,
                        min_scale=min_scale, randaugment=randaugment, max_words=max_words,
                        max_length=max_length, prompt=prompt, rank=rank, world_size=world_size,
                        num_workers=num_workers, seed=seed, epoch=epoch, expand_captions=expand_captions,
                        shuffle_buffer=shuffle_buffer, allow_partial=allow_partial)
    return BlipLoader(stream, num_workers, pin_memory, lost)


class EvalSplit(NamedTuple):
    """A small clean split held in memory for retrieval and captioning evaluation."""

    images: torch.Tensor  # (N, 3, S, S)
    texts: list[str]  # every caption, cleaned
    txt2img: list[int]  # text index -> image index
    img2txt: list[list[int]]  # image index -> its text indices
    samples: list[dict]  # each image's json, with "__key__"


def _eval_samples(uris: list[str], what: str, parse: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
    """``parse(sample)`` of every sample of the dataset directories ``uris``, in stored order, for an evaluation.

    A sample ``parse`` raises on is skipped and counted (one warning at the end); ``None`` leaves a sample out
    uncounted. A missing, damaged or unreadable shard raises :class:`ShardLost`: an evaluation never runs
    silently on part of its split.
    """
    skipped = 0
    opener = default_opener()
    for shard in dataset_shards(uris):
        try:
            seen = 0
            for sample in iter_shard(shard.uri, opener):
                seen += 1
                try:
                    item = parse(sample)
                except Exception:  # noqa: BLE001 - skip and count any bad sample
                    skipped += 1
                    continue
                if item is not None:
                    yield item
            _check_count(shard, seen)
        except (ShardReadError, OSError) as e:  # an evaluation on part of the split would not say so
            raise ShardLost(f"{shard.uri}: unreadable ({e}); re-run the stage that wrote it") from None
    if skipped:
        log.warning("%s(%s): skipped %d unreadable sample(s)", what, ", ".join(uris), skipped)


def load_eval_split(uri: str | Sequence[str], image_size: int, max_words: int = 30) -> EvalSplit:
    """Load every sample of one or more dataset directories with the eval transform.

    Samples that cannot be decoded are skipped and counted in a warning; a missing, damaged or unreadable
    shard raises :class:`ShardLost` (an evaluation never runs silently on part of its split).
    """
    transform = EvalTransform(image_size)
    images: list[torch.Tensor] = []
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    samples: list[dict] = []
    uris = [uri] if isinstance(uri, str) else list(uri)

    def parse(sample: dict[str, Any]):
        caps, _ = sample_captions(sample)
        caps = [c for c in (pre_caption(c, max_words) for c in caps) if c]
        if not caps:
            raise ValueError("no caption left after cleaning")
        return caps, decode_image(_image_bytes(sample)), decode_json(sample.get("json")), sample["__key__"]

    for caps, img, meta, key in _eval_samples(uris, "load_eval_split", parse):
        i = len(images)
        images.append(transform(img)[0])
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        texts += caps
        txt2img += [i] * len(caps)
        samples.append({**meta, "__key__": key})
    if not images:
        raise UserError(f"{', '.join(uris)}: no readable samples")
    return EvalSplit(torch.stack(images), texts, txt2img, img2txt, samples)


# --------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------


class VQAStream(PairStream):
    """The VQA batches of one rank: one item per question, split, shuffled and counted as :class:`PairStream`.

    A batch of ``B`` questions is a dict: ``image`` float ``(B, 3, S, S)`` (each question its own augmented
    copy of its image in training; a horizontal flip swaps ``left`` and ``right`` in the question and its
    answers), ``question_ids`` / ``question_mask`` ``(B, Lq)`` (``pre_question``, ``[ENC]`` at position 0,
    padded to the longest), ``answer_ids`` / ``answer_mask`` ``(sum n, La)`` (``[DEC] answer [SEP]``, the unique
    answers of question 0, then question 1, ...), ``weights`` float ``(sum n,)`` (:func:`answer_weights`: for
    VQAv2 count / number of answers, so they sum to 1 per question), ``n`` long ``(B,)`` (unique answers per
    question), and the lists ``question_id``, ``question`` (cleaned), ``kind`` and ``image_id`` with
    ``image_idx`` long ``(B,)``. A question without answers (a test split) is skipped and counted.
    """

    ITEMS = "questions"

    def __init__(self, shards: Sequence[ShardRef], tokenizer: BlipTokenizer, *, question_max_length: int,
                 answer_max_length: int, **kwargs: Any) -> None:
        self.answer_max_length = answer_max_length
        super().__init__(shards, tokenizer, max_words=50, max_length=question_max_length, prompt="",
                         expand_captions=True, **kwargs)

    def _shard_items(self, shard: ShardRef) -> int:
        return shard.questions

    def _sample_items(self, sample: dict[str, Any]) -> tuple[list[Any], str]:
        meta = decode_json(sample.get("json"))
        if "questions" not in meta and meta.get("captions"):  # a caption sample holds no question
            return [], str(meta.get("image_id") or sample["__key__"])
        qs, image_id = sample_questions(sample)
        return [q if answer_weights(q)[0] else None for q in qs], image_id

    def _collate(self, items: list[tuple[Image.Image, dict, str]], rng: random.Random) -> dict[str, Any]:
        images, questions, answers, weights, counts = [], [], [], [], []
        for img, q, _ in items:
            unique, w = answer_weights(q)
            text = "\n".join([pre_question(q["question"], self.max_words), *unique])
            tensor, text = self.transform(img, text, rng)  # the flip swaps left/right in all of them
            question, *unique = text.split("\n")
            images.append(tensor)
            questions.append(question)
            answers += unique
            weights += w
            counts.append(len(unique))
        tok = self.tokenizer
        question_ids, question_mask = tok(questions, max_length=self.max_length, padding="longest")
        question_ids[:, 0] = tok.enc_id
        answer_ids, answer_mask = tok(answers, max_length=self.answer_max_length, padding="longest")
        answer_ids[:, 0] = tok.dec_id
        ids = [image_id for _, _, image_id in items]
        return {
            "image": torch.stack(images),  # (B, 3, S, S)
            "question_ids": question_ids,  # (B, Lq)
            "question_mask": question_mask,  # (B, Lq)
            "answer_ids": answer_ids,  # (sum n, La)
            "answer_mask": answer_mask,  # (sum n, La)
            "weights": torch.tensor(weights, dtype=torch.float32),  # (sum n,)
            "n": torch.tensor(counts, dtype=torch.long),  # (B,)
            "question_id": [str(q["question_id"]) for _, q, _ in items],
            "question": questions,
            "kind": [str(q.get("kind") or NO_KIND) for _, q, _ in items],
            "image_id": ids,
            "image_idx": torch.tensor([image_index(i) for i in ids], dtype=torch.long),  # (B,)
        }


NO_KIND = "unspecified"  # the kind of a question whose data set gives none


def make_vqa_loader(data_uris: Sequence[str], tokenizer: BlipTokenizer, *, image_size: int, batch_size: int,
                    train: bool, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                    epoch: int = 0, shuffle_buffer: int = 1000, question_max_length: int = 35,
                    answer_max_length: int = 30, pin_memory: bool = False, allow_partial: bool = False,
                    verify_sha256: bool = False, min_scale: float = 0.5, randaugment: bool = True) -> BlipLoader:
    """A loader of VQA batches (one item per question, see :class:`VQAStream`) from VQA data sets.

    Everything else is :func:`make_loader`'s: ``train`` (BLIP's train transform with crop scale
    ``(min_scale, 1)``, flip and RandAugment, shard shuffling and a shuffle buffer; otherwise the eval
    transform in stored order), ranks, workers, seeding per ``(seed, epoch, stream)``, ``pin_memory``,
    ``allow_partial`` and ``verify_sha256``. A data set without questions is refused.
    """
    if isinstance(data_uris, str):
        data_uris = [data_uris]
    shards, lost = open_datasets(data_uris, allow_partial=allow_partial, verify_sha256=verify_sha256)
    if not any(s.questions for s in shards) and not any(x.samples for x in lost):
        raise UserError(f"{', '.join(data_uris)}: no VQA questions: not a VQA data set (ingest a VQA source: "
                        "toyweb://?split=vqa_train or an official VQA annotation file)")
    stream = VQAStream(shards, tokenizer, image_size=image_size, batch_size=batch_size, train=train,
                       min_scale=min_scale, randaugment=randaugment, question_max_length=question_max_length,
                       answer_max_length=answer_max_length, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                       allow_partial=allow_partial)
    return BlipLoader(stream, num_workers, pin_memory, lost)


class VQASplit(NamedTuple):
    """A VQA split held in memory for evaluation: one entry per question, images stored once."""

    images: torch.Tensor  # (N, 3, S, S)
    image_index: torch.Tensor  # (Q,) long: the image of each question
    questions: list[str]  # cleaned with pre_question
    answers: list[list[str]]  # the annotators' answers (empty where the split has none)
    kinds: list[str]  # the question kinds (NO_KIND where none is given)
    question_ids: list[str]
    image_ids: list[str]  # (N,)


def load_vqa_split(uri: str | Sequence[str], image_size: int) -> VQASplit:
    """Load every question of one or more VQA data sets with the eval transform.

    Samples that cannot be decoded are skipped and counted in a warning; a missing, damaged or unreadable
    shard raises :class:`ShardLost`; a split without questions is a :class:`UserError`.
    """
    transform = EvalTransform(image_size)
    uris = [uri] if isinstance(uri, str) else list(uri)
    images: list[torch.Tensor] = []
    image_ids: list[str] = []
    index: list[int] = []
    questions: list[str] = []
    answers: list[list[str]] = []
    kinds: list[str] = []
    qids: list[str] = []
    def parse(sample: dict[str, Any]):
        if "questions" not in decode_json(sample.get("json")):
            return None
        qs, image_id = sample_questions(sample)
        return qs, image_id, decode_image(_image_bytes(sample))

    for qs, image_id, img in _eval_samples(uris, "load_vqa_split", parse):
        i = len(images)
        images.append(transform(img)[0])
        image_ids.append(image_id)
        for q in qs:
            index.append(i)
            questions.append(pre_question(q["question"]))
            answers.append([a for a in q.get("answers", []) if isinstance(a, str)])
            kinds.append(str(q.get("kind") or NO_KIND))
            qids.append(str(q.get("question_id")))
    if not questions:
        raise UserError(f"{', '.join(uris)}: no readable VQA questions")
    return VQASplit(torch.stack(images), torch.tensor(index, dtype=torch.long), questions, answers, kinds, qids,
                    image_ids)
