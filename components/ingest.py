"""Ingest stage: raw web image-text pairs -> checked, cleaned, de-duplicated WebDataset shards.

``blip ingest --source URI --output URI [--config params.yaml] [--set ingest.key=value ...]``

Sources:

- ``toyweb://?split=web&n=2000&noise=0.3&seed=0`` — the embedded generator (:mod:`blip_core.data.toyweb`);
- a directory or ``s3://`` prefix of WebDataset shards (``*.tar``, searched recursively, read in sorted
  order) in the img2dataset layout: ``jpg|jpeg|png|webp`` + ``txt`` + optional ``json``; or one ``.tar``;
- a ``.jsonl`` or ``.csv`` manifest: one row per sample with ``image`` (a path relative to the manifest,
  an absolute path, an ``s3://`` URI or an ``http(s)://`` URL) and ``caption`` (or ``text``); optional
  ``captions`` (a list, JSONL only), ``key`` and ``image_id``; other fields are kept in the sample json.

Every input sample ends up either in a shard or in ``rejected.jsonl`` with a reason (see
:mod:`blip_core.data.checks`); a shard that breaks off mid-way counts its unreadable remainder once as
``unreadable_shard``. The output directory follows the contract of :mod:`blip_core.data.webdataset_io`:
shards, ``rejected.jsonl``, then ``manifest.json`` last. The run is deterministic: re-running after a crash
rewrites byte-identical shards.

A ``.json`` source is an annotation file in the formats of the official BLIP code (pre-training caption
lists, COCO and Flickr Karpathy train/val/test, VQA) with its images under ``--image-root``
(``ingest.image_root``): see :mod:`components.annotations`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import re
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from blip_core.config import Config, IngestConfig, load_config, to_dict
from blip_core.data import toyweb
from blip_core.data.checks import ImageRules, Rejected, check_image, clean_captions
from blip_core.data.webdataset_io import (
    IMAGE_EXTS,
    DatasetWriter,
    Manifest,
    ShardReadError,
    decode_json,
    iter_tar_samples,
)
from blip_core.errors import UserError
from components import storage
from components.cli import add_config_args

log = logging.getLogger(__name__)

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_CAPTION_SOURCES = ("web", "human", "synthetic")


@dataclass
class RawSample:
    """One input sample before checks; ``error`` marks a sample already known to be bad."""

    key: str
    origin: str
    image: bytes | None = None
    txt: bytes | str | None = None
    meta: dict | None = None
    default_image_id: str = ""
    error: Rejected | None = None


@dataclass
class IngestResult:
    """What :func:`run` produced."""

    output: str
    manifest: Manifest
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.manifest.samples_in / max(self.seconds, 1e-9)


def redact(uri: str) -> str:
    """``uri`` without any ``user:password@`` part."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class Source:
    """An iterable of :class:`RawSample` with an optional known length (for the progress bar)."""

    total: int | None = None

    def __iter__(self) -> Iterator[RawSample]:  # pragma: no cover - interface
        raise NotImplementedError


class ToyWebSource(Source):
    def __init__(self, uri: str) -> None:
        self.spec = toyweb.parse_toyweb_uri(uri)
        self.total = self.spec.n

    def __iter__(self) -> Iterator[RawSample]:
        for s in toyweb.generate(self.spec):
            yield RawSample(s.key, "toyweb", s.jpg, s.txt, s.json, s.key)


