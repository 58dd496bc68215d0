"""Pre-training step benchmark: pairs/s, seconds per step and peak memory, for the `toy` and `base` presets.

    python -m benchmarks.train [--presets toy base] [--steps 3] [--threads 2]
                               [--grad-ckpt-layers K] [--text-grad-ckpt-layers K]
                               [--batch 8] [--image-size 224] [--queue-size 57600] [--official-dir DIR]
                               [--profile]

Each preset runs in its own subprocess (so peak RSS is that preset's alone) one full pre-training step at a
time: ITC + ITM + LM forward, backward, AdamW step, momentum update and enqueue, fp32 on CPU. It prints
absolute numbers for this machine.

- `base`: ViT-B/16 at 224 px, BERT-base text, queue 57600, batch 8, random inputs (`--batch`, `--image-size`,
  `--queue-size` change them).
- `--official-dir DIR`: DIR is a local checkout of salesforce/BLIP (its `models/` and `configs/`). The official
  pre-training step then runs first, in its own process, at the same batch, image size, queue and threads
  (`benchmarks.official_blip`, which loads it with the shims today's libraries need), then blip_core's `base`;
  only then is a ratio printed, since both sides ran one after the other on the same machine.
- `--grad-ckpt-layers K` / `--text-grad-ckpt-layers K`: gradient checkpointing of the last K ViT blocks / MED
  layers (``model.vision.grad_ckpt_layers``, ``model.text.grad_ckpt_layers``): recomputation time for memory.
- `toy`: the demo's model (params.yaml) at its batch size, fed by the real loader from a toy-web dataset,
  which also gives the share of time spent waiting for data.
- `tiny`: the unit tests' model on random 32 px inputs (seconds; a smoke run of the benchmark itself).
- `--profile`: after the timed steps, two more under ``torch.profiler``; prints each preset's operators by
  self CPU time (share of the profiled steps, milliseconds per step, calls per step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BASE_BATCH, BASE_IMAGE_SIZE, BASE_QUEUE = 8, 224, 57600


PROFILED_STEPS = 2
PROFILE_ROWS = 15
_AUTOGRAD_NODE = "autograd::engine::evaluate_function: "


def op_name(key: str) -> str:
    """A profiler event's name as one word for the table: an autograd node's event (``autograd::engine::
    evaluate_function: ViewBackward0``) becomes ``autograd::ViewBackward0``; other whitespace becomes ``_``."""
    if key.startswith(_AUTOGRAD_NODE):
        key = "autograd::" + key[len(_AUTOGRAD_NODE):]
    return "_".join(key.split())


def _profile(step, batches, rows: int = PROFILE_ROWS) -> list[dict]:
    """The operators of ``PROFILED_STEPS`` calls of ``step`` by self CPU time: name, share, ms and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            step(next(batches))
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": op_name(e.key), "share": e.self_cpu_time_total / total,
             "ms_per_step": e.self_cpu_time_total / 1000 / PROFILED_STEPS, "calls_per_step": e.count / PROFILED_STEPS}
            for e in events[:rows]]


