"""Ingest stage: raw web image-text pairs -> checked, cleaned, de-duplicated WebDataset shards.

``blip ingest --source URI --output URI [--config params.yaml] [--set ingest.key=value ...]``
``[--workers N | --part I --parts N]``; ``blip ingest merge PART_URI ... --output URI`` (parallel ingest:
:mod:`components.ingest_parts`)

Sources:

- ``toyweb://?split=web&n=2000&noise=0.3&seed=0`` — the embedded generator (:mod:`blip_core.data.toyweb`);
- a directory or ``s3://`` prefix of WebDataset shards (``*.tar``, and gzip-compressed ``*.tar.gz`` / ``*.tgz``,
  searched recursively, read in sorted order) in the img2dataset layout: ``jpg|jpeg|png|webp`` + ``txt`` +
  optional ``json``; or one such file. Only the ``.tar.gz``/``.tgz`` names are decompressed (a compressed
  stream named ``.tar`` is an unreadable shard), and a member larger than ``ingest.max_member_bytes`` is
  never read: its sample is rejected as ``too_large``;
- a ``.jsonl`` or ``.csv`` manifest: one row per sample with ``image`` (a path relative to the manifest,
  an absolute path, an ``s3://`` URI or an ``http(s)://`` URL) and ``caption`` (or ``text``); optional
  ``captions`` (a list, JSONL only), ``key`` and ``image_id``; other fields are kept in the sample json.
  Paths (and ``s3://`` keys) must stay inside the manifest's directory or prefix (else ``outside_root``,
  whether or not the file exists; ``ingest.allow_paths_outside`` lifts it); URLs must be http(s) to public
  addresses, checked on every redirect and at connect (else ``blocked_url``; ``ingest.allow_private_urls``);
  no image over ``ingest.max_member_bytes`` is read (``too_large``).

Every input sample ends up either in a shard or in ``rejected.jsonl`` with a reason (see
:mod:`blip_core.data.checks`); a shard that breaks off mid-way counts its unreadable remainder once as
``unreadable_shard``. The output directory follows the contract of :mod:`blip_core.data.webdataset_io`:
shards, ``rejected.jsonl``, then ``manifest.json`` last. The run is deterministic: re-running after a crash
rewrites byte-identical shards.

A ``.json`` source is an annotation file in the formats of the official BLIP code (pre-training caption
lists, COCO and Flickr Karpathy train/val/test, VQA) with its images under ``--image-root``
(``ingest.image_root``): see :mod:`components.annotations`.

Each kind of source is one :class:`components.sources.Source` subclass, found by the URI it matches (adding a
kind of input is adding a subclass); image URLs are fetched by :mod:`components.url_fetch`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from blip_core.config import Config, IngestConfig, load_config, to_dict
from blip_core.data.checks import ImageRules, Rejected, check_image, clean_captions, clean_questions
from blip_core.data.webdataset_io import DatasetWriter, Manifest
from blip_core.errors import UserError
from blip_core.redact import redact
from components import annotations, storage  # noqa: F401  (annotations: registers its Source)
from components.ingest_parts import PART_KEY, IngestResult, main_merge, run_workers
from components.sources import (  # noqa: F401  (re-exported: the stage's public names)
    SHARD_SUFFIXES,
    SOURCES,
    ManifestSource,
    RawSample,
    ShardSource,
    Source,
    ToyWebSource,
    open_source,
    source_fingerprint,
)
from components.spec import Option, StageSpec
from components.url_fetch import check_url, fetch_url  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_CAPTION_SOURCES = ("web", "human", "synthetic")


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------




def part_of(raw: RawSample, parts: int, max_words: int) -> int:
    """The part (``0..parts-1``) a sample belongs to, from what is known before its image is read.

    The part is a hash of the cleaned primary caption (a VQA sample: its cleaned questions), the text that, with the image bytes, makes the
    de-duplication digest of :func:`_check`: exact duplicates always fall into the same part, where the
    first in source order is kept as in a single run. A sample without a usable caption (it will be
    rejected) is placed by a hash of its origin and key.
    """
    if parts == 1:
        return 0
    try:
        meta = raw.meta or {}
        if "questions" in meta:  # a VQA sample: its cleaned questions, as the de-duplication digest
            questions, _ = clean_questions(meta["questions"])
            if not questions:
                raise Rejected("empty_question")
            key = json.dumps([(q["question_id"], q["question"]) for q in questions]).encode("utf-8")
            return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % parts
        others = (raw.meta or {}).get("captions") or []
        key = clean_captions(raw.txt, others if isinstance(others, list) else [], max_words)[0].encode("utf-8")
    except Rejected:
        key = f"\0{raw.origin}\0{raw.key}".encode("utf-8", errors="surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % parts


def _part_samples(reader: Source, part: tuple[int, int] | None,
                  max_words: int) -> Iterator[tuple[RawSample, bool]]:
    """``(sample, in this part)`` for every sample of ``reader`` in source order."""
    if part is None or part[1] == 1:
        for raw in reader:
            yield raw, True
        return
    index, parts = part
    yield from reader.select(lambda raw: part_of(raw, parts, max_words) == index)


class _Keys:
    """Output keys: the source key made WebDataset-safe, suffixed when already used.

    Every input sample takes its key in source order, whether it is kept, rejected or left to another part
    (:func:`part_of`), so a kept sample's key does not depend on how the source is split into parts.
    """

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, key: str) -> str:
        base = _KEY_CHARS.sub("_", key).strip("_") or "sample"
        out, n = base, 1
        while out in self.used:
            out, n = f"{base}_{n}", n + 1
        self.used.add(out)
        return out


def _check(raw: RawSample, cfg: IngestConfig, rules: ImageRules) -> tuple[bytes, str, dict, bytes]:
    """Check one sample; returns (image bytes, extension, json meta, dedupe digest) or raises Rejected."""
    if raw.error is not None:
        raise raw.error
    meta = dict(raw.meta or {})
    if "questions" in meta:  # a VQA sample: questions (each kept or dropped with a reason), no caption
        questions, dropped = clean_questions(meta["questions"])
        captions, meta["questions"] = [], questions
        if dropped:
            meta["dropped_questions"] = dropped
        text = json.dumps([(q["question_id"], q["question"]) for q in questions])
    else:
        others = meta.get("captions") or []
        if not isinstance(others, list):
            raise Rejected("bad_metadata", "json captions is not a list")
        captions = clean_captions(raw.txt, others, cfg.max_words)
        text = captions[0]
    image = check_image(raw.image, rules)
    source = meta.get("source") if meta.get("source") in _CAPTION_SOURCES else cfg.caption_source
    meta.update(image_id=str(meta.get("image_id") or raw.default_image_id or raw.key), captions=captions,
                source=source, noise=meta.get("noise"), width=image.width, height=image.height)
    digest = hashlib.sha256(raw.image or b"").digest() + text.encode("utf-8")
    return image.data, image.ext, meta, digest


def run(cfg: Config, source: str, output: str, *, progress: bool = True,
        part: tuple[int, int] | None = None) -> IngestResult:
    """Ingest ``source`` into the dataset directory ``output`` (local or ``s3://``).

    ``part=(i, n)`` writes part ``i`` of ``n`` only: the samples :func:`part_of` assigns to ``i``, into a
    dataset directory whose manifest records the part; :func:`components.ingest_parts.merge` joins the ``n``
    parts into the dataset a single run writes (same samples, keys and rejection counts).
    """
    ic = cfg.ingest
    rules = ImageRules(resolution=ic.resolution, min_size=ic.min_size, max_pixels=ic.max_pixels,
                       image_format=ic.image_format, jpeg_quality=ic.jpeg_quality)
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise UserError(f"--part must be in 0..{part[1] - 1} and --parts >= 1, got part {part[0]} of {part[1]}")
    reader = open_source(source, ic)
    writer = DatasetWriter(storage.dataset_sink(output), ic.shard_size)
    writer.write_answer_counts = part is not None
    keys = _Keys()
    seen: set[bytes] = set()
    samples_in = 0
    t0 = time.perf_counter()
    bar = tqdm(total=reader.total, unit=" samples", desc="ingest", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for raw, mine in _part_samples(reader, part, ic.max_words):
            out_key = keys(raw.key)
            bar.update()
            if not mine:
                continue
            samples_in += 1
            try:
                image, ext, meta, digest = _check(raw, ic, rules)
                if ic.dedupe:
                    if digest in seen:
                        raise Rejected("duplicate", "same image bytes and caption as an earlier sample")
                    seen.add(digest)
            except Rejected as r:
                writer.reject(raw.key, r.reason, r.detail, raw.origin)
            else:
                if out_key != raw.key:
                    meta["source_key"] = raw.key
                writer.add(out_key, image, ext, meta)
            if samples_in % 256 == 0:
                bar.set_postfix(rejected=sum(writer.rejected.values()), refresh=False)
        bar.set_postfix(rejected=sum(writer.rejected.values()))
        extra = {PART_KEY: {"index": part[0], "parts": part[1]}} if part is not None else None
        manifest = writer.finish(samples_in, redact(source), {"ingest": redact(to_dict(ic))}, extra)
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("ingest %s -> %s: %d in, %d out, rejected %s, %.0f samples/s", redact(source), output,
             manifest.samples_in, manifest.samples_out, manifest.rejected or "{}", samples_in / max(seconds, 1e-9))
    return IngestResult(output, manifest, seconds)


SPEC = StageSpec(
    name="ingest", module=__name__, tracking=False,
    description="Check, clean, de-duplicate and shard raw image-text pairs into a WebDataset directory (local or "
                "s3://).",
    inputs=(Option("--source", "toyweb://?split=web&n=...&noise=...&seed=..., a directory or s3:// prefix of .tar "
                   "shards, a .jsonl/.csv manifest, or a BLIP annotation .json (default: ingest.source of the "
                   "config)", kind="input"),
            Option("--image-root", "directory or s3:// prefix the image paths of a .json annotation file are "
                   "relative to (default: ingest.image_root, else the file's directory)", kind="input")),
    outputs=(Option("--output", "output dataset directory: a local path or s3://bucket/prefix", kind="output",
                    required=True),),
    options=(Option("--no-progress", "no progress bar", action="store_true"),
             Option("--workers", "local processes, each ingesting one part, then merged (the same samples and "
                    "rejection counts as 1; default 1)", type=int, default=1),
             Option("--part", "write only part I of --parts N (for one pod of a parallel ingest; join the parts "
                    "with 'blip ingest merge')", type=int, metavar="I"),
             Option("--parts", "number of parts (with --part)", type=int, metavar="N")),
    config=("ingest",))


def _parser() -> argparse.ArgumentParser:
    return SPEC.parser()


def summary(m: Manifest, output: str, name: str = "ingest") -> str:
    """The final line of an ingest, from the dataset's manifest: printed by ``blip ingest`` and by the pipeline's
    ingest steps."""
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(m.rejected.items())) or "none"
    texts = f"{m.extra['questions_out']} questions" if m.extra.get("questions_out") else f"{m.captions_out} captions"
    return (f"{name}: {m.samples_in} in, {m.samples_out} out ({texts}) in {len(m.shards)} shard(s) at {output}; "
            f"rejected: {rejected}")


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point (``blip ingest``; ``blip ingest merge`` joins parts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return main_merge(argv[1:])
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    source = args.source or cfg.ingest.source
    if args.image_root:
        cfg.ingest.image_root = args.image_root
    res = _run_cli(cfg, source, args)
    print(f"{summary(res.manifest, res.output)}; {res.samples_per_s:.0f} samples/s")
    return 0


def _run_cli(cfg: Config, source: str, args: argparse.Namespace) -> IngestResult:
    """One run, one part (``--part``/``--parts``) or local worker processes (``--workers``)."""
    if (args.part is None) != (args.parts is None):
        raise UserError("--part and --parts go together")
    if args.part is not None:
        if args.workers != 1:
            raise UserError("--workers and --part exclude each other: a part is one process")
        return run(cfg, source, args.output, progress=not args.no_progress, part=(args.part, args.parts))
    return run_workers(run, cfg, source, args.output, args.workers, progress=not args.no_progress)

