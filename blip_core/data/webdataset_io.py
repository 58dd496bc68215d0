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

Reading ``s3://`` uses fsspec/s3fs with the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(path-style addressing) and credentials from the standard AWS environment/config. Requests answered with a
5xx or throttling error are retried (botocore standard mode, 5 attempts with back-off), so a short error storm
while the loader streams shards loses no sample.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from webdataset.writer import TarWriter

from blip_core.errors import UserError

DATASET_FORMAT = "blip-capfilt/webdataset-v1"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
ANSWER_LIST_NAME = "answer_list.json"
ANSWER_COUNTS_NAME = "answer_counts.json"  # an ingest part's answer counts, summed by the merge
SHARD_PREFIX = "shard-"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000000.tar``."""
    return f"{SHARD_PREFIX}{index:06d}.tar"


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def join_uri(base: str, name: str) -> str:
    """``base/name`` for local paths and ``s3://`` prefixes alike."""
    base = str(base)
    if is_s3(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(base) / name)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """One shard of a dataset directory."""

    path: str  # relative to the dataset directory
    samples: int
    captions: int
    bytes: int | None = None  # None in manifests written without it: size not checked
    sha256: str | None = None  # None in manifests written without it: content not checked
    questions: int | None = None  # VQA questions in the shard (None: a caption data set)


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring)."""

    source: str
    samples_in: int
    samples_out: int
    captions_out: int
    rejected: dict[str, int]
    shards: list[ShardInfo]
    config: dict[str, Any] = field(default_factory=dict)
    format: str = DATASET_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific top-level keys (e.g. filter stats)

    def to_json(self) -> str:
        d = asdict(self)
        extra = d.pop("extra")
        for shard in d["shards"]:
            if shard["questions"] is None:  # caption data sets keep the manifest they always had
                del shard["questions"]
        d["rejected"] = dict(sorted(self.rejected.items()))
        return json.dumps({**extra, **d}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(text)
            shards = [ShardInfo(**s) for s in d.pop("shards")]
            known = {f for f in cls.__dataclass_fields__ if f not in ("shards", "extra")}
            extra = {k: d.pop(k) for k in list(d) if k not in known}
            return cls(shards=shards, extra=extra, **d)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{where}: not a valid dataset manifest ({e})") from None

    def check_counts(self) -> None:
        """Raise if a sample went missing: ``samples_in == samples_out + sum(rejected)`` and shard sums."""
        if self.samples_in != self.samples_out + sum(self.rejected.values()):
            raise AssertionError(f"samples_in {self.samples_in} != samples_out {self.samples_out} + "
                                 f"rejected {sum(self.rejected.values())}")
        if sum(s.samples for s in self.shards) != self.samples_out:
            raise AssertionError("shard sample counts do not add up to samples_out")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where a dataset directory is published: every method is atomic per file."""

    def put_file(self, local: Path, name: str) -> None:
        """Move/upload ``local`` to ``name`` in the directory (the local file may be consumed)."""
        ...

    def put_bytes(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None:
        """Remove ``name`` if present."""
        ...

    def list_names(self) -> list[str]:
        """Names of the files directly in the directory."""
        ...


def fsync_path(path: str | Path) -> None:
    """Flush a file's content, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_close(f: IO) -> None:
    """Flush, fsync and close a file written through Python (before it is published by a rename)."""
    f.flush()
    os.fsync(f.fileno())
    f.close()


class LocalSink:
    """A local dataset directory; files appear under their final name only when complete and on disk (fsync)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        for stale in self.dir.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def staging_dir(self) -> Path:
        """A scratch directory on the same filesystem, so publishing a staged file is a rename."""
        path = self.dir / f".staging-{os.getpid()}"
        path.mkdir(exist_ok=True)
        return path

    def _tmp(self, name: str) -> Path:
        return self.dir / f".{name}.tmp-{os.getpid()}"

    def put_file(self, local: Path, name: str) -> None:
        final = self.dir / name
        try:
            os.replace(local, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = self._tmp(name)
            shutil.copyfile(local, tmp)
            fsync_path(tmp)
            os.replace(tmp, final)
        fsync_path(self.dir)

    def put_bytes(self, name: str, data: bytes) -> None:
        tmp = self._tmp(name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        fsync_path(self.dir)

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def list_names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_file())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def answer_list(counts: Counter[str]) -> list[str]:
    """Distinct answers, most frequent first (ties in alphabetical order): ``answer_list.json``."""
    return sorted(counts, key=lambda a: (-counts[a], a))


class DatasetWriter:
    """Write accepted samples into shards and rejected ones into ``rejected.jsonl``, manifest last.

    Opening a writer first deletes any ``manifest.json`` in the sink, so an interrupted run never leaves
    a directory that looks complete. Shards are staged locally (in the sink's ``staging_dir()`` when it
    has one, else a temporary directory), then published through the sink one by one; :meth:`finish` removes shards left from an earlier, larger run, then publishes
    ``rejected.jsonl`` and finally ``manifest.json``.
    """

    def __init__(self, sink: Sink, shard_size: int, staging_dir: str | Path | None = None) -> None:
        if shard_size < 1:
            raise UserError(f"shard size must be >= 1, got {shard_size}")
        self.sink = sink
        self.shard_size = shard_size
        self._own_staging = staging_dir is None
        if staging_dir is None:
            make = getattr(sink, "staging_dir", None)
            staging_dir = make() if make is not None else tempfile.mkdtemp(prefix="blip-shards-")
        self.staging = Path(staging_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.sink.delete(MANIFEST_NAME)
        self.sink.delete(ANSWER_LIST_NAME)
        self.shards: list[ShardInfo] = []
        self.questions_out = 0
        self.write_answer_counts = False  # also answer_counts.json (an ingest part: the merge sums them)
        self.answers: Counter[str] = Counter()  # every annotator answer of the VQA samples
        self.questions_dropped: Counter[str] = Counter()  # reason -> questions dropped from kept samples
        self.rejected: Counter[str] = Counter()
        self.samples_out = 0
        self.captions_out = 0
        self._rejected_file = open(self.staging / REJECTED_NAME, "w", encoding="utf-8")  # noqa: SIM115
        self._tar: TarWriter | None = None
        self._tar_file: IO[bytes] | None = None
        self._in_shard = 0
        self._captions_in_shard = 0

    def _open_shard(self) -> None:
        path = self.staging / shard_name(len(self.shards))
        self._tar_file = open(path, "wb")  # noqa: SIM115
        self._tar = TarWriter(self._tar_file, user="", group="", mode=0o644, mtime=0, encoder=False)
        self._in_shard = 0
        self._captions_in_shard = 0
        self._questions_in_shard: int | None = None

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tar_file is not None
        self._tar.close()
        _sync_close(self._tar_file)
        name = shard_name(len(self.shards))
        path = self.staging / name
        info = ShardInfo(name, self._in_shard, self._captions_in_shard, path.stat().st_size, sha256_file(path),
                         self._questions_in_shard)
        self.sink.put_file(path, name)
        path.unlink(missing_ok=True)
        self.shards.append(info)
        self._tar = self._tar_file = None

    def add(self, key: str, image: bytes, image_ext: str, meta: dict) -> None:
        """Add one accepted sample; ``meta["captions"][0]`` becomes ``txt`` (a VQA sample, with
        ``meta["questions"]`` and no captions, has no ``txt``)."""
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        captions = meta.get("captions") or []
        questions = meta.get("questions")
        if not captions and not questions:
            raise ValueError(f"{key}: a sample needs captions or questions")
        sample = {"__key__": key, image_ext: image,
                  "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
        if captions:
            sample["txt"] = captions[0].encode("utf-8")
        if questions:
            self._questions_in_shard = (self._questions_in_shard or 0) + len(questions)
            self.questions_out += len(questions)
            self.answers.update(a for q in questions for a in q.get("answers") or [])
            self.questions_dropped.update(d.get("reason", "") for d in meta.get("dropped_questions") or [])
        self._tar.write(sample)
        self._in_shard += 1
        self._captions_in_shard += len(captions)
        self.samples_out += 1
        self.captions_out += len(captions)
        if self._in_shard >= self.shard_size:
            self._close_shard()

    def reject(self, key: str, reason: str, detail: str = "", origin: str = "") -> None:
        """Count and list one rejected input sample."""
        self.rejected[reason] += 1
        rec = {"key": key, "reason": reason, "detail": detail[:300], "origin": origin}
        self._rejected_file.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def finish(self, samples_in: int, source: str, config: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Manifest:
        """Flush the last shard, publish ``rejected.jsonl`` and then ``manifest.json``; return the manifest.

        ``extra`` adds stage-specific top-level keys to the manifest.
        """
        if self._tar is not None:
            self._close_shard()
        extra = dict(extra or {})
        if self.questions_out:
            extra["questions_out"] = self.questions_out
        if self.questions_dropped:
            extra["questions_dropped"] = dict(sorted(self.questions_dropped.items()))
        manifest = Manifest(source=source, samples_in=samples_in, samples_out=self.samples_out,
                            captions_out=self.captions_out, rejected=dict(self.rejected), shards=self.shards,
                            config=config or {}, extra=extra)
        manifest.check_counts()
        keep = {s.path for s in self.shards}
        for name in self.sink.list_names():
            if name.startswith(SHARD_PREFIX) and name.endswith(".tar") and name not in keep:
                self.sink.delete(name)
        _sync_close(self._rejected_file)
        self.sink.put_file(self.staging / REJECTED_NAME, REJECTED_NAME)
        if self.questions_out and self.write_answer_counts:
            self.sink.put_bytes(ANSWER_COUNTS_NAME, json.dumps(dict(sorted(self.answers.items())),
                                                               ensure_ascii=False).encode("utf-8"))
        if self.questions_out:
            self.sink.put_bytes(ANSWER_LIST_NAME, (json.dumps(answer_list(self.answers), ensure_ascii=False,
                                                               indent=0) + "\n").encode("utf-8"))
        self.sink.put_bytes(MANIFEST_NAME, manifest.to_json().encode("utf-8"))
        self.close()
        return manifest

    def close(self) -> None:
        """Release files and the staging directory (no manifest is written)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        for f in (self._tar_file, self._rejected_file):
            if f is not None and not f.closed:
                f.close()
        if self._own_staging:
            shutil.rmtree(self.staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class ShardReadError(Exception):
    """A shard could not be read to its end (truncated or not a tar file)."""


def s3_filesystem(fresh: bool = False):
    """An s3fs filesystem for the endpoint in ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (path-style).

    ``fresh=True`` bypasses fsspec's instance cache (use it in DataLoader workers after a fork). s3fs is part of
    the workflow extra: without it an ``s3://`` dataset is a one-line ``UserError``.
    """
    try:
        import fsspec
        import s3fs  # noqa: F401  (fsspec's "s3" protocol)
    except ImportError as e:
        raise UserError(f"reading s3:// datasets needs {e.name or 's3fs'}, part of the workflow extra: "
                        "pip install 'blip-capfilt[workflow]'") from None

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return fsspec.filesystem(
        "s3",
        client_kwargs={"endpoint_url": endpoint, "region_name": region},
        config_kwargs={"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 5, "mode": "standard"}},
        skip_instance_cache=fresh,
    )


def open_uri(uri: str, fs: Any = None) -> IO[bytes]:
    """Open a local path or ``s3://`` URI for binary reading."""
    if is_s3(uri):
        fs = fs or s3_filesystem()
        return fs.open(uri[len("s3://"):], "rb", block_size=8 << 20)
    return open(uri, "rb")  # noqa: SIM115


def read_uri_bytes(uri: str, fs: Any = None) -> bytes:
    """Whole content of a local path or ``s3://`` URI."""
    with open_uri(uri, fs) as f:
        return f.read()


def read_manifest(dataset_uri: str, fs: Any = None) -> Manifest:
    """Read ``manifest.json`` of a dataset directory; a missing one is a :class:`UserError`."""
    uri = join_uri(dataset_uri, MANIFEST_NAME)
    try:
        text = read_uri_bytes(uri, fs)
    except FileNotFoundError:
        raise UserError(f"{dataset_uri}: no {MANIFEST_NAME}: not a complete dataset directory "
                        "(missing, or the stage that writes it did not finish)") from None
    except OSError as e:
        raise UserError(f"{dataset_uri}: cannot read {MANIFEST_NAME}: {e}") from None
    return Manifest.from_json(text, uri)


DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is never read into memory
OVERSIZE_KEY = "__oversize__"  # sample key naming members left unread for their size
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_compression(url: str) -> str:
    """``"gz"`` for a shard name that is decompressed (``.tar.gz``/``.tgz``), else ``""`` (a plain tar)."""
    return "gz" if str(url).endswith((".tar.gz", ".tgz")) else ""


def _tar_members(fileobj: IO[bytes], url: str, max_member_bytes: int) -> Iterator[tuple[str, bytes | None, int]]:
    """``(name, data, size)`` of each regular member; ``data`` is None (unread) above ``max_member_bytes``.

    The stream is opened without transparent decompression unless the name says so (``.tar.gz``/``.tgz``):
    a compressed stream under a ``.tar`` name is not a tar archive. An oversize member is skipped by reading
    past it in fixed-size blocks, never held in memory.
    """
    if tar_compression(url) == "gz":  # gzip's reader bounds each decompression step to the size asked for
        fileobj = gzip.GzipFile(fileobj=fileobj, mode="rb")
    stream = tarfile.open(fileobj=fileobj, mode="r|")
    try:
        for info in stream:
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            if max_member_bytes and info.size > max_member_bytes:
                yield info.name, None, info.size
            else:
                member = stream.extractfile(info)
                assert member is not None
                yield info.name, member.read(), info.size
            stream.members = []
    finally:
        stream.close()


def check_shards(dataset_uri: str, manifest: Manifest, fs: Any = None,
                 sha256: bool = False) -> list[tuple[ShardInfo, str]]:
    """Shards of ``manifest`` whose file is missing, of another size, or (with ``sha256``) other content.

    Returns ``(shard, problem)`` pairs, empty when the directory matches its manifest. Sizes come from one
    listing (s3) or a stat per shard (local); ``sha256`` reads every shard. Shards recorded without a size or
    checksum (older manifests) are checked for presence only.
    """
    sizes: dict[str, int] = {}
    if is_s3(dataset_uri):
        fs = fs or s3_filesystem()
        prefix = dataset_uri[len("s3://"):].rstrip("/")
        fs.invalidate_cache(prefix)
        try:
            entries = fs.find(prefix, detail=True)
        except FileNotFoundError:
            entries = {}
        sizes = {name[len(prefix) + 1:]: int(e.get("size") or 0) for name, e in entries.items()}
    problems: list[tuple[ShardInfo, str]] = []
    for shard in manifest.shards:
        uri = join_uri(dataset_uri, shard.path)
        if is_s3(dataset_uri):
            size = sizes.get(shard.path)
        else:
            try:
                size = os.stat(uri).st_size
            except FileNotFoundError:
                size = None
        if size is None:
            problems.append((shard, "missing"))
        elif shard.bytes is not None and size != shard.bytes:
            problems.append((shard, f"{size} bytes, the manifest says {shard.bytes}"))
        elif sha256 and shard.sha256:
            h = hashlib.sha256()
            with open_uri(uri, fs) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != shard.sha256:
                problems.append((shard, "sha256 differs from the manifest"))
    return problems


def iter_tar_samples(fileobj: IO[bytes], url: str,
                     max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar stream: dicts of ``__key__``, ``__url__`` and extension -> bytes.

    A member larger than ``max_member_bytes`` (0 = no limit) is not read: its sample gets
    ``__oversize__`` (a one-line description) instead of that extension. Raises :class:`ShardReadError`
    (after yielding every complete sample before it) when the stream is truncated or not a tar archive.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data, size in _tar_members(fileobj, url, max_member_bytes):
            m = _KEY_EXT.match(name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise ValueError(f"{name}: duplicate file name in tar file")
            if data is None:
                current[OVERSIZE_KEY] = f"{name}: {size} bytes, over the {max_member_bytes}-byte member limit"
            else:
                current[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardReadError(f"{url}: {e}") from e


def iter_shard(uri: str, fs: Any = None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Open a shard (local or ``s3://``) and yield its samples (see :func:`iter_tar_samples`)."""
    with open_uri(uri, fs) as f:
        yield from iter_tar_samples(f, uri, max_member_bytes)


def decode_json(raw: bytes | None) -> dict:
    """The sample's ``json`` as a dict (empty when absent); raises ``ValueError`` when malformed."""
    if raw is None:
        return {}
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("sample json is not an object")
    return obj


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A WebDataset tar in memory from ``{"__key__": ..., ext: bytes}`` dicts (for tests and tools)."""
    buf = io.BytesIO()
    writer = TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False)
    for s in samples:
        writer.write(s)
    writer.close()
    return buf.getvalue()