def _worker(preset: str, steps: int, threads: int, grad_ckpt_layers: int = 0, text_grad_ckpt: int = 0,
            batch: int = BASE_BATCH, image_size: int = BASE_IMAGE_SIZE, queue_size: int = BASE_QUEUE,
            profile: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    from benchmarks.common import bert_special_ids, pretrain_step, random_pretrain_batches
    from blip_core import build_model
    from blip_core.config import load_config
    from blip_core.objectives import PretrainObjective, SpecialIds
    from blip_core.train.optim import build_optimizer

    if preset in ("base", "tiny"):
        sizes = ([f"model.vision.image_size={image_size}", f"model.queue_size={queue_size}"] if preset == "base"
                 else [])
        cfg = load_config(None, [f"model.preset={preset}", f"model.text.grad_ckpt_layers={text_grad_ckpt}", *sizes])
        vocab = cfg.model.text.vocab_size or 30524  # tiny: a BERT-sized vocabulary for the random captions
        model = build_model(cfg.model, vocab_size=vocab)
        ids = bert_special_ids(vocab)
        batch_size = batch if preset == "base" else 4

        def batches():
            yield from random_pretrain_batches(batch_size, cfg.model.vision.image_size, vocab)
    else:
        from blip_core.data.loader import make_loader
        from blip_core.tokenizer import BlipTokenizer
        from components import ingest
        from components.training import corpus_captions

        cfg = load_config("params.yaml", [f"model.text.grad_ckpt_layers={text_grad_ckpt}"])
        data = tempfile.mkdtemp(prefix="bench-train-")
        ingest.run(cfg, "toyweb://?split=web&n=800&seed=5", f"{data}/web", progress=False)
        tok = BlipTokenizer.from_corpus(corpus_captions([f"{data}/web"], 30), cfg.model.corpus_vocab_size)
        model = build_model(cfg.model, vocab_size=len(tok))
        ids = SpecialIds.from_tokenizer(tok)
        batch_size = cfg.pretrain.batch_size
        loader = make_loader([f"{data}/web"], tok, image_size=cfg.model.vision.image_size, batch_size=batch_size,
                             train=True, min_scale=cfg.data.min_scale_pretrain, expand_captions=True)

        def batches():
            while True:
                yield from loader

    model.set_grad_checkpointing(grad_ckpt_layers)
    objective = PretrainObjective(model, ids)
    optimizer = build_optimizer(objective, cfg.pretrain)
    it = batches()
    step_times, data_times = [], []
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        pretrain_step(objective, optimizer, batch)
        t2 = time.perf_counter()
        if i:
            step_times.append(t2 - t0)
            data_times.append(t1 - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = sum(step_times) / len(step_times)
    ops = _profile(lambda b: pretrain_step(objective, optimizer, b), it) if profile else []
    return {"profile": ops, "preset": preset, "batch": batch_size, "image_size": cfg.model.vision.image_size,
            "s_per_step": step, "pairs_per_s": batch_size / step,
            "data_share": sum(data_times) / sum(step_times), "peak_rss_gb": peak_kb / 1024**2,
            "threads": threads, "steps": steps, "grad_ckpt_layers": grad_ckpt_layers,
            "text_grad_ckpt_layers": text_grad_ckpt}


def _run(cmd: list[str], env: dict, what: str) -> dict | None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"{what}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(name: str, r: dict) -> str:
    share = f"{100 * r['data_share']:>6.1f}%" if "data_share" in r else f"{'-':>7}"
    return (f"{name:<9} {r['batch']:>5} {r['image_size']:>5} {r['s_per_step']:>8.2f} {r['pairs_per_s']:>8.2f} "
            f"{share} {r['peak_rss_gb']:>7.2f} GB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["toy", "base"], choices=["tiny", "toy", "base"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-ckpt-layers", type=int, default=0, help="checkpoint the last K ViT blocks")
    p.add_argument("--text-grad-ckpt-layers", type=int, default=0, help="checkpoint the last K MED layers")
    p.add_argument("--batch", type=int, default=BASE_BATCH, help="base: pairs per step (both sides)")
    p.add_argument("--image-size", type=int, default=BASE_IMAGE_SIZE, help="base: image size (both sides)")
    p.add_argument("--queue-size", type=int, default=BASE_QUEUE, help="base: ITC queue (both sides)")
    p.add_argument("--official-dir", default=None, metavar="DIR",
                   help="a salesforce/BLIP checkout: time its pre-training step too, then print the ratio")
    p.add_argument("--profile", action="store_true", help="also print each preset's operators by CPU time")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.threads, args.grad_ckpt_layers,
                                 args.text_grad_ckpt_layers, args.batch, args.image_size, args.queue_size,
                                 args.profile)))
        return 0
    if args.official_dir and "base" not in args.presets:
        p.error("--official-dir compares against the base preset: include base in --presets")
    env = {**os.environ, "BLIP_TRACKING": "0", "OMP_NUM_THREADS": str(args.threads)}
    official = None
    if args.official_dir:  # first, in its own process; blip_core's base runs after it in the same invocation
        official = _run([sys.executable, "-m", "benchmarks.official_blip", "--official-dir", args.official_dir,
                         "--image-size", str(args.image_size), "--batch", str(args.batch), "--queue-size",
                         str(args.queue_size), "--steps", str(args.steps), "--threads", str(args.threads)],
                        env, "official BLIP")
        if official is None:
            return 1
    print(f"{'preset':<9} {'batch':>5} {'size':>5} {'s/step':>8} {'pairs/s':>8} {'data %':>7} {'peak RSS':>9}")
    if official is not None:
        print(_row("official", official))
    for preset in args.presets:
        r = _run([sys.executable, "-m", "benchmarks.train", "--worker", preset, "--steps", str(args.steps),
                  "--threads", str(args.threads), "--grad-ckpt-layers", str(args.grad_ckpt_layers),
                  "--text-grad-ckpt-layers", str(args.text_grad_ckpt_layers), "--batch", str(args.batch),
                  "--image-size", str(args.image_size), "--queue-size", str(args.queue_size),
                  *(["--profile"] if args.profile else [])], env, preset)
        if r is None:
            return 1
        print(_row(preset, r))
        for op in r["profile"]:
            print(f"  {op['op'][:48]:<48} {100 * op['share']:>5.1f}% {op['ms_per_step']:>8.1f} ms/step "
                  f"{op['calls_per_step']:>7.0f} calls/step")
        if preset == "base" and official is not None:
            print(f"  base vs official, measured side by side in this run: {official['s_per_step'] / r['s_per_step']:.2f}x "
                  f"the official step's speed, {r['peak_rss_gb'] / official['peak_rss_gb']:.2f}x its peak RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
