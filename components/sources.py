"""Ingest sources: every kind of input ``blip ingest --source`` reads is one :class:`Source` subclass.

A subclass names itself (``name``), says which URIs it reads (:meth:`Source.matches`), builds itself from a URI
and the ingest settings (:meth:`Source.open`), yields :class:`RawSample` in source order
(:meth:`Source.iter_samples`) and lists the files its data lives in (:meth:`Source.listing`, for
:func:`source_fingerprint`). Defining the subclass registers it in :data:`SOURCES`; :func:`open_source` picks the
first registered source that matches a URI, else the ``fallback`` one (WebDataset shards). A source that reads
images lazily derives from :class:`FetchingSource` and only says how to prepare an entry and fetch its image:
the images of samples another part of a parallel ingest takes are then never read.

The built-in sources: ``toyweb://`` (:class:`ToyWebSource`), WebDataset shards (:class:`ShardSource`),
JSONL/CSV manifests (:class:`ManifestSource`) and BLIP annotation lists (``.json``,
:class:`components.annotations.AnnotationSource`, registered when the ingest stage imports that module).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import posixpath
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from blip_core.config import IngestConfig
from blip_core.data import toyweb
from blip_core.data.checks import Rejected
from blip_core.data.webdataset_io import (
    IMAGE_EXTS,
    OVERSIZE_KEY,
    ShardReadError,
    decode_json,
    iter_tar_samples,
)
from blip_core.errors import UserError
from blip_core.redact import redact
from components import storage
from components.url_fetch import fetch_url

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SOURCES: list[type[Source]] = []  # registered source kinds, in definition order


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




class Source:
    """One kind of ingest input: an iterable of :class:`RawSample` with an optional known length (the progress
    bar). Subclasses with a ``name`` are registered (see the module docstring)."""

    name: ClassVar[str] = ""  # the registry key; empty for an abstract class
    fallback: ClassVar[bool] = False  # read what no other source matches
    total: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            SOURCES.append(cls)

    @classmethod
    def matches(cls, uri: str) -> bool:
        """Whether this source reads ``uri``."""
        return False

    @classmethod
    def open(cls, uri: str, cfg: IngestConfig) -> Source:
        """The source for ``uri`` with the ingest settings; a missing input is a one-line UserError."""
        raise NotImplementedError

    @classmethod
    def listing(cls, uri: str, image_root: str = "") -> list[tuple[str, int, str]]:
        """``(uri, size, version)`` of the files the data of ``uri`` lives in (see :func:`source_fingerprint`)."""
        raise NotImplementedError

    def iter_samples(self) -> Iterator[RawSample]:
        """Every sample in source order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[RawSample]:
        return self.iter_samples()

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        """Every sample in source order with ``want(sample)``; a sample not wanted may come without its image.

        ``want`` sees only what is known before the image is read (key, origin, caption, json), so a source
        that reads or fetches images lazily skips the images of the samples it is not asked for.
        """
        for raw in self.iter_samples():
            yield raw, want(raw)


class FetchingSource(Source):
    """A source of entries whose images are read ``threads`` at a time, and only for wanted samples."""

    threads: int = 1
    entries: Sequence[Any] = ()

    def prepare(self, entry: Any) -> tuple[RawSample, str | None]:
        """The sample of ``entry`` without its image, and the image reference to fetch (None: nothing to fetch;
        the sample then carries its error)."""
        raise NotImplementedError

    def fetch(self, ref: str) -> tuple[bytes | None, Rejected | None]:
        """The image bytes of ``ref``, or why there are none."""
        raise NotImplementedError

    def iter_samples(self) -> Iterator[RawSample]:
        for raw, _ in self.select(lambda raw: True):
            yield raw

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        chunk = 8 * self.threads
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(self.entries), chunk):
                items = [(raw, ref, want(raw)) for raw, ref in map(self.prepare, self.entries[start:start + chunk])]
                fetched = pool.map(lambda it: self.fetch(it[1]) if it[1] and it[2] else (None, None), items)
                for (raw, _, mine), (data, err) in zip(items, fetched):
                    if mine and raw.error is None and data is None:
                        raw.error = err or Rejected("missing_image", "no image")
                    raw.image = data
                    yield raw, mine


