"""WebDataset shards: the dataset-directory contract, deterministic writing and streaming reads.

Dataset directory
-----------------
A dataset directory (a local directory or an ``s3://bucket/prefix``) holds::

    shard-000000.tar ...   WebDataset shards (plain tar, members sorted per sample, mtime 0, no owner)
    rejected.jsonl         one {"key", "reason", "detail", "origin"} line per rejected input sample
    answer_list.json       VQA data sets only: every distinct annotator answer, most frequent first
    manifest.json          written LAST: a directory without it is incomplete and must not be read

Each sample in a shard has ``__key__`` plus:

- ``jpg`` (or ``png``): the image, RGB;
- ``txt``: the primary caption, already cleaned with ``pre_caption``;
- ``json``: ``{"image_id": str, "captions": [every caption of the image, primary first], "source":
  "web"|"human"|"synthetic", "noise": null|"unrelated"|"boilerplate"|"wrong_attribute"}`` plus whatever
  else the source's json held (``noise``, and ``noise_detail`` for a wrong attribute, are set by toy-web only
  and used by evaluation only).

A VQA sample is one image with no caption (no ``txt``, ``captions`` empty) whose json carries ``questions``:
``[{"question_id": str, "question": str (cleaned with pre_question), "answers": [str, ...], "kind": str
(optional)}, ...]``, the annotators' answers as given (a test split may have none). Such a data set's shards
also record their number of ``questions``, the manifest the total as ``questions_out`` (and questions dropped from kept samples, per reason, as ``questions_dropped``), and
``answer_list.json`` (written before the manifest) the distinct answers, most frequent first (ties in
alphabetical order): the candidates of rank-mode answering.

``manifest.json`` holds ``format``, ``source``, ``samples_in``, ``samples_out``, ``captions_out``,
``rejected`` (reason -> count, with ``samples_in == samples_out + sum(rejected.values())``), ``shards``
(each with ``path`` relative to the directory, ``samples``, ``captions``, ``bytes``, ``sha256``; readers check
them with :func:`check_shards`, and accept older manifests without the last two) and
``config`` (the settings that produced it), plus any stage-specific top-level keys (kept in
:attr:`Manifest.extra`). It holds no timestamps: the same input and settings give
byte-identical shards and manifest.

Every URI is read and written through an :class:`~blip_core.io.Opener` (passed in, else the process's
default): local paths by default; ``s3://`` through the opener ``components.storage`` installs (boto3, with
retries; without the workflow extra an ``s3://`` dataset is a one-line error naming the extra).

The implementation is split into :mod:`blip_core.data.manifest` (names, :class:`Manifest`),
:mod:`blip_core.data.writer` (:class:`DatasetWriter`, sinks) and :mod:`blip_core.data.reader` (tar streams,
shards, :func:`check_shards`); this module gathers their public names.
"""

from __future__ import annotations

from blip_core.data.manifest import (
    ANSWER_COUNTS_NAME,
    ANSWER_LIST_NAME,
    DATASET_FORMAT,
    IMAGE_EXTS,
    MANIFEST_NAME,
    REJECTED_NAME,
    SHARD_PREFIX,
    Manifest,
    ShardInfo,
    answer_list,
    read_manifest,
    sha256_file,
    shard_name,
)
from blip_core.data.reader import (
    DEFAULT_MAX_MEMBER_BYTES,
    OVERSIZE_KEY,
    ShardReadError,
    check_shards,
    decode_json,
    iter_shard,
    iter_tar_samples,
    open_uri,
    read_uri_bytes,
    tar_bytes,
    tar_compression,
)
from blip_core.data.writer import DatasetWriter, LocalSink, Sink
from blip_core.io import fsync_path, is_s3, join_uri

__all__ = ["ANSWER_COUNTS_NAME", "ANSWER_LIST_NAME", "DATASET_FORMAT", "DEFAULT_MAX_MEMBER_BYTES", "IMAGE_EXTS",
           "MANIFEST_NAME", "OVERSIZE_KEY", "REJECTED_NAME", "SHARD_PREFIX", "DatasetWriter", "LocalSink", "Manifest",
           "ShardInfo", "ShardReadError", "Sink", "answer_list", "check_shards", "decode_json", "fsync_path",
           "is_s3", "iter_shard", "iter_tar_samples", "join_uri", "open_uri", "read_manifest", "read_uri_bytes",
           "sha256_file", "shard_name", "tar_bytes", "tar_compression"]
