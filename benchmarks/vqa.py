"""VQA answer generation speed: blip_core against ``transformers``' ``BlipForQuestionAnswering.generate``.

Run: ``python -m benchmarks.vqa`` (options: ``--size base|tiny``, ``--n``, ``--repeats``, ``--threads``,
``--image-size``, ``--device``).

Both sides hold the same random weights: a :class:`~blip_core.models.vqa.BlipVQA` of the chosen size is built
by blip_core, saved as a blip_core checkpoint and exported with :func:`blip_core.convert.save_hf`, which
``transformers`` loads. The work is the official ``generate`` inference: ``n`` images with one question each
(all questions of the same token length, so no padding), ``[ENC]`` first in the question on both sides, beam 3,
max length 10, min length 1. blip_core runs :func:`blip_core.vqa.generate_answers`; ``transformers`` runs
``generate(input_ids, pixel_values, attention_mask, num_beams=3, max_length=10, min_length=1)``. Both are
timed in one process, alternating sides, the fastest of ``--repeats`` kept per side; the decoded answers must
be identical.
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

from benchmarks.caption import _write_vocab
from benchmarks.common import fastest_alternating

NUM_BEAMS, MAX_LENGTH, MIN_LENGTH = 3, 10, 1
WORDS = ["a", "picture", "of", "dog", "cat", "on", "the", "grass", "with", "and"]


def prepare(workdir: Path, size: str, image_size: int) -> None:
    """Random ``size`` VQA weights at ``image_size`` px, saved for both sides."""
    import dataclasses

    from blip_core import model_preset, save_model_dir
    from blip_core.convert import save_hf
    from blip_core.models.vqa import BlipVQA
    from blip_core.tokenizer import BlipTokenizer

    _write_vocab(workdir / "vocab")
    tok = BlipTokenizer.from_dir(workdir / "vocab")
    cfg = model_preset(size)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size),
                              text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    torch.manual_seed(0)
    model = BlipVQA(cfg).eval()
    save_model_dir(workdir / "blip", model, tok)
    save_hf(model, workdir / "hf", "vqa", tok)


def questions(n: int) -> list[str]:
    """``n`` six-word questions from the vocabulary's words (equal token lengths: no padding)."""
    return [" ".join(WORDS[(i * 3 + j * 7) % len(WORDS)] for j in range(6)) for i in range(n)]


def load_sides(workdir: Path, tok, n: int, image_size: int, device: torch.device):
    """Each side's no-argument function answering the ``n`` questions (inputs already on the device)."""
    from transformers import BlipForQuestionAnswering

    from blip_core import load_model_dir
    from blip_core.seeding import make_generator
    from blip_core.vqa import generate_answers, question_tokens

    g = make_generator("cpu", 1)
    images = torch.randn(n, 3, image_size, image_size, generator=g).to(device)
    qs = questions(n)
    ids, mask = question_tokens(tok, qs, device=device)  # [ENC] first, as the official model
    ours = load_model_dir(workdir / "blip").model.to(device).eval()
    ref = BlipForQuestionAnswering.from_pretrained(workdir / "hf").to(device).eval()

    def blip():
        return generate_answers(ours, tok, images, qs, decoding="beam", num_beams=NUM_BEAMS, max_length=MAX_LENGTH,
                                min_length=MIN_LENGTH)

    def hf():
        out = ref.generate(input_ids=ids, pixel_values=images, attention_mask=mask, num_beams=NUM_BEAMS,
                           max_length=MAX_LENGTH, min_length=MIN_LENGTH)
        return [tok.decode(row) for row in out]

    return {"blip": blip, "hf": hf}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["base", "tiny"], default="base", help="model preset (default base)")
    p.add_argument("--n", type=int, default=8, help="questions (one image each) answered per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side, alternating (fastest kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=None, help="default: 384 for base, the preset's for tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    from blip_core import model_preset
    from blip_core.tokenizer import BlipTokenizer

    image_size = args.image_size or (384 if args.size == "base" else model_preset(args.size).vision.image_size)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="blip_bench_vqa_") as tmp:
        workdir = Path(args.workdir or tmp)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"threads {args.threads}, device {device}", flush=True)
        t = time.perf_counter()
        prepare(workdir, args.size, image_size)
        print(f"prepared random {args.size} VQA weights ({image_size} px) in {time.perf_counter() - t:.0f}s",
              flush=True)
        tok = BlipTokenizer.from_dir(workdir / "vocab")
        with torch.inference_mode():
            sides = load_sides(workdir, tok, args.n, image_size, device)
            for run in sides.values():  # warm-up
                run()
            best = {side: {"seconds": seconds, "answers": answers}
                    for side, (seconds, answers) in fastest_alternating(sides, args.repeats, device).items()}
    for res in best.values():
        res["answers_per_s"] = args.n / res["seconds"]
    ours, ref = best["blip"], best["hf"]
    same = ours["answers"] == ref["answers"]
    report = {"size": args.size, "image_size": image_size, "n": args.n, "threads": args.threads,
              "device": str(device), "blip_answers_per_s": ours["answers_per_s"],
              "hf_answers_per_s": ref["answers_per_s"], "ratio": ours["answers_per_s"] / ref["answers_per_s"],
              "identical": same, "answers": ours["answers"]}
    print(f"beam 3  blip_core {ours['answers_per_s']:.3f} answers/s  transformers {ref['answers_per_s']:.3f} "
          f"answers/s  ratio {report['ratio']:.2f}x  {'identical answers' if same else 'ANSWERS DIFFER'}")
    print(json.dumps({k: v for k, v in report.items() if k != "answers"}))
    if not same:
        print(f"error: blip_core and transformers answers differ: {ours['answers']} vs {ref['answers']}",
              file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
