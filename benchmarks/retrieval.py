"""Retrieval evaluation at COCO size: ``python -m benchmarks.retrieval`` (5,000 images x 25,000 captions, k 256).

Runs :func:`blip_core.retrieval.retrieval_scores` (ITC features, blocked top-k, ITM re-rank of each row's
``k`` candidates in both directions) and :func:`~blip_core.eval.retrieval.recall_at_k` on synthetic inputs
(random pixels and random token ids of ``--text-len`` tokens) with a reduced-size model (``--preset toy``
by default, random weights: the timing and memory do not depend on the weights), on this machine's CPU.

Prints, for each phase, the wall time and the peak resident memory (VmHWM, reset after the model and the
inputs are built, so the peak is the phase's own working set plus what was already resident), and the
number of ITM pairs re-ranked. ``--unblocked`` also runs the previous, unblocked path (the whole cosine
matrix, then each direction's dense re-rank) for comparison; use it only at reduced sizes.

Options: ``--images``, ``--texts``, ``--k``, ``--preset``, ``--threads``, ``--block-rows``, ``--itm-batch``,
``--batch``, ``--device``, ``--partial-dir`` (save finished blocks there; a second run resumes), ``--progress``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from benchmarks.common import peak_rss_mib, reset_peak_rss, rss_mib
from blip_core import build_model, model_preset
from blip_core.eval.retrieval import recall_at_k
from blip_core.retrieval import itc_similarity, rerank_i2t, rerank_t2i, retrieval_scores
from blip_core.seeding import make_generator

VOCAB = 1000
ENC_ID, CLS_ID, SEP_ID, PAD_ID = VOCAB - 1, 2, 3, 0


def synthetic_split(n_images: int, n_texts: int, image_size: int, text_len: int, seed: int = 0):
    """Random pixels ``(N_img, 3, S, S)``, token ids ``(N_txt, L)`` ([CLS] first, [SEP], right padding) and
    COCO-like ground truth (text ``j`` describes image ``j % N_img``)."""
    g = make_generator("cpu", seed)
    images = torch.randn(n_images, 3, image_size, image_size, generator=g)
    ids = torch.randint(5, VOCAB - 3, (n_texts, text_len), generator=g)
    lengths = torch.randint(text_len // 2, text_len + 1, (n_texts,), generator=g)
    pos = torch.arange(text_len)[None, :]
    mask = (pos < lengths[:, None]).long()
    ids[:, 0] = CLS_ID
    ids[torch.arange(n_texts), lengths - 1] = SEP_ID
    ids = ids.masked_fill(mask == 0, PAD_ID)
    img2txt = [list(range(i, n_texts, n_images)) for i in range(n_images)]
    txt2img = [j % n_images for j in range(n_texts)]
    return images, ids, mask, img2txt, txt2img


def _phase(fn):
    reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, peak_rss_mib()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--texts", type=int, default=25000)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--preset", default="toy", choices=["tiny", "toy", "base"])
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (then the peak accelerator memory is reported too)")
    p.add_argument("--batch", type=int, default=128, help="images/texts per encoder forward")
    p.add_argument("--itm-batch", type=int, default=256, help="image-text pairs per ITM forward")
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--partial-dir", default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--unblocked", action="store_true", help="also run the unblocked path (small sizes only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(model_preset(args.preset), vocab_size=VOCAB).eval().to(args.device)
    size = model.cfg.vision.image_size
    images, ids, mask, img2txt, txt2img = synthetic_split(args.images, args.texts, size, args.text_len)
    base_rss = rss_mib()
    k_i2t, k_t2i = min(args.k, args.texts), min(args.k, args.images)
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                   f"{torch.__version__}, {args.threads} thread(s)",
        "preset": args.preset, "image_size": size, "images": args.images, "texts": args.texts, "k": args.k,
        "itm_pairs": args.images * k_i2t + args.texts * k_t2i,
        "rss_before_mib": round(base_rss, 1),
    }
    scores, secs, peak = _phase(lambda: retrieval_scores(
        model, images, ids, mask, enc_id=ENC_ID, k=args.k, batch_size=args.batch, itm_batch_size=args.itm_batch,
        block_rows=args.block_rows, partial_dir=args.partial_dir, progress=args.progress))
    report["scores"] = {"seconds": round(secs, 1), "peak_rss_mib": round(peak, 1),
                        "itm_pairs_per_s": round(report["itm_pairs"] / secs, 1)}
    if torch.device(args.device).type == "cuda":
        report["scores"]["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    metrics, secs, peak = _phase(lambda: recall_at_k(scores.i2t, scores.t2i, img2txt, txt2img))
    report["metrics"] = {"seconds": round(secs, 2), "peak_rss_mib": round(peak, 1),
                         "tr_r1": round(metrics["tr_r1"], 3), "ir_r1": round(metrics["ir_r1"], 3)}
    if args.unblocked:
        del scores

        def unblocked():
            itc = itc_similarity(model, images, ids, mask, batch_size=args.batch)
            with torch.no_grad():
                i2t = rerank_i2t(model, itc.image_embeds, itc.sim, ids, mask, enc_id=ENC_ID, k=args.k,
                                 batch_size=args.itm_batch)
                t2i = rerank_t2i(model, itc.image_embeds, itc.sim, ids, mask, enc_id=ENC_ID, k=args.k,
                                 batch_size=args.itm_batch)
            return recall_at_k(i2t, t2i, img2txt, txt2img)

        ref, secs, peak = _phase(unblocked)
        report["unblocked"] = {"seconds": round(secs, 1), "peak_rss_mib": round(peak, 1),
                               "same_metrics": ref == metrics}
    json.dump(report, sys.stdout, indent=1)
    print()
    return report


if __name__ == "__main__":
    main()
