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
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import posixpath
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from blip_core.config import Config, IngestConfig, load_config, to_dict
from blip_core.data import toyweb
from blip_core.data.checks import ImageRules, Rejected, check_image, clean_captions, clean_questions
from blip_core.data.webdataset_io import (
    IMAGE_EXTS,
    OVERSIZE_KEY,
    DatasetWriter,
    Manifest,
    ShardReadError,
    decode_json,
    iter_tar_samples,
)
from blip_core.errors import UserError
from blip_core.redact import redact
from components import storage
from components.spec import Option, StageSpec

log = logging.getLogger(__name__)

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
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
    part_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of each worker's part (--workers)

    @property
    def samples_per_s(self) -> float:
        return self.manifest.samples_in / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class Source:
    """An iterable of :class:`RawSample` with an optional known length (for the progress bar)."""

    total: int | None = None

    def __iter__(self) -> Iterator[RawSample]:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        """Every sample in source order with ``want(sample)``; a sample not wanted may come without its image.

        ``want`` sees only what is known before the image is read (key, origin, caption, json), so a source
        that reads or fetches images lazily skips the images of the samples it is not asked for.
        """
        for raw in self:
            yield raw, want(raw)


class ToyWebSource(Source):
    def __init__(self, uri: str) -> None:
        self.spec = toyweb.parse_toyweb_uri(uri)
        self.total = self.spec.n

    def __iter__(self) -> Iterator[RawSample]:
        for s in toyweb.generate(self.spec):
            yield RawSample(s.key, "toyweb", s.jpg, s.txt, s.json, s.key)

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        for i in range(self.spec.n):  # captions first: the image is drawn only for a wanted sample
            s = toyweb.generate_sample(self.spec, i, render=False)
            raw = RawSample(s.key, "toyweb", None, s.txt, s.json, s.key)
            if want(raw):
                raw.image = toyweb.generate_sample(self.spec, i).jpg
                yield raw, True
            else:
                yield raw, False


