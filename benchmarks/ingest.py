"""Ingest and loading throughput: ``python -m benchmarks.ingest [--n 3000] [--workers 0 2]``.

Measures, on this machine's CPU:

1. toy-web generation alone (draw + JPEG encode), images/s;
2. ingest of ``toyweb://`` to a local dataset directory (generate, decode-check, clean, shard), samples/s;
3. ingest of a directory of WebDataset JPEG shards in the img2dataset layout (384 x 288 photos-sized
   JPEGs: decode with DCT scaling, resize to 64 px, re-encode), samples/s;
4. the training loader (train transform with RandAugment, tokenisation) and the eval loader, pairs/s,
   for each ``--workers`` value;
5. ingest of the same JPEG shards, and of ``toyweb://``, with ``--ingest-workers`` local processes (``blip ingest --workers``: one
   part per process, then the merge), default 1 and 2, and the speed-up of the last over the first: measured
   (wall time) and from CPU times (the busiest worker plus the parent's fork and merge: what an otherwise idle
   machine with a core per worker would take). The worker counts alternate within each of ``--repeats``
   rounds and the speed-up is the median of the rounds' ratios. ``--only-workers`` measures this alone.

Each other measurement is the fastest of ``--repeats`` runs. Prints a table; the numbers in
``docs/benchmarks.md`` come from this script.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from blip_core.config import load_config
from blip_core.constants import CAPTION_MAX_WORDS, DEFAULT_PROMPT, PRETRAIN_TEXT_TOKENS
from blip_core.data.loader import make_loader
from blip_core.data.toyweb import generate, parse_toyweb_uri
from blip_core.data.toyweb_scenes import render_scene, sample_scene
from blip_core.data.webdataset_io import tar_bytes
from blip_core.tokenizer import BlipTokenizer
from components import ingest, ingest_parts


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _best(fn, repeats: int) -> tuple[float, float, object]:
    """Fastest of ``repeats`` runs of ``fn(i)``: (wall seconds, CPU seconds, result).

    CPU seconds make the rate robust to other load on a shared machine; best-of damps the rest.
    """
    best: tuple[float, float, object] | None = None
    for i in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn(i)
        secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if best is None or secs < best[0]:
            best = (secs, cpu, out)
    assert best is not None
    return best


def _jpeg_shards(root: Path, n: int, per_shard: int = 500) -> None:
    """img2dataset-style shards of 384 x 288 JPEGs (toy-web scenes drawn at 192 px, upscaled, cropped)."""
    import random

    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        rng = random.Random(f"bench/{i}")
        img = render_scene(sample_scene(rng), 192, texture_seed=i).resize((384, 384), Image.Resampling.BICUBIC)
        img = img.crop((0, 48, 384, 336))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        samples.append({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"web caption number {i}".encode()})
        if len(samples) == per_shard or i == n - 1:
            (root / f"{i // per_shard:05d}.tar").write_bytes(tar_bytes(samples))
            samples = []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="samples per ingest measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to measure")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is reported")
    p.add_argument("--ingest-workers", type=int, nargs="+", default=[1, 2],
                   help="ingest worker processes to compare (blip ingest --workers)")
    p.add_argument("--only-workers", action="store_true", help="measure only the ingest worker comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[tuple[str, int, float, float, str]] = []
    cfg = load_config(None, ["ingest.shard_size=1000"])
    with tempfile.TemporaryDirectory(prefix="blip-bench-") as d:
        tmp = Path(d)
        spec = parse_toyweb_uri(f"toyweb://?split=web&n={args.n}&seed=0")
        r = args.repeats
        if args.only_workers:
            _jpeg_shards(tmp / "raw", args.n)
            speedups = [_ingest_workers(rows, cfg, src, label, tmp, args.ingest_workers, r)
                        for src, label in ((str(tmp / "raw"), "JPEG shards"), (spec.uri(), "toyweb://"))]
            _print(rows, args)
            print("\n".join(speedups))
            return 0
        secs, cpu, count = _best(lambda i: sum(1 for _ in generate(spec)), r)
        rows.append(("toy-web generation (draw + JPEG)", count, secs, cpu, "images"))

        secs, cpu, res = _best(lambda i: ingest.run(cfg, spec.uri(), str(tmp / f"toyweb{i}"), progress=False), r)
        rows.append(("ingest toyweb:// -> local shards", res.manifest.samples_in, secs, cpu, "samples"))

        _jpeg_shards(tmp / "raw", args.n)
        secs, cpu, res = _best(lambda i: ingest.run(cfg, str(tmp / "raw"), str(tmp / f"jpeg{i}"), progress=False), r)
        rows.append(("ingest JPEG shards 384x288 -> 64 px", res.manifest.samples_in, secs, cpu, "samples"))

        texts = [c for s in generate("toyweb://?split=human&n=200") for c in s.json["captions"]]
        tok = BlipTokenizer.from_corpus(texts, vocab_size=300)
        for train in (True, False):
            for workers in args.workers:
                loader = make_loader([str(tmp / "toyweb0")], tok, image_size=64, batch_size=args.batch_size,
                                     train=train, min_scale=0.5, randaugment=True, max_words=CAPTION_MAX_WORDS,
                                     max_length=PRETRAIN_TEXT_TOKENS, num_workers=workers, prompt=DEFAULT_PROMPT)
                secs, cpu, pairs = _best(lambda i, loader=loader: sum(len(b["text"]) for b in loader), r)
                kind = "train: crop+flip+RandAugment" if train else "eval: resize"
                rows.append((f"loader {kind}, {workers} workers", pairs, secs, cpu, "pairs"))
        speedups = [_ingest_workers(rows, cfg, src, label, tmp, args.ingest_workers, r)
                    for src, label in ((str(tmp / "raw"), "JPEG shards"), (spec.uri(), "toyweb://"))]
    _print(rows, args)
    print("\n".join(speedups))
    return 0


def _ingest_workers(rows: list, cfg, src: str, label: str, tmp: Path, counts: list[int], repeats: int) -> str:
    """Rows for ingest of ``src`` with each number of worker processes; returns the speed-up line (last vs
    first).

    The worker counts alternate within each round (1, 2, 1, 2, ...), so a drift in the machine's speed hits
    both alike; the speed-up is the median over rounds of the ratio within a round, and the rows show each
    count's fastest run.
    """
    walls: dict[int, list[float]] = {w: [] for w in counts}
    paths: dict[int, list[float]] = {w: [] for w in counts}
    best: dict[int, tuple[float, float, object]] = {}
    for i in range(repeats):
        for w in counts:
            t0, c0, before = time.perf_counter(), _cpu_seconds(), os.times()
            res = ingest_parts.run_workers(ingest.run, cfg, src, str(tmp / f"workers{w}-{i}-{len(rows)}"), w,
                                           progress=False)
            secs, cpu, after = time.perf_counter() - t0, _cpu_seconds() - c0, os.times()
            own = after.user + after.system - before.user - before.system  # this process: all of it, or fork+merge
            walls[w].append(secs)
            paths[w].append(own + max(res.part_cpu_seconds, default=0.0))
            if w not in best or secs < best[w][0]:
                best[w] = (secs, cpu, res)
    for w in counts:
        secs, cpu, res = best[w]
        rows.append((f"ingest {label}, --workers {w}", res.manifest.samples_in, secs, cpu, "samples"))
    w0, w1 = counts[0], counts[-1]
    wall = statistics.median(a / b for a, b in zip(walls[w0], walls[w1]))
    by_cpu = statistics.median(a / b for a, b in zip(paths[w0], paths[w1]))
    spread = sorted(a / b for a, b in zip(walls[w0], walls[w1]))
    return (f"ingest {label} --workers {w1} vs {w0}: {wall:.2f}x measured (wall; median of {repeats} alternating "
            f"rounds, range {spread[0]:.2f}-{spread[-1]:.2f}), {by_cpu:.2f}x from CPU times (busiest worker + "
            f"fork/merge: median {statistics.median(paths[w1]):.2f} s vs {statistics.median(paths[w0]):.2f} s)")


def _print(rows: list, args: argparse.Namespace) -> None:
    print(f"# ingest and loading throughput ({os.cpu_count()} CPUs {platform.machine()}, torch threads 1, "
          f"python {platform.python_version()}, best of {args.repeats}, load average {os.getloadavg()[0]:.1f})")
    print(f"{'measurement':<48} {'items':>6} {'wall s':>7} {'per wall s':>11} {'per CPU s':>10}")
    for name, count, secs, cpu, unit in rows:
        print(f"{name:<48} {count:>6} {secs:>7.2f} {count / secs:>11.0f} {count / cpu:>10.0f} {unit}")


if __name__ == "__main__":
    raise SystemExit(main())
