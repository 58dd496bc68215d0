"""The shards of dataset directories and the fields of their samples, shared by every loader.

:func:`dataset_shards` lists the shards of one or more dataset directories, checked against their manifests
(:class:`ShardLost` names a missing or damaged one; with ``allow_partial`` it is left out and counted as
:class:`LostShard`). The ``sample_*`` functions read a stored sample's captions, questions and image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from blip_core.constants import CAPTION_MAX_WORDS
from blip_core.data.images import to_rgb
from blip_core.data.webdataset_io import (
    ANSWER_LIST_NAME,
    IMAGE_EXTS,
    ShardReadError,
    check_shards,
    decode_json,
    join_uri,
    read_manifest,
    read_uri_bytes,
)
from blip_core.errors import UserError
from blip_core.io import default_opener
from blip_core.tokenizer import pre_caption, pre_question

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


def check_count(shard: ShardRef, seen: int) -> None:
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


def sample_texts(sample: dict[str, Any], max_words: int = CAPTION_MAX_WORDS) -> list[str]:
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


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError("sample has no image")


NO_KIND = "unspecified"  # the kind of a question whose data set gives none