def _first_image(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


class ShardSource(Source):
    """WebDataset shards under a directory / ``s3://`` prefix, or a single ``.tar``."""

    def __init__(self, uri: str, max_member_bytes: int = 0) -> None:
        self.max_member_bytes = max_member_bytes
        if uri.endswith(SHARD_SUFFIXES):
            if not storage.exists(uri):
                raise UserError(f"source not found: {redact(uri)}")
            self.shards = [uri]
        else:
            if storage.is_s3(uri):
                storage.check_bucket(uri)
            elif not Path(uri).is_dir():
                raise UserError(f"source not found: {uri} (expected toyweb://..., a directory or s3:// prefix "
                                "of .tar shards, or a .jsonl/.csv manifest)")
            self.shards = storage.list_uris(uri, SHARD_SUFFIXES)
            if not self.shards:
                raise UserError(f"no WebDataset shards (*.tar, *.tar.gz, *.tgz) under {redact(uri)}")

    def __iter__(self) -> Iterator[RawSample]:
        for shard in self.shards:
            name = shard.rsplit("/", 1)[-1]
            with storage.local_copy(shard) as path, open(path, "rb") as f:
                try:
                    for s in iter_tar_samples(f, shard, self.max_member_bytes):
                        raw = RawSample(s["__key__"], name, _first_image(s), s.get("txt"),
                                        default_image_id=s["__key__"])
                        if OVERSIZE_KEY in s:
                            raw.error = Rejected("too_large", s[OVERSIZE_KEY])
                            yield raw
                            continue
                        try:
                            raw.meta = decode_json(s.get("json"))
                        except ValueError as e:
                            raw.error = Rejected("bad_metadata", f"json: {e}")
                        yield raw
                except ShardReadError as e:
                    yield RawSample(f"{name}#rest", name, error=Rejected("unreadable_shard", str(e)))


class _BlockedAddress(OSError):
    """A connection reached an address that image URLs may not reach."""


def _private(ip: str) -> bool:
    """Whether ``ip`` is private, loopback, link-local, reserved, multicast or unspecified (v4 or v6)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast
            or addr.is_unspecified)


def check_url(url: str, allow_private: bool = False) -> None:
    """Raise :class:`Rejected` unless ``url`` is http(s) and (without ``allow_private``) every address its
    host resolves to is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Rejected("blocked_url", f"{redact(url)}: only http(s) URLs with a host are fetched")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise Rejected("missing_image", f"{redact(url)}: cannot resolve the host ({e})") from None
    if any(_private(info[4][0]) for info in infos):
        raise Rejected("blocked_url", f"{redact(url)}: the host resolves to a private, loopback or link-local "
                       "address (ingest.allow_private_urls)")


class _PeerCheck:
    """Mixin for http.client connections: refuse a connected peer at a private address (DNS rebinding)."""

    check_peer = True

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if self.check_peer and _private(self.sock.getpeername()[0]):  # type: ignore[attr-defined]
            self.sock.close()  # type: ignore[attr-defined]
            raise _BlockedAddress("connected to a private, loopback or link-local address")


class _CheckedHTTP(_PeerCheck, http.client.HTTPConnection):
    pass


class _CheckedHTTPS(_PeerCheck, http.client.HTTPSConnection):
    pass


def _via_proxy(req: urllib.request.Request) -> bool:
    return bool(getattr(req, "_tunnel_host", None)) or req.has_proxy()


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        cls = type("Conn", (_CheckedHTTP,), {"check_peer": not _via_proxy(req)})
        return self.do_open(cls, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        cls = type("Conn", (_CheckedHTTPS,), {"check_peer": not _via_proxy(req)})
        return self.do_open(cls, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, self.allow_private)  # every hop is checked like the first URL
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, max_bytes: int, allow_private: bool = False, timeout: float = 20) -> bytes:
    """GET an image URL: http(s) only, public addresses only (unless ``allow_private``; redirects and the
    connected peer are checked too), at most ``max_bytes`` (streamed; more raises ``Rejected("too_large")``)."""
    check_url(url, allow_private)
    handlers: list = [_RedirectHandler(allow_private)]
    if not allow_private:
        handlers += [_HTTPHandler(), _HTTPSHandler()]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            if max_bytes and length and length.isdigit() and int(length) > max_bytes:
                raise Rejected("too_large", f"{redact(url)}: {length} bytes > {max_bytes} (ingest.max_member_bytes)")
            chunks, size = [], 0
            while chunk := r.read(1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if max_bytes and size > max_bytes:
                    raise Rejected("too_large", f"{redact(url)}: more than {max_bytes} bytes (ingest.max_member_bytes)")
            return b"".join(chunks)
    except urllib.error.URLError as e:
        if isinstance(e.reason, _BlockedAddress):
            raise Rejected("blocked_url", f"{redact(url)}: {e.reason} (ingest.allow_private_urls)") from None
        raise


class ManifestSource(Source):
    """A ``.jsonl`` / ``.csv`` list of image locations and captions.

    Image paths must stay inside the manifest's directory (or ``s3://`` prefix) unless
    ``allow_paths_outside``; URLs may only reach public addresses unless ``allow_private_urls``; no image
    larger than ``max_bytes`` is read.
    """

    def __init__(self, uri: str, threads: int, *, max_bytes: int = 0, allow_paths_outside: bool = False,
                 allow_private_urls: bool = False) -> None:
        self.uri = uri
        self.threads = max(1, threads)
        self.max_bytes = max_bytes
        self.allow_outside = allow_paths_outside
        self.allow_private = allow_private_urls
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
        self.base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).resolve().parent)

    def _location(self, ref: str) -> str:
        """Where ``ref`` points; raises ``Rejected("outside_root")`` (the same whether or not it exists)."""
        if ref.startswith(("http://", "https://")):
            return ref
        if storage.is_s3(ref) or storage.is_s3(self.base):
            absolute = storage.is_s3(ref) or Path(ref).is_absolute()
            loc = ref if absolute else storage.join(self.base, ref)
            inside = False
            if storage.is_s3(self.base) and storage.is_s3(loc):
                bucket, key = storage.split_s3(loc)
                base_bucket, base_key = storage.split_s3(self.base)
                norm = posixpath.normpath("/" + key)[1:]
                inside = bucket == base_bucket and (not base_key or norm.startswith(base_key.rstrip("/") + "/"))
        else:
            loc = str(Path(self.base) / ref)
            inside = Path(loc).resolve().is_relative_to(self.base)
        if not inside and not self.allow_outside:
            raise Rejected("outside_root", f"{ref}: outside the manifest's directory (ingest.allow_paths_outside)")
        return loc

    def _fetch(self, ref: str) -> tuple[bytes | None, Rejected | None]:
        try:
            loc = self._location(ref)
        except Rejected as r:
            return None, r
        try:
            if loc.startswith(("http://", "https://")):
                return fetch_url(loc, self.max_bytes, self.allow_private), None
            return storage.read_bytes(loc, max_bytes=self.max_bytes), None
        except Rejected as r:
            return None, r
        except storage.TooLarge:
            return None, Rejected("too_large", f"{redact(loc)}: larger than {self.max_bytes} bytes "
                                  "(ingest.max_member_bytes)")
        except (OSError, ValueError, http.client.HTTPException, storage.StorageError) as e:
            return None, Rejected("missing_image", f"{redact(loc)}: {type(e).__name__}: {e}")

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
        for raw, _ in self.select(lambda raw: True):
            yield raw

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        chunk = 8 * self.threads
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(self.rows), chunk):
                items = [(raw, ref, want(raw)) for raw, ref in (self._raw(*r) for r in self.rows[start:start + chunk])]
                fetched = pool.map(lambda it: self._fetch(it[1]) if it[1] and it[2] else (None, None), items)
                for (raw, _, mine), (data, err) in zip(items, fetched):
                    if mine and raw.error is None and data is None:
                        raw.error = err or Rejected("missing_image", "no image")
                    raw.image = data
                    yield raw, mine