def _first_image(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


class ShardSource(Source):
    """WebDataset shards under a directory / ``s3://`` prefix, or a single ``.tar``."""

    def __init__(self, uri: str) -> None:
        if uri.endswith(".tar"):
            if not storage.exists(uri):
                raise UserError(f"source not found: {redact(uri)}")
            self.shards = [uri]
        else:
            if storage.is_s3(uri):
                storage.check_bucket(uri)
            elif not Path(uri).is_dir():
                raise UserError(f"source not found: {uri} (expected toyweb://..., a directory or s3:// prefix "
                                "of .tar shards, or a .jsonl/.csv manifest)")
            self.shards = storage.list_uris(uri, ".tar")
            if not self.shards:
                raise UserError(f"no WebDataset shards (*.tar) under {redact(uri)}")

    def __iter__(self) -> Iterator[RawSample]:
        for shard in self.shards:
            name = shard.rsplit("/", 1)[-1]
            with storage.local_copy(shard) as path, open(path, "rb") as f:
                try:
                    for s in iter_tar_samples(f, shard):
                        raw = RawSample(s["__key__"], name, _first_image(s), s.get("txt"),
                                        default_image_id=s["__key__"])
                        try:
                            raw.meta = decode_json(s.get("json"))
                        except ValueError as e:
                            raw.error = Rejected("bad_metadata", f"json: {e}")
                        yield raw
                except ShardReadError as e:
                    yield RawSample(f"{name}#rest", name, error=Rejected("unreadable_shard", str(e)))


class ManifestSource(Source):
    """A ``.jsonl`` / ``.csv`` list of image locations and captions."""

    def __init__(self, uri: str, threads: int) -> None:
        self.uri = uri
        self.threads = max(1, threads)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise UserError(f"source not found: {redact(uri)}") from None
        text = data.decode("utf-8", errors="surrogateescape")
        self.rows: list[tuple[int, dict | None, str]] = []  # (line, row or None, parse error)
        if uri.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for i, row in enumerate(reader, start=2):
                self.rows.append((i, dict(row), ""))
        else:
            for i, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    self.rows.append((i, obj if isinstance(obj, dict) else None, "" if isinstance(obj, dict)
                                      else "line is not a JSON object"))
                except ValueError as e:
                    self.rows.append((i, None, str(e)))
        self.total = len(self.rows)
        self.base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)

    def _location(self, ref: str) -> str:
        if storage.is_s3(ref) or ref.startswith(("http://", "https://")) or Path(ref).is_absolute():
            return ref
        return storage.join(self.base, ref)

    def _fetch(self, ref: str) -> tuple[bytes | None, str]:
        loc = self._location(ref)
        try:
            if loc.startswith(("http://", "https://")):
                with urllib.request.urlopen(loc, timeout=20) as r:  # noqa: S310 - user-given image URLs
                    return r.read(), ""
            return storage.read_bytes(loc), ""
        except (OSError, ValueError, storage.StorageError) as e:
            return None, f"{redact(loc)}: {type(e).__name__}: {e}"

    def _raw(self, line: int, row: dict | None, err: str) -> tuple[RawSample, str | None]:
        key = f"{line:09d}"
        if row is None:
            return RawSample(key, f"line {line}", error=Rejected("bad_metadata", err)), None
        key = str(row.get("key") or row.get("id") or key)
        ref = row.get("image") or row.get("image_path") or row.get("path") or row.get("url")
        caption = row.get("caption", row.get("text", row.get("txt")))
        if caption is not None and not isinstance(caption, str):
            caption = str(caption)
        meta = {k: v for k, v in row.items() if k not in ("image", "image_path", "path", "url", "caption",
                                                          "text", "txt", "key", "id")}
        raw = RawSample(key, f"line {line}", txt=caption, meta=meta, default_image_id=str(ref or key))
        if not isinstance(ref, str) or not ref:
            raw.error = Rejected("missing_image", "row has no image path")
            return raw, None
        return raw, ref

    def __iter__(self) -> Iterator[RawSample]:
        chunk = 8 * self.threads
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(self.rows), chunk):
                items = [self._raw(*r) for r in self.rows[start:start + chunk]]
                fetched = pool.map(lambda it: self._fetch(it[1]) if it[1] else (None, ""), items)
                for (raw, _), (data, err) in zip(items, fetched):
                    if raw.error is None and data is None:
                        raw.error = Rejected("missing_image", err)
                    raw.image = data
                    yield raw


