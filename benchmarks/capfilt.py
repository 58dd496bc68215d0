"""CapFilt throughput: blip_core's CapFilt batch functions against the same work done with ``transformers``.

Run: ``python -m benchmarks.capfilt`` (options: ``--size tiny|base``, ``--n``, ``--batch``, ``--repeats``,
``--threads``, ``--device``).

For each web image the work is what ``blip capfilt`` does: ``k = 3`` synthetic captions by nucleus sampling
(top-p 0.9, top-k 50, repetition penalty 1.1, the stage's default lengths and prompt), then the ITM match
probability of the image's web caption and of its synthetic ones ([ENC] first). Both sides run the
captioner's and the filter's image encoder once per image each (in a real run they are two models).

* blip_core: :func:`blip_core.capfilt.caption_batch` and :func:`blip_core.capfilt.filter_batch`.
* transformers: ``BlipForConditionalGeneration.generate(do_sample=True, num_return_sequences=3, ...)``, then
  ``BlipForImageTextRetrieval``'s modules with [ENC] at position 0: the vision tower once per image and
  ``text_encoder`` + ``itm_head`` with each text reading its image's tokens (the fastest use of its public
  modules; its ``forward`` would run the vision tower once per text).

Same process, same random weights (blip_core's model exported with :func:`blip_core.convert.save_hf`), runs
alternating between the sides, fastest of ``--repeats`` kept per side. Sampling draws differ between the
sides, so their captions differ; to check that the filters agree, the transformers path scores blip_core's
captions (the web caption + its synthetic ones) and the ITM probabilities must match within 1e-4.

The projection to 14M images divides 14,000,000 by the measured images/s of one process on the measured
device (no data loading or decoding counted: both are far faster than the models, see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.caption import PROMPT, prepare
from benchmarks.common import sync

SIZES = {"tiny": ("tiny", 32), "base": ("base", 384)}
WEB_WORDS = ["a", "dog", "cat", "on", "the", "grass", "with", "and", "picture", "of"]
ITM_TOLERANCE = 1e-4
PROJECT_IMAGES = 14_000_000


def capfilt_config():
    """The stage's CapFilt settings with the paper's k = 3 nucleus captions."""
    from blip_core.config import CapFiltConfig

    return CapFiltConfig(num_captions=3, decoding="nucleus", top_p=0.9, repetition_penalty=1.1, prompt=PROMPT)


def _inputs(n: int, image_size: int, device) -> tuple[torch.Tensor, list[str]]:
    from blip_core.seeding import make_generator

    g = make_generator("cpu", 3)
    images = torch.randn(n, 3, image_size, image_size, generator=g).to(device)
    web = [" ".join(WEB_WORDS[(i * 3 + j * 7) % len(WEB_WORDS)] for j in range(4 + i % 9)) for i in range(n)]
    return images, web


class BlipSide:
    """blip_core's CapFilt batch functions; the same model stands in for the captioner and the filter."""

    def __init__(self, workdir: Path, tok, device):
        from blip_core import load_model_dir

        self.model = load_model_dir(workdir / "blip").model.to(device).eval()
        self.tok = tok
        self.cfg = capfilt_config()
        self.device = device

    def run(self, images: torch.Tensor, web: list[str], seed: int = 0) -> tuple[list[list[str]], list[list[float]]]:
        from blip_core.capfilt import caption_batch, filter_batch
        from blip_core.seeding import make_generator

        gen = make_generator(self.device, seed)
        synthetic = caption_batch(self.model, self.tok, images, self.cfg, gen)
        candidates = [[w] + s for w, s in zip(web, synthetic)]
        return synthetic, filter_batch(self.model, self.tok, images, candidates)


class HFSide:
    """The same work with ``transformers``: ``generate(do_sample=True)`` and ``BlipForImageTextRetrieval``."""

    def __init__(self, workdir: Path, tok, device):
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

        self.captioner = BlipForConditionalGeneration.from_pretrained(workdir / "hf_caption").to(device).eval()
        self.filter = BlipForImageTextRetrieval.from_pretrained(workdir / "hf_retrieval").to(device).eval()
        self.tok = tok
        self.cfg = capfilt_config()
        self.device = device

    def captions(self, images: torch.Tensor, seed: int = 0) -> list[list[str]]:
        from blip_core.generation import strip_prompt

        c = self.cfg
        prompt, _ = self.tok([PROMPT] * images.shape[0], max_length=c.max_length)
        torch.manual_seed(seed)
        out = self.captioner.generate(pixel_values=images, input_ids=prompt.to(images.device), do_sample=True,
                                      top_p=c.top_p, top_k=50, repetition_penalty=c.repetition_penalty,
                                      num_return_sequences=c.num_captions, max_length=c.max_length,
                                      min_length=c.min_length)
        flat = [strip_prompt(self.tok.decode(row), PROMPT) for row in out]
        k = c.num_captions
        return [flat[i * k:(i + 1) * k] for i in range(images.shape[0])]

    def itm(self, images: torch.Tensor, texts: list[list[str]], max_length: int = 35) -> list[list[float]]:
        flat = [t for group in texts for t in group]
        rows = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=images.device)
        ids, mask = self.tok(flat, max_length=max_length)
        ids, mask = ids.to(images.device), mask.to(images.device)
        ids[:, 0] = self.tok.enc_id  # [ENC], as the official filter
        embeds = self.filter.vision_model(pixel_values=images).last_hidden_state[rows]
        hidden = self.filter.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                                          encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                            device=images.device),
                                          return_dict=True).last_hidden_state
        probs = self.filter.itm_head(hidden[:, 0]).float().softmax(dim=-1)[:, 1].tolist()
        out, pos = [], 0
        for group in texts:
            out.append(probs[pos:pos + len(group)])
            pos += len(group)
        return out

    def run(self, images: torch.Tensor, web: list[str], seed: int = 0) -> tuple[list[list[str]], list[list[float]]]:
        synthetic = self.captions(images, seed)
        return synthetic, self.itm(images, [[w] + s for w, s in zip(web, synthetic)])


