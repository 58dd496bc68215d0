"""Ingest in parts: several processes or pods each write one part, a merge joins them into one dataset.

``blip ingest --part I --parts N --output PART_URI`` writes part ``I`` of ``N``: every part reads the whole
source in its order, but checks, de-duplicates and writes only the samples :func:`components.ingest.part_of`
assigns to it (a hash of the cleaned primary caption, so exact duplicates meet in the same part; the images
of other parts' samples are not fetched, drawn or decoded where the source reads them lazily: JSONL/CSV
manifests, annotation files, toy-web). Each part is a complete dataset directory whose manifest records
``part: {index, parts}``.

``blip ingest merge PART_URI ... --output URI`` checks that the parts are ``0..N-1`` of the same source and
settings, each intact, then writes one dataset directory: the parts' shards copied in part order and renumbered
(hard links on a local filesystem, server-side copies within S3), ``rejected.jsonl`` concatenated, counts
summed, ``manifest.json`` last.

``blip ingest --workers N`` runs the ``N`` parts as local processes, then the merge.

Whatever ``N``, the merged dataset holds the same samples (same keys, images, captions and json) and the same
rejection counts as a single run: only the order of samples across shards (part by part, each in source
order), the shard boundaries and the order of ``rejected.jsonl`` differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from blip_core.config import Config
from blip_core.data import manifest as M
from blip_core.data.reader import check_shards
from blip_core.errors import UserError
from blip_core.io import fsync_path
from blip_core.redact import install_log_redaction, redact
from components import storage
from components.cli import one_line_errors

log = logging.getLogger(__name__)

MAX_PARTS = 4096
PART_KEY = "part"  # manifest key of a part written with run(part=...): {"index": i, "parts": n}


@dataclass
class IngestResult:
    """What :func:`run` produced."""

    output: str
    manifest: M.Manifest
    seconds: float
    part_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of each worker's part (--workers)

    @property
    def samples_per_s(self) -> float:
        return self.manifest.samples_in / max(self.seconds, 1e-9)


def _part_info(uri: str, m: M.Manifest) -> tuple[int, int]:
    info = m.extra.get(PART_KEY)
    if not isinstance(info, dict) or not isinstance(info.get("index"), int) or not isinstance(info.get("parts"), int):
        raise UserError(f"{redact(uri)}: not an ingest part (written without --part/--parts)")
    return info["index"], info["parts"]


def _read_parts(part_uris: Sequence[str]) -> list[tuple[str, M.Manifest]]:
    """The parts ordered by index; refuses anything but one intact copy of each part ``0..N-1`` of one run."""
    if not part_uris:
        raise UserError("merge needs the part directories to join")
    found: dict[int, tuple[str, M.Manifest]] = {}
    counts: set[int] = set()
    for uri in part_uris:
        m = M.read_manifest(uri)
        index, parts = _part_info(uri, m)
        counts.add(parts)
        if index in found:
            raise UserError(f"part {index} given twice: {redact(found[index][0])} and {redact(uri)}")
        found[index] = (uri, m)
    if len(counts) > 1:
        raise UserError(f"the parts were written with different --parts: {sorted(counts)}")
    (n,) = counts
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise UserError(f"parts {', '.join(map(str, missing))} of {n} are missing")
    ordered = [found[i] for i in range(n)]
    first_uri, first = ordered[0]
    for uri, m in ordered[1:]:
        if (m.source, m.config, m.format) != (first.source, first.config, first.format):
            raise UserError(f"{redact(uri)} and {redact(first_uri)} are parts of different sources or settings")
    for uri, m in ordered:
        problems = check_shards(uri, m)
        if problems:
            shard, problem = problems[0]
            raise UserError(f"{redact(uri)}: shard {shard.path} {problem}: re-run that part")
    return ordered


def _put_shard(src: str, output: str, name: str, sink) -> None:
    """Publish the part shard ``src`` as ``name`` in the output directory without rewriting it when possible."""
    if not storage.is_s3(src) and not storage.is_s3(output):
        tmp = Path(output) / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # same filesystem: no data copied (a part's shards are only ever replaced, never edited)
        except OSError:
            shutil.copyfile(src, tmp)
        fsync_path(tmp)
        sink.put_file(tmp, name)
    elif storage.is_s3(src) and storage.is_s3(output):
        storage.copy_object(src, storage.join(output, name))
    else:
        with tempfile.TemporaryDirectory(prefix="blip-merge-") as d:
            sink.put_file(storage.download_file(src, Path(d) / name), name)


def merge(part_uris: Sequence[str], output: str) -> IngestResult:
    """Join the ingest parts at ``part_uris`` into one dataset directory at ``output`` (local or ``s3://``)."""
    t0 = time.perf_counter()
    def same(a: str, b: str) -> bool:
        if storage.is_s3(a) or storage.is_s3(b):
            return a.rstrip("/") == b.rstrip("/")
        return Path(a).resolve() == Path(b).resolve()

    if any(same(u, output) for u in part_uris):
        raise UserError(f"--output {redact(output)} is one of the parts: merge into a new directory")
    parts = _read_parts(part_uris)
    sink = storage.dataset_sink(output)
    sink.delete(M.MANIFEST_NAME)  # from here until the end the output is incomplete
    sink.delete(M.ANSWER_LIST_NAME)
    shards: list[M.ShardInfo] = []
    rejected: Counter[str] = Counter()
    for uri, m in parts:
        for s in m.shards:
            name = M.shard_name(len(shards))
            _put_shard(storage.join(uri, s.path), output, name, sink)
            shards.append(M.ShardInfo(name, s.samples, s.captions, s.bytes, s.sha256, s.questions))
        rejected.update(m.rejected)
    keep = {s.path for s in shards}
    for name in sink.list_names():
        if name.startswith(M.SHARD_PREFIX) and name.endswith(".tar") and name not in keep:
            sink.delete(name)
    with tempfile.TemporaryDirectory(prefix="blip-merge-") as d:
        joined = Path(d) / M.REJECTED_NAME
        with open(joined, "wb") as out:
            for uri, _ in parts:
                with storage.local_copy(storage.join(uri, M.REJECTED_NAME)) as path, open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        sink.put_file(joined, M.REJECTED_NAME)
    first = parts[0][1]
    extra = {k: v for k, v in first.extra.items() if k not in (PART_KEY, "questions_out", "questions_dropped")}
    questions = sum(int(m.extra.get("questions_out") or 0) for _, m in parts)
    if questions:  # VQA parts: questions and dropped questions summed, M.answer_list.json from the summed counts
        dropped: Counter[str] = Counter()
        answers: Counter[str] = Counter()
        for uri, m in parts:
            dropped.update(m.extra.get("questions_dropped") or {})
            if m.extra.get("questions_out"):
                answers.update(json.loads(storage.read_text(storage.join(uri, M.ANSWER_COUNTS_NAME))))
        extra["questions_out"] = questions
        if dropped:
            extra["questions_dropped"] = dict(sorted(dropped.items()))
        sink.put_bytes(M.ANSWER_LIST_NAME, (json.dumps(M.answer_list(answers), ensure_ascii=False, indent=0)
                                          + "\n").encode("utf-8"))
    manifest = M.Manifest(source=first.source, samples_in=sum(m.samples_in for _, m in parts),
                        samples_out=sum(m.samples_out for _, m in parts),
                        captions_out=sum(m.captions_out for _, m in parts), rejected=dict(rejected), shards=shards,
                        config=first.config, format=first.format, extra=extra)
    manifest.check_counts()
    sink.put_bytes(M.MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    log.info("ingest merge: %d parts -> %s: %d samples in %d shards", len(parts), redact(output),
             manifest.samples_out, len(shards))
    return IngestResult(output, manifest, time.perf_counter() - t0)


def _run_part(run: Callable[..., IngestResult], cfg: Config, source: str, output: str,
              part: tuple[int, int]) -> float:
    """One part in a worker process (``run``: :func:`components.ingest.run`); returns the CPU seconds it took."""
    c0 = time.process_time()
    run(cfg, source, output, progress=False, part=part)
    return time.process_time() - c0


def run_workers(run: Callable[..., IngestResult], cfg: Config, source: str, output: str, workers: int, *,
                progress: bool = True) -> IngestResult:
    """Ingest ``source`` with ``workers`` local processes (one part each, each a call of ``run``, the ingest
    stage's :func:`components.ingest.run`), merged into ``output``."""
    if not 1 <= workers <= MAX_PARTS:
        raise UserError(f"--workers must be in 1..{MAX_PARTS}, got {workers}")
    if workers == 1:
        return run(cfg, source, output, progress=progress)
    t0 = time.perf_counter()
    if storage.is_s3(output):
        storage.check_bucket(output)
        scratch = Path(tempfile.mkdtemp(prefix="blip-ingest-parts-"))
    else:  # next to the output, so the merge hard-links the shards instead of copying them
        base = Path(output)
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(".parts-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        scratch = base / f".parts-{os.getpid()}"
        scratch.mkdir()
    try:
        dirs = [str(scratch / f"part-{i:04d}") for i in range(workers)]
        # fork: the workers start at once with this process's imports (spawn would re-import torch in each)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(_run_part, run, cfg, source, d, (i, workers)) for i, d in enumerate(dirs)]
            if progress:
                print(f"ingest: {workers} worker processes", file=sys.stderr)
            try:
                cpu = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        res = merge(dirs, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return IngestResult(output, res.manifest, time.perf_counter() - t0, cpu)


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip ingest merge", description="Join the parts written by 'blip ingest "
                                "--part I --parts N' into one dataset directory (one manifest).")
    p.add_argument("parts", nargs="+", metavar="PART_URI", help="the N part directories (local or s3://), any order")
    p.add_argument("--output", required=True, help="the merged dataset directory: a local path or s3://bucket/prefix")
    one_line_errors(p)
    install_log_redaction()
    return p


def main_merge(argv: Iterable[str]) -> int:
    """``blip ingest merge PART_URI ... --output URI``."""
    args = _merge_parser().parse_args(list(argv))
    res = merge(args.parts, args.output)
    m = res.manifest
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(m.rejected.items())) or "none"
    print(f"ingest merge: {len(args.parts)} parts -> {m.samples_in} in, {m.samples_out} out ({m.captions_out} "
          f"captions) in {len(m.shards)} shard(s) at {res.output}; rejected: {rejected}")
    return 0
