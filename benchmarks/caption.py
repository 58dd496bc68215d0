"""Captioning and ITM re-ranking speed and memory: blip_core against the ``transformers`` BLIP port.

Run: ``python -m benchmarks.caption`` (options: ``--threads``, ``--repeats``, ``--batch``, ``--texts``).

Both sides use the same random ``base`` weights (ViT-B/16 at 384 px + BERT-base MED): blip_core's model is
exported with :func:`blip_core.convert.save_hf` and loaded by ``transformers``.

* Speed: both models in one process, runs alternating between the two sides, the fastest of ``--repeats``
  kept per side, so load from other processes on a shared machine hits both sides alike.
* Memory: each side in its own subprocess; the RSS high-water mark is reset after the model is loaded, so
  the peak covers one measured run, and its delta over the RSS after loading is the task's working memory.
* Generated tokens and ITM/ITC scores are checked for equality between the two sides.

Tasks:

* captioning: batch of 8 images, prompt "a picture of ", max length 20, min length 5; greedy and beam 3.
  ``transformers``: ``BlipForConditionalGeneration.generate``.
* ITM re-ranking: one image against 128 texts: ITM logits ([ENC] first) and ITC cosine.
  ``transformers``: the vision tower once, then ``text_encoder`` with the image tokens expanded to the 128
  texts (the fastest use of its public modules; ``BlipForImageTextRetrieval.forward`` would also re-run the
  ViT per text), plus the unimodal pass for ITC.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import fastest_alternating, peak_rss_mib, reset_peak_rss, rss_mib

PROMPT = "a picture of "
MAX_LENGTH, MIN_LENGTH = 20, 5


def _write_vocab(d: Path) -> None:
    """A 30522-entry BERT-style vocabulary (special ids as bert-base-uncased) holding the prompt's words."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["a", "picture", "of", "dog", "cat", "on", "the", "grass", "with", "and"]
    vocab += words + [f"w{i}" for i in range(30522 - len(vocab) - len(words))]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")


def prepare(workdir: Path, preset: str = "base", image_size: int = 384) -> None:
    """Random weights of ``preset`` at ``image_size`` px, saved for both sides (blip_core dir, HF caption and
    retrieval dirs)."""
    import dataclasses

    from blip_core import build_model, model_preset, save_model_dir
    from blip_core.convert import save_hf
    from blip_core.tokenizer import BlipTokenizer

    _write_vocab(workdir / "vocab")
    tok = BlipTokenizer.from_dir(workdir / "vocab")
    cfg = model_preset(preset)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size))
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(tok)).eval()
    save_model_dir(workdir / "blip", model, tok)
    save_hf(model, workdir / "hf_caption", "caption", tok)
    save_hf(model, workdir / "hf_retrieval", "retrieval", tok)


def _inputs(batch: int, texts: int, image_size: int = 384):
    from blip_core.seeding import make_generator

    g = make_generator("cpu", 1)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    words = ["a", "dog", "cat", "on", "the", "grass", "with", "and", "picture", "of"]
    captions = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 15)) for i in range(texts)]
    return images, captions


def load_side(side: str, task: str, workdir: Path, tok, batch: int, texts: int, *, image_size: int = 384,
              device: torch.device | str = "cpu"):
    """Load one side's model for ``task`` onto ``device`` and return a no-argument function running the
    measured work (inputs already on the device)."""
    from blip_core.constants import RETRIEVAL_TEXT_TOKENS

    images, captions = _inputs(batch, texts, image_size)
    ids, mask = tok(captions, max_length=RETRIEVAL_TEXT_TOKENS)
    images, ids, mask = images.to(device), ids.to(device), mask.to(device)
    if side == "blip":
        from blip_core import load_model_dir
        from blip_core.generation import generate_ids, itm_itc, prompt_token_ids

        model = load_model_dir(workdir / "blip").model.to(device).eval()
        prompt = prompt_token_ids(tok, PROMPT)

        def caption(x, beams):
            return generate_ids(model, x, prompt, eos_id=tok.sep_id, pad_id=tok.pad_id,
                                decoding="beam" if beams > 1 else "greedy", num_beams=beams,
                                max_length=MAX_LENGTH, min_length=MIN_LENGTH)

        def rerank(x, ids, mask):
            return itm_itc(model, model.encode_image(x), ids, mask, tok.enc_id)
    else:
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

        if task == "itm":
            model = BlipForImageTextRetrieval.from_pretrained(workdir / "hf_retrieval").to(device).eval()
        else:
            model = BlipForConditionalGeneration.from_pretrained(workdir / "hf_caption").to(device).eval()

        def caption(x, beams):
            prompt, _ = tok([PROMPT] * x.shape[0], max_length=MAX_LENGTH)
            prompt = prompt.to(x.device)
            return model.generate(pixel_values=x, input_ids=prompt, num_beams=beams, do_sample=False,
                                  max_length=MAX_LENGTH, min_length=MIN_LENGTH)

        def rerank(x, ids, mask):
            emb = model.vision_model(pixel_values=x).last_hidden_state  # (1, N, D)
            n = ids.shape[0]
            enc_ids = ids.clone()
            enc_ids[:, 0] = tok.enc_id
            hidden = model.text_encoder(input_ids=enc_ids, attention_mask=mask,
                                        encoder_hidden_states=emb.expand(n, -1, -1),  # (T, N, D)
                                        encoder_attention_mask=torch.ones(n, emb.shape[1], dtype=torch.long,
                                                                         device=emb.device))
            itm = model.itm_head(hidden.last_hidden_state[:, 0])
            text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            text_feat = torch.nn.functional.normalize(model.text_proj(text[:, 0]), dim=-1)
            image_feat = torch.nn.functional.normalize(model.vision_proj(emb[:, 0]), dim=-1)
            return itm, (text_feat @ image_feat.T).squeeze(1)

    if task == "itm":
        rerank(images[:1], ids[:4], mask[:4])  # warm-up
        return lambda: rerank(images[:1], ids, mask)
    beams = 1 if task == "greedy" else 3
    caption(images[:1], beams)  # warm-up
    return lambda: caption(images, beams)