def _all_batches(side, images: torch.Tensor, web: list[str], batch: int):
    out = []
    for s in range(0, images.shape[0], batch):
        out.append(side.run(images[s:s + batch], web[s:s + batch], seed=s))
    return out


def measure(workdir: Path, tok, images: torch.Tensor, web: list[str], *, batch: int, repeats: int,
            device) -> dict:
    """Both sides in this process, alternating; fastest of ``repeats`` per side; the ITM agreement check."""
    sides = {"blip_core": BlipSide(workdir, tok, device), "transformers": HFSide(workdir, tok, device)}
    with torch.inference_mode():
        for side in sides.values():  # warm-up
            side.run(images[:1], web[:1])
        best: dict[str, float] = {}
        results: dict[str, list] = {}
        for r in range(repeats):
            for name in (("blip_core", "transformers") if r % 2 == 0 else ("transformers", "blip_core")):
                sync(device)
                t = time.perf_counter()
                out = _all_batches(sides[name], images, web, batch)
                sync(device)
                seconds = time.perf_counter() - t
                if name not in best or seconds < best[name]:
                    best[name] = seconds
                results[name] = out
        # The same captions on both filters: blip_core's web + synthetic captions, scored by each side.
        diffs = []
        for s, (synthetic, ours) in zip(range(0, images.shape[0], batch), results["blip_core"]):
            texts = [[w] + syn for w, syn in zip(web[s:s + batch], synthetic)]
            theirs = sides["transformers"].itm(images[s:s + batch], texts)
            diffs += [abs(a - b) for ga, gb in zip(ours, theirs) for a, b in zip(ga, gb)]
    n = images.shape[0]
    rates = {name: n / sec for name, sec in best.items()}
    max_diff = max(diffs)
    example = results["blip_core"][0][0][0]
    return {
        "images": n, "batch": batch, "repeats": repeats,
        "seconds": best, "images_per_s": rates, "ratio": rates["blip_core"] / rates["transformers"],
        "itm_pairs_compared": len(diffs), "itm_max_abs_diff": max_diff, "itm_equal": max_diff <= ITM_TOLERANCE,
        "hours_for_14m": {name: PROJECT_IMAGES / r / 3600 for name, r in rates.items()},
        "example_synthetic": example,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capfilt", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base", help="base: ViT-B/16 at 384 px + BERT-base")
    p.add_argument("--n", type=int, default=16, help="web images per timed run")
    p.add_argument("--batch", type=int, default=8, help="images per CapFilt batch")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating (fastest kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default=None, help="where the weights are written (default: a temporary dir)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 on both sides: the ITM scores must agree
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    preset, size = SIZES[args.size]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {gpu or device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="blip_capfilt_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        t = time.perf_counter()
        prepare(workdir, preset, size)
        print(f"prepared random {preset} weights ({size} px) for both sides in {time.perf_counter() - t:.0f}s",
              flush=True)
        from blip_core.tokenizer import BlipTokenizer

        tok = BlipTokenizer.from_dir(workdir / "vocab")
        images, web = _inputs(args.n, size, device)
        report = measure(workdir, tok, images, web, batch=args.batch, repeats=args.repeats, device=device)
    report.update(size=args.size, preset=preset, image_size=size, device=gpu or str(device),
                  threads=torch.get_num_threads())
    rb, rh = report["images_per_s"]["blip_core"], report["images_per_s"]["transformers"]
    hb, hh = report["hours_for_14m"]["blip_core"], report["hours_for_14m"]["transformers"]
    check = (f"ITM equal on {report['itm_pairs_compared']} shared pairs (max abs diff "
             f"{report['itm_max_abs_diff']:.1e} <= {ITM_TOLERANCE:g})" if report["itm_equal"] else
             f"ITM SCORES DIFFER (max abs diff {report['itm_max_abs_diff']:.1e} > {ITM_TOLERANCE:g})")
    print()
    print(f"| {preset} at {size} px, {args.n} images, batch {args.batch} | blip_core | transformers | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| images/s | {rb:.3f} | {rh:.3f} | {rb / rh:.2f}x |")
    print(f"| hours for 14M images, one process on this device | {hb:,.0f} | {hh:,.0f} | |")
    print()
    print(f"ratio {report['ratio']:.2f}x; {check}")
    print(json.dumps({k: v for k, v in report.items()}, default=str))
    if not report["itm_equal"]:
        print("error: blip_core and transformers ITM scores differ on the same captions", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["itm_equal"] else 1)