def open_source(uri: str, cfg: IngestConfig) -> Source:
    """The reader for a source URI; a missing or unreachable source raises a one-line UserError."""
    if toyweb.is_toyweb(uri):
        return ToyWebSource(uri)
    if uri.endswith(".json"):
        from components.annotations import AnnotationSource  # imports this module

        return AnnotationSource(uri, cfg)
    if uri.endswith((".jsonl", ".csv")):
        return ManifestSource(uri, cfg.fetch_threads)
    return ShardSource(uri)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


class _Keys:
    """Output keys: the source key made WebDataset-safe, suffixed when already used."""

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
    others = meta.get("captions") or []
    if not isinstance(others, list):
        raise Rejected("bad_metadata", "json captions is not a list")
    captions = clean_captions(raw.txt, others, cfg.max_words)
    image = check_image(raw.image, rules)
    source = meta.get("source") if meta.get("source") in _CAPTION_SOURCES else cfg.caption_source
    meta.update(image_id=str(meta.get("image_id") or raw.default_image_id or raw.key), captions=captions,
                source=source, noise=meta.get("noise"), width=image.width, height=image.height)
    digest = hashlib.sha256(raw.image or b"").digest() + captions[0].encode("utf-8")
    return image.data, image.ext, meta, digest


def run(cfg: Config, source: str, output: str, *, progress: bool = True) -> IngestResult:
    """Ingest ``source`` into the dataset directory ``output`` (local or ``s3://``)."""
    ic = cfg.ingest
    rules = ImageRules(resolution=ic.resolution, min_size=ic.min_size, max_pixels=ic.max_pixels,
                       image_format=ic.image_format, jpeg_quality=ic.jpeg_quality)
    reader = open_source(source, ic)
    writer = DatasetWriter(storage.dataset_sink(output), ic.shard_size)
    keys = _Keys()
    seen: set[bytes] = set()
    samples_in = 0
    t0 = time.perf_counter()
    bar = tqdm(total=reader.total, unit=" samples", desc="ingest", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for raw in reader:
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
                out_key = keys(raw.key)
                if out_key != raw.key:
                    meta["source_key"] = raw.key
                writer.add(out_key, image, ext, meta)
            bar.update()
            if samples_in % 256 == 0:
                bar.set_postfix(rejected=sum(writer.rejected.values()), refresh=False)
        bar.set_postfix(rejected=sum(writer.rejected.values()))
        manifest = writer.finish(samples_in, redact(source), {"ingest": to_dict(ic)})
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("ingest %s -> %s: %d in, %d out, rejected %s, %.0f samples/s", redact(source), output,
             manifest.samples_in, manifest.samples_out, manifest.rejected or "{}", samples_in / max(seconds, 1e-9))
    return IngestResult(output, manifest, seconds)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip ingest", description="Check, clean, de-duplicate and shard raw "
                                "image-text pairs into a WebDataset directory (local or s3://).")
    p.add_argument("--source", help="toyweb://?split=web&n=...&noise=...&seed=..., a directory or s3:// prefix "
                   "of .tar shards, a .jsonl/.csv manifest, or a BLIP annotation .json (default: ingest.source "
                   "of the config)")
    p.add_argument("--image-root", default=None, help="directory or s3:// prefix the image paths of a .json "
                   "annotation file are relative to (default: ingest.image_root, else the file's directory)")
    p.add_argument("--output", required=True, help="output dataset directory: a local path or s3://bucket/prefix")
    add_config_args(p, tracking=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point (``blip ingest``)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    source = args.source or cfg.ingest.source
    if args.image_root:
        cfg.ingest.image_root = args.image_root
    res = run(cfg, source, args.output, progress=not args.no_progress)
    m = res.manifest
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(m.rejected.items())) or "none"
    print(f"ingest: {m.samples_in} in, {m.samples_out} out ({m.captions_out} captions) in {len(m.shards)} "
          f"shard(s) at {res.output}; rejected: {rejected}; {res.samples_per_s:.0f} samples/s")
    return 0