def file_listing(uri: str) -> list[tuple[str, int, str]]:
    """The files under a manifest's (or annotation file's) directory, the file itself included."""
    if not storage.exists(uri):
        raise UserError(f"source not found: {redact(uri)}")
    return storage.list_versions(uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent))


def source_class(uri: str) -> type[Source]:
    """The registered source that reads ``uri``."""
    for cls in SOURCES:
        if not cls.fallback and cls.matches(uri):
            return cls
    return next(cls for cls in SOURCES if cls.fallback)


def open_source(uri: str, cfg: IngestConfig) -> Source:
    """The reader for a source URI; a missing or unreachable source raises a one-line UserError."""
    return source_class(uri).open(uri, cfg)


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
    for name, size, version in source_class(uri).listing(uri, image_root):
        h.update(f"\n{name}\t{size}\t{version}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The built-in sources
# --------------------------------------------------------------------------------------------------


class ToyWebSource(Source):
    """``toyweb://?split=...&n=...``: the embedded generator (:mod:`blip_core.data.toyweb`)."""

    name = "toyweb"

    def __init__(self, uri: str) -> None:
        self.spec = toyweb.parse_toyweb_uri(uri)
        self.total = self.spec.n

    @classmethod
    def matches(cls, uri: str) -> bool:
        return toyweb.is_toyweb(uri)

    @classmethod
    def open(cls, uri: str, cfg: IngestConfig) -> Source:
        return cls(uri)

    @classmethod
    def listing(cls, uri: str, image_root: str = "") -> list[tuple[str, int, str]]:
        return []  # deterministic: the URI says it all

    def iter_samples(self) -> Iterator[RawSample]:
        for s in toyweb.generate(self.spec):
            yield RawSample(s.key, "toyweb", s.jpg, s.txt, s.json, s.key)

    def select(self, want: Callable[[RawSample], bool]) -> Iterator[tuple[RawSample, bool]]:
        for i in range(self.spec.n):  # captions first: the image is drawn only for a wanted sample
            s = toyweb.generate_sample(self.spec, i, render=False)
            raw = RawSample(s.key, "toyweb", None, s.txt, s.json, s.key)
            if want(raw):
                raw.image = toyweb.sample_jpeg(self.spec, i)
                yield raw, True
            else:
                yield raw, False


def _first_image(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None



class ShardSource(Source):
    """WebDataset shards under a directory / ``s3://`` prefix, or a single ``.tar``: what no other source reads."""

    name = "shards"
    fallback = True

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

    @classmethod
    def open(cls, uri: str, cfg: IngestConfig) -> Source:
        return cls(uri, cfg.max_member_bytes)

    @classmethod
    def listing(cls, uri: str, image_root: str = "") -> list[tuple[str, int, str]]:
        listing = storage.list_versions(uri, SHARD_SUFFIXES)
        if not listing:
            raise UserError(f"no WebDataset shards (*.tar, *.tar.gz, *.tgz) under {redact(uri)}")
        return listing

    def iter_samples(self) -> Iterator[RawSample]:
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


class ManifestSource(FetchingSource):
    """A ``.jsonl`` / ``.csv`` list of image locations and captions.

    Image paths must stay inside the manifest's directory (or ``s3://`` prefix) unless
    ``allow_paths_outside``; URLs may only reach public addresses unless ``allow_private_urls``; no image
    larger than ``max_bytes`` is read.
    """

    name = "manifest"

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
        self.entries = self.rows

    @classmethod
    def matches(cls, uri: str) -> bool:
        return uri.endswith((".jsonl", ".csv"))

    @classmethod
    def open(cls, uri: str, cfg: IngestConfig) -> Source:
        return cls(uri, cfg.fetch_threads, max_bytes=cfg.max_member_bytes, allow_paths_outside=cfg.allow_paths_outside,
                   allow_private_urls=cfg.allow_private_urls)

    @classmethod
    def listing(cls, uri: str, image_root: str = "") -> list[tuple[str, int, str]]:
        return file_listing(uri)

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

    def fetch(self, ref: str) -> tuple[bytes | None, Rejected | None]:
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

    def prepare(self, entry: tuple[int, dict | None, str]) -> tuple[RawSample, str | None]:
        line, row, err = entry
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

