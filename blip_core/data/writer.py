"""Writing dataset directories: :class:`Sink` (where files are published) and :class:`DatasetWriter`.

Shards are deterministic (plain tar, members sorted per sample, mtime 0, no owner): the same samples give
byte-identical shards. The contract is described in :mod:`blip_core.data.webdataset_io`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import IO, Any, Protocol

from blip_core.data import manifest as M
from blip_core.data.tarstream import TarStreamWriter
from blip_core.errors import UserError
from blip_core.io import atomic_path, atomic_write, fsync_path


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

    def put_file(self, local: Path, name: str) -> None:
        final = self.dir / name
        try:
            os.replace(local, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            with atomic_path(final) as tmp:  # another filesystem: copy under a temporary name, then rename
                shutil.copyfile(local, tmp)
        fsync_path(self.dir)

    def put_bytes(self, name: str, data: bytes) -> None:
        with atomic_write(self.dir / name, "wb") as f:
            f.write(data)

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def list_names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_file())


class DatasetWriter:
    """Write accepted samples into shards and rejected ones into ``rejected.jsonl``, manifest last.

    Opening a writer first deletes any ``manifest.json`` in the sink (unless ``fresh=False``: the caller
    manages completion), so an interrupted run never leaves a directory that looks complete. Shards are staged
    locally (in ``staging_dir``, else the sink's ``staging_dir()`` when it has one, else a temporary
    directory), then published through the sink one by one; :meth:`finish` removes shards left from an earlier,
    larger run, then publishes ``rejected.jsonl`` and finally ``manifest.json``.

    Shards are named ``<shard_prefix><index>.tar`` from ``first_shard`` on and hold ``shard_size`` samples
    each (None: no limit). A stage that writes one output shard per unit of work (CapFilt: one per input
    shard) calls :meth:`end_shard` to close and publish the current shard, an empty one included, and writes
    its own manifest.
    """

    def __init__(self, sink: Sink, shard_size: int | None, staging_dir: str | Path | None = None, *,
                 shard_prefix: str = M.SHARD_PREFIX, first_shard: int = 0, fresh: bool = True) -> None:
        if shard_size is not None and shard_size < 1:
            raise UserError(f"shard size must be >= 1, got {shard_size}")
        self.sink = sink
        self.shard_size = shard_size
        self.shard_prefix = shard_prefix
        self.first_shard = first_shard
        self._own_staging = staging_dir is None
        if staging_dir is None:
            make = getattr(sink, "staging_dir", None)
            staging_dir = make() if make is not None else tempfile.mkdtemp(prefix="blip-shards-")
        self.staging = Path(staging_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.sink.delete(M.MANIFEST_NAME)
            self.sink.delete(M.ANSWER_LIST_NAME)
        self.shards: list[M.ShardInfo] = []
        self.questions_out = 0
        self.write_answer_counts = False  # also answer_counts.json (an ingest part: the merge sums them)
        self.answers: Counter[str] = Counter()  # every annotator answer of the VQA samples
        self.questions_dropped: Counter[str] = Counter()  # reason -> questions dropped from kept samples
        self.rejected: Counter[str] = Counter()
        self.samples_out = 0
        self.captions_out = 0
        self._rejected_file = open(self.staging / M.REJECTED_NAME, "w", encoding="utf-8")  # noqa: SIM115
        self._tar: TarStreamWriter | None = None
        self._tar_file: IO[bytes] | None = None
        self._in_shard = 0
        self._captions_in_shard = 0

    def _shard_name(self) -> str:
        return M.shard_name(self.first_shard + len(self.shards), self.shard_prefix)

    def _open_shard(self) -> None:
        path = self.staging / self._shard_name()
        self._tar_file = open(path, "wb")  # noqa: SIM115
        self._tar = TarStreamWriter(self._tar_file)
        self._in_shard = 0
        self._captions_in_shard = 0
        self._questions_in_shard: int | None = None

    def _close_shard(self) -> M.ShardInfo:
        assert self._tar is not None and self._tar_file is not None
        self._tar.close()
        _sync_close(self._tar_file)
        name = self._shard_name()
        path = self.staging / name
        info = M.ShardInfo(name, self._in_shard, self._captions_in_shard, path.stat().st_size, M.sha256_file(path),
                         self._questions_in_shard)
        self.sink.put_file(path, name)
        path.unlink(missing_ok=True)
        self.shards.append(info)
        self._tar = self._tar_file = None
        return info

    def end_shard(self) -> M.ShardInfo:
        """Close and publish the current shard (an empty one when no sample was added since the last)."""
        if self._tar is None:
            self._open_shard()
        return self._close_shard()

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
        if self.shard_size is not None and self._in_shard >= self.shard_size:
            self._close_shard()

    def reject(self, key: str, reason: str, detail: str = "", origin: str = "") -> None:
        """Count and list one rejected input sample."""
        self.rejected[reason] += 1
        rec = {"key": key, "reason": reason, "detail": detail[:300], "origin": origin}
        self._rejected_file.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def finish(self, samples_in: int, source: str, config: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> M.Manifest:
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
        manifest = M.Manifest(source=source, samples_in=samples_in, samples_out=self.samples_out,
                            captions_out=self.captions_out, rejected=dict(self.rejected), shards=self.shards,
                            config=config or {}, extra=extra)
        manifest.check_counts()
        keep = {s.path for s in self.shards}
        for name in self.sink.list_names():
            if name.startswith(self.shard_prefix) and name.endswith(".tar") and name not in keep:
                self.sink.delete(name)
        _sync_close(self._rejected_file)
        self.sink.put_file(self.staging / M.REJECTED_NAME, M.REJECTED_NAME)
        if self.questions_out and self.write_answer_counts:
            self.sink.put_bytes(M.ANSWER_COUNTS_NAME, json.dumps(dict(sorted(self.answers.items())),
                                                               ensure_ascii=False).encode("utf-8"))
        if self.questions_out:
            self.sink.put_bytes(M.ANSWER_LIST_NAME, (json.dumps(M.answer_list(self.answers), ensure_ascii=False,
                                                               indent=0) + "\n").encode("utf-8"))
        self.sink.put_bytes(M.MANIFEST_NAME, manifest.to_json().encode("utf-8"))
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