def open_source(uri: str, cfg: IngestConfig) -> Source:
    """The reader for a source URI; a missing or unreachable source raises a one-line UserError."""
    if toyweb.is_toyweb(uri):
        return ToyWebSource(uri)
    if uri.endswith(".json"):
        from components.annotations import AnnotationSource  # imports this module

        return AnnotationSource(uri, cfg)
    if uri.endswith((".jsonl", ".csv")):
        return ManifestSource(uri, cfg.fetch_threads, max_bytes=cfg.max_member_bytes,
                              allow_paths_outside=cfg.allow_paths_outside,
                              allow_private_urls=cfg.allow_private_urls)
    return ShardSource(uri, cfg.max_member_bytes)


def source_fingerprint(uri: str, image_root: str = "") -> str:
    """A hash of what ``uri`` holds now, to key cached ingest outputs: it changes when the data does.

    ``toyweb://``: the URI (the generator is deterministic). Shards (a file, a directory or an ``s3://``
    prefix): every shard's name, size and version (S3 ETag, local modification time). A JSONL/CSV manifest:
    the same for every file under the manifest's directory (the manifest itself and the images it may
    reference without ``ingest.allow_paths_outside``); images fetched by URL or from outside that directory
    are not covered. A ``.json`` annotation file: the same for the files under its directory and under
    ``image_root`` (``ingest.image_root``) when one is given.
    """
    h = hashlib.sha256(redact(uri).encode())
    if toyweb.is_toyweb(uri):
        return h.hexdigest()
    if uri.endswith((".jsonl", ".csv", ".json")):
        if not storage.exists(uri):
            raise UserError(f"source not found: {redact(uri)}")
        listing = storage.list_versions(uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent))
        if uri.endswith(".json") and image_root:
            listing = [*listing, *storage.list_versions(image_root)]
    else:
        listing = storage.list_versions(uri, SHARD_SUFFIXES)
        if not listing:
            raise UserError(f"no WebDataset shards (*.tar, *.tar.gz, *.tgz) under {redact(uri)}")
    for name, size, version in listing:
        h.update(f"\n{name}\t{size}\t{version}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


PART_KEY = "part"  # manifest key of a part written with run(part=...): {"index": i, "parts": n}


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
        from components.ingest_parts import main_merge

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
    from components.ingest_parts import run_workers

    return run_workers(cfg, source, args.output, args.workers, progress=not args.no_progress)

