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

:mod:`blip_core.data.vqa_loader` runs the same machinery over VQA data sets with one item per question;
:mod:`blip_core.data.splits` loads evaluation splits, :mod:`blip_core.data.samples` lists the shards and reads
the fields of a sample.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip_core.constants import CAPTION_MAX_WORDS, PRETRAIN_TEXT_TOKENS
from blip_core.data.samples import (
    LostShard,
    ShardLost,
    ShardRef,
    check_count,
    decode_image,
    image_bytes,
    image_index,
    open_datasets,
    sample_captions,
)
from blip_core.data.transforms import EvalTransform, TrainTransform
from blip_core.data.webdataset_io import OVERSIZE_KEY, ShardReadError, iter_shard
from blip_core.errors import UserError
from blip_core.io import default_opener
from blip_core.tokenizer import BlipTokenizer, pre_caption

log = logging.getLogger(__name__)


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
                            img = decode_image(image_bytes(sample))
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
                    check_count(shard, seen)
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
                train: bool, min_scale: float = 0.5, randaugment: bool = True, max_words: int = CAPTION_MAX_WORDS,
                max_length: int = PRETRAIN_TEXT_TOKENS, prompt: str = "", rank: int = 0, world_size: int = 1,
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