def _summary(task: str, out) -> dict:
    if task == "itm":
        return {"itm": out[0].tolist(), "itc": out[1].tolist()}
    return {"tokens": out.tolist()}


def worker(side: str, task: str, workdir: Path, threads: int, batch: int, texts: int) -> dict:
    """Memory of one (side, task) in a fresh process: RSS after loading and peak RSS of one run."""
    torch.set_num_threads(threads)
    from blip_core.tokenizer import BlipTokenizer

    tok = BlipTokenizer.from_dir(workdir / "vocab")
    with torch.inference_mode():
        run = load_side(side, task, workdir, tok, batch, texts)
        loaded_rss = rss_mib()
        reset_peak_rss()
        out = run()
    return {**_summary(task, out), "loaded_rss_mib": loaded_rss, "peak_rss_mib": peak_rss_mib()}


def timing(task: str, workdir: Path, tok, args, *, image_size: int = 384,
           device: torch.device | str = "cpu") -> dict[str, dict]:
    """Both sides in this process, runs alternating, the fastest of ``args.repeats`` kept per side."""
    with torch.inference_mode():
        runs = {side: load_side(side, task, workdir, tok, args.batch, args.texts, image_size=image_size,
                                device=device) for side in ("blip", "hf")}
        best = {side: {**_summary(task, out), "seconds": seconds}
                for side, (seconds, out) in fastest_alternating(runs, args.repeats, device).items()}
    units = args.texts if task == "itm" else args.batch
    for res in best.values():
        res["rate"] = units / res["seconds"]
    return best


def _run_worker(side, task, args, workdir) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.caption", "--worker", side, task, "--workdir", str(workdir),
           "--threads", str(args.threads), "--batch", str(args.batch), "--texts", str(args.texts)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _trim(rows, prompt_len: int, eos: int) -> list[list[int]]:
    out = []
    for r in rows:
        r = r[prompt_len:]
        out.append(r[: r.index(eos) + 1] if eos in r else r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side, alternating (fastest kept)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "TASK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = worker(*args.worker, Path(args.workdir), args.threads, args.batch, args.texts)
        print(json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory(prefix="blip_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"threads {args.threads}", flush=True)
        t = time.perf_counter()
        prepare(workdir)
        print(f"prepared random base weights (384 px) for both sides in {time.perf_counter() - t:.0f}s", flush=True)
        from blip_core.tokenizer import BlipTokenizer

        torch.set_num_threads(args.threads)
        tok = BlipTokenizer.from_dir(workdir / "vocab")
        rows = []
        ok = True
        for task in ("greedy", "beam3", "itm"):
            speed = timing(task, workdir, tok, args)
            ours, ref = speed["blip"], speed["hf"]
            for side, res in (("blip", ours), ("hf", ref)):
                res.update({k: v for k, v in _run_worker(side, task, args, workdir).items()
                            if k.endswith("_mib")})
            if task == "itm":
                same = (torch.allclose(torch.tensor(ours["itm"]), torch.tensor(ref["itm"]), atol=1e-4)
                        and torch.allclose(torch.tensor(ours["itc"]), torch.tensor(ref["itc"]), atol=1e-5))
                unit = "pairs/s"
            else:
                same = _trim(ours["tokens"], 4, tok.sep_id) == _trim(ref["tokens"], 4, tok.sep_id)
                unit = "images/s"
            ok &= same
            rows.append((task, unit, ours, ref, same))
            print(f"{task:<7} blip_core {ours['rate']:7.3f} {unit}  transformers {ref['rate']:7.3f} {unit}  "
                  f"ratio {ours['rate'] / ref['rate']:.2f}x  "
                  f"peak RSS {ours['peak_rss_mib']:.0f} vs {ref['peak_rss_mib']:.0f} MiB  "
                  f"(working set {ours['peak_rss_mib'] - ours['loaded_rss_mib']:.0f} vs "
                  f"{ref['peak_rss_mib'] - ref['loaded_rss_mib']:.0f} MiB)  "
                  f"{'identical outputs' if same else 'OUTPUTS DIFFER'}", flush=True)
        print()
        print("| task | blip_core | transformers | ratio | peak RSS blip_core / transformers (MiB) "
              "| working set above loaded model (MiB) | outputs |")
        print("|---|---|---|---|---|---|---|")
        for task, unit, ours, ref, same in rows:
            print(f"| {task} | {ours['rate']:.3f} {unit} | {ref['rate']:.3f} {unit} | "
                  f"{ours['rate'] / ref['rate']:.2f}x | {ours['peak_rss_mib']:.0f} / {ref['peak_rss_mib']:.0f} | "
                  f"{ours['peak_rss_mib'] - ours['loaded_rss_mib']:.0f} / "
                  f"{ref['peak_rss_mib'] - ref['loaded_rss_mib']:.0f} | {'identical' if same else 'DIFFER'} |")
        if not ok:
            print("error: blip_core and transformers outputs differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
