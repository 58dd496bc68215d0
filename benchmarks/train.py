"""Pre-training step benchmark: pairs/s, seconds per step and peak memory, for the `toy` and `base` presets.

    python -m benchmarks.train [--presets toy base] [--steps 3] [--threads 2]
                               [--grad-ckpt-layers K] [--text-grad-ckpt-layers K]

Each preset runs in its own subprocess (so peak RSS is that preset's alone) one full pre-training step at a
time: ITC + ITM + LM forward, backward, AdamW step, momentum update and enqueue, fp32 on CPU.

- `base`: ViT-B/16 at 224 px, BERT-base text, queue 57600, batch 8, random inputs (the setting of the
  reference point: the official salesforce/BLIP step takes 17.5-18.0 s with 10.4 GB peak RSS on 2 cores).
- `--grad-ckpt-layers K` / `--text-grad-ckpt-layers K`: gradient checkpointing of the last K ViT blocks / MED
  layers (``model.vision.grad_ckpt_layers``, ``model.text.grad_ckpt_layers``): recomputation time for memory.
- `toy`: the demo's model (params.yaml) at its batch size, fed by the real loader from a toy-web dataset,
  which also gives the share of time spent waiting for data.
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

TARGET_BASE_S, TARGET_BASE_GB = 14.6, 8.3
REFERENCE_BASE_S, REFERENCE_BASE_GB = 17.75, 10.4


def _worker(preset: str, steps: int, threads: int, grad_ckpt_layers: int = 0, text_grad_ckpt: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    from blip_core import build_model
    from blip_core.config import load_config
    from blip_core.objectives import PretrainObjective, SpecialIds
    from blip_core.seeding import make_generator
    from blip_core.train.optim import build_optimizer

    if preset == "base":
        cfg = load_config(None, ["model.preset=base", f"model.text.grad_ckpt_layers={text_grad_ckpt}"])
        model = build_model(cfg.model)
        ids = SpecialIds(cls=101, enc=30523, dec=30522, pad=0)
        batch_size = 8
        g = make_generator("cpu", 0)

        def batches():
            while True:
                input_ids = torch.randint(1000, 30000, (batch_size, 30), generator=g)
                input_ids[:, 0] = 101
                input_ids[:, -1] = 102
                yield {"image": torch.randn(batch_size, 3, 224, 224, generator=g), "input_ids": input_ids,
                       "attention_mask": torch.ones_like(input_ids)}
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
        out = objective(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.clamp_temp()
        objective.momentum_update()
        objective.enqueue(out)
        t2 = time.perf_counter()
        if i:
            step_times.append(t2 - t0)
            data_times.append(t1 - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = sum(step_times) / len(step_times)
    return {"preset": preset, "batch": batch_size, "s_per_step": step, "pairs_per_s": batch_size / step,
            "data_share": sum(data_times) / sum(step_times), "peak_rss_gb": peak_kb / 1024**2,
            "threads": threads, "steps": steps, "grad_ckpt_layers": grad_ckpt_layers,
            "text_grad_ckpt_layers": text_grad_ckpt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["toy", "base"], choices=["toy", "base"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-ckpt-layers", type=int, default=0, help="checkpoint the last K ViT blocks")
    p.add_argument("--text-grad-ckpt-layers", type=int, default=0, help="checkpoint the last K MED layers")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.threads, args.grad_ckpt_layers,
                                 args.text_grad_ckpt_layers)))
        return 0
    print(f"{'preset':<6} {'batch':>5} {'s/step':>8} {'pairs/s':>8} {'data %':>7} {'peak RSS':>9}")
    env = {**os.environ, "BLIP_TRACKING": "0", "OMP_NUM_THREADS": str(args.threads)}
    for preset in args.presets:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train", "--worker", preset, "--steps",
                               str(args.steps), "--threads", str(args.threads), "--grad-ckpt-layers",
                               str(args.grad_ckpt_layers), "--text-grad-ckpt-layers",
                               str(args.text_grad_ckpt_layers)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{preset}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{preset:<6} {r['batch']:>5} {r['s_per_step']:>8.2f} {r['pairs_per_s']:>8.2f} "
              f"{100 * r['data_share']:>6.1f}% {r['peak_rss_gb']:>7.2f} GB")
        if preset == "base":
            print(f"  base vs the official step ({REFERENCE_BASE_S} s, {REFERENCE_BASE_GB} GB): "
                  f"{REFERENCE_BASE_S / r['s_per_step']:.2f}x faster, {r['peak_rss_gb'] / REFERENCE_BASE_GB:.2f}x "
                  f"the memory; targets <= {TARGET_BASE_S} s and <= {TARGET_BASE_GB} GB: "
                  f"{'met' if r['s_per_step'] <= TARGET_BASE_S and r['peak_rss_gb'] <= TARGET_BASE_GB else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
