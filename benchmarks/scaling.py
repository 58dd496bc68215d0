"""Cost model of one pipeline run at 3M, 14M and 129M images (docs/scaling.md prints its tables from here).

    python -m benchmarks.scaling                   # the tables, from the inputs stated below
    python -m benchmarks.scaling --measure-flops   # recount the FLOPs of the `base` preset on CPU (~1 min)
    python -m benchmarks.scaling --measure-ingest  # ingest + loader rates on real photos at 384 px (~1 min)

Every number in the tables is arithmetic on the inputs of this file: FLOPs per sample counted with
``torch.utils.flop_counter.FlopCounterMode`` (``--measure-flops``; the counts below are its output), CPU rates
measured with ``--measure-ingest`` or taken from docs/benchmarks.md, dataset sizes from the paper, and the
assumptions (peak FLOP/s, MFU, scaling efficiency, bytes per image, caption growth by CapFilt) named in
:data:`ASSUMPTIONS`. Change an input and re-run to get the tables for another setting.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9
TB = 1e12

# --------------------------------------------------------------------------------------------------
# Measured inputs
# --------------------------------------------------------------------------------------------------

# FLOPs per sample of the `base` preset (ViT-B/16 at 224 px, BERT-base MED, vocabulary 30,524, text length 30),
# counted by `python -m benchmarks.scaling --measure-flops` (batch 2, math attention so that attention matmuls
# are counted; FlopCounterMode counts 2 FLOPs per multiply-add of matmuls/convolutions/attention).
FLOPS = {
    "vit_fwd": 35.13e9,  # one ViT-B/16 forward, 224 px (197 tokens)
    "text_fwd": 5.13e9,  # unimodal text encoder forward, 30 tokens
    "cross_kv": 5.58e9,  # the image's cross-attention keys/values for 12 layers, computed once per image
    "itm_pass": 6.20e9,  # one image-grounded encoder forward (30 tokens) reading precomputed K/V, + ITM head
    "decoder_pass": 7.64e9,  # one decoder forward (30 tokens) reading precomputed K/V, + LM head
    "pretrain_fwd": 112.44e9,  # PretrainObjective forward (ITC+ITM+LM, momentum encoders included) per pair
    "pretrain_step": 256.39e9,  # forward + backward per pair
    "filter_step": 233.47e9,  # FilterObjective (ITC+ITM) forward + backward per pair
    "captioner_step": 144.79e9,  # CaptionerObjective (LM) forward + backward per pair
}

# Checkpoint bytes of the `base` preset (`--measure-flops` also counts them): the pre-training objective's
# state (model, momentum encoders, ITC queues of 57,600) and AdamW's two moments per trainable parameter, fp32.
CHECKPOINT = {
    "objective_bytes": 2.02e9,  # objective.safetensors (also the size of a stage's model/ output)
    "optimizer_bytes": 2.02e9,  # optimizer.safetensors
}

# CPU rates measured here (2-core shared box; "per CPU-second" rates, which are what one idle core does):
RATES = {
    # `--measure-ingest`: 300 photo crops (sklearn/matplotlib sample photos, 427-640 px, JPEG q90) in a
    # Karpathy-style annotation file -> ingest at ingest.resolution=384 (decode, check, resize, JPEG q95, shard)
    "ingest_per_cpu_s": 149.0,
    "stored_bytes_per_image": 73_400,  # mean shard bytes per sample at 384 px short side, q95 (same run)
    # same run: the training loader (224 px RandomResizedCrop, flip, RandAugment, tokenise) on those shards
    "train_loader_per_cpu_s": 130.0,
}

# --------------------------------------------------------------------------------------------------
# Stated assumptions
# --------------------------------------------------------------------------------------------------

ASSUMPTIONS = {
    "gpu": "A100 80GB SXM",
    "peak_bf16_flops": 312e12,  # NVIDIA A100 datasheet, dense bf16
    "peak_tf32_flops": 156e12,  # dense TF32 (the official code: fp32 on PyTorch 1.10, whose matmuls use TF32)
    "paper_days_14m": 3.5,  # BLIP#2: ViT-B on 14M takes 3-4 days, on two 16-GPU A100 nodes (blip-reference 2.4)
    "paper_gpus": 32,
    "bf16_mfu": 0.30,  # the upside scenario: pretrain.precision=bf16 reaching 30% of the bf16 peak (not measured)
    "generate_share": 1 / 3,  # sampling / beam search runs at a third of the training FLOP rate (small matmuls)
    "scaling_efficiency": {1: 1.0, 2: 0.95, 4: 0.92, 8: 0.88},  # data parallel over nodes (DDP all-reduce,
    # ITC feature all-gather); 8 GPUs per node
    "gpus_per_node": 8,
    "pretrain_epochs": 20,  # paper / pretrain.epochs default
    "finetune_epochs": 5,  # finetune_captioner / finetune_filter defaults (paper: 5 captioning, 6 retrieval)
    "capfilt_texts_per_web_image": 23.3 / 13.86,  # paper Table 12: 14M set grows 15.3M -> 24.7M texts
    "capfilt_captions_per_image": 1,  # capfilt.num_captions (paper: one nucleus caption)
    "caption_tokens": 30,  # capfilt.max_length; generation ~ one decoder pass over the caption
    "eval_images": 5_000, "eval_texts": 25_000, "eval_k_test": 256,  # COCO Karpathy test, paper's k
    "eval_models": 2,  # the pipeline evaluates the noisy and the bootstrapped model
    "eval_beams": 3, "eval_caption_tokens": 20,
    "raw_bytes_human": 150_000,  # COCO 2014 (19.2 GB / 123K images) and VG (14.7 GB / 108K): ~150 KB each
    "raw_bytes_web": 110_000,  # a downloaded web image kept at its original size (assumption)
    "checkpoint_every_hours": 1.0,  # pretrain.checkpoint_every chosen to write one checkpoint per wall hour
    "ingest_processes": 1,  # the pipeline's ingest step is one process (pipelines/settings.py: 4 CPUs)
}


def official_step_flops() -> float:
    """FLOPs per pair of the official pre-training step: ours plus the image K/V projections it repeats.

    The official code projects the image tokens to cross-attention keys/values inside each of its four
    image-grounded passes (3 ITM + 1 LM) instead of once: 3 extra ``cross_kv`` per pair, forward + backward.
    """
    return FLOPS["pretrain_step"] + 3 * 3 * FLOPS["cross_kv"]


def paper_flops_per_gpu() -> float:
    """FLOP/s per A100 the paper's 14M run achieved: 20 epochs of 15.25M pairs in ``paper_days_14m`` on 32 GPUs."""
    texts = sum(s.texts for s in SCALES["14M"])
    return texts * 20 * official_step_flops() / (ASSUMPTIONS["paper_gpus"] * ASSUMPTIONS["paper_days_14m"] * 86400)


def scenario_rate(scenario: str) -> float:
    """Training FLOP/s per GPU: ``paper`` = what the official run achieved; ``bf16`` = the stated MFU."""
    if scenario == "paper":
        return paper_flops_per_gpu()
    return ASSUMPTIONS["bf16_mfu"] * ASSUMPTIONS["peak_bf16_flops"]


# --------------------------------------------------------------------------------------------------
# Scales (paper, blip-reference.md section 2.4): images and texts per source
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    images: float
    texts: float
    human: bool


COCO = Source("COCO", 113e3, 567e3, True)
VG = Source("VG", 100e3, 821e3, True)
CC3M = Source("CC3M", 3e6, 3e6, False)
SBU = Source("SBU", 860e3, 860e3, False)
CC12M = Source("CC12M", 10e6, 10e6, False)
LAION = Source("LAION-115M", 115e6, 115e6, False)

SCALES = {"3M": [COCO, VG, CC3M], "14M": [COCO, VG, CC3M, SBU, CC12M], "129M": [COCO, VG, CC3M, SBU, CC12M, LAION]}
# The paper reads 1/5 of LAION per epoch; this pipeline reads all data every epoch, so at 129M the epochs are
# cut to give about the paper's number of pairs seen, before and after CapFilt.
NODES = (2, 4, 8)


def _paper_pairs_129m(boot: bool) -> float:
    ratio = ASSUMPTIONS["capfilt_texts_per_web_image"] if boot else 1.0
    rest = sum(s.texts if s.human else s.texts * ratio for s in SCALES["14M"])
    return ASSUMPTIONS["pretrain_epochs"] * (rest + LAION.texts * ratio / 5)


def scale_sizes(name: str) -> dict[str, float]:
    srcs = SCALES[name]
    human_images = sum(s.images for s in srcs if s.human)
    human_texts = sum(s.texts for s in srcs if s.human)
    web = sum(s.images for s in srcs if not s.human)
    texts = human_texts + web
    boot_texts = human_texts + web * ASSUMPTIONS["capfilt_texts_per_web_image"]
    epochs = boot_epochs = ASSUMPTIONS["pretrain_epochs"]
    if name == "129M":
        epochs = max(1, round(_paper_pairs_129m(False) / texts))
        boot_epochs = max(1, round(_paper_pairs_129m(True) / boot_texts))
    return {"human_images": human_images, "human_texts": human_texts, "web_images": web,
            "images": human_images + web, "texts": texts, "epochs": epochs, "boot_texts": boot_texts,
            "boot_epochs": boot_epochs, "boot_images": human_images + web}


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def stage_flops(name: str) -> dict[str, tuple[float, float]]:
    """Per stage: (FLOPs, share of the training FLOP rate it runs at)."""
    z = scale_sizes(name)
    a, f = ASSUMPTIONS, FLOPS
    gen = a["generate_share"]
    capfilt_enc = 2 * (f["vit_fwd"] + f["cross_kv"]) + (1 + a["capfilt_captions_per_image"]) * f["itm_pass"]
    capfilt_gen = a["capfilt_captions_per_image"] * f["decoder_pass"] * a["caption_tokens"] / 30
    ev = a["eval_models"] * (
        a["eval_images"] * (f["vit_fwd"] + f["cross_kv"]) + a["eval_texts"] * f["text_fwd"]
        + (a["eval_images"] + a["eval_texts"]) * a["eval_k_test"] * f["itm_pass"])
    ev_gen = a["eval_models"] * a["eval_images"] * a["eval_beams"] * f["decoder_pass"] * a["eval_caption_tokens"] / 30
    return {
        "pretrain": (z["texts"] * z["epochs"] * f["pretrain_step"], 1.0),
        "finetune captioner": (z["human_texts"] * a["finetune_epochs"] * f["captioner_step"], 1.0),
        "finetune filter": (z["human_texts"] * a["finetune_epochs"] * f["filter_step"], 1.0),
        "capfilt: filter (ViT + ITM)": (z["web_images"] * capfilt_enc, 1.0),
        "capfilt: captioner (sampling)": (z["web_images"] * capfilt_gen, gen),
        "repretrain": (z["boot_texts"] * z["boot_epochs"] * f["pretrain_step"], 1.0),
        "evaluate: retrieval": (ev, 1.0),
        "evaluate: captioning": (ev_gen, gen),
    }


def gpu_hours(flops: float, share: float, scenario: str) -> float:
    return flops / (scenario_rate(scenario) * share) / 3600


def wall_hours(gpu_h: float, nodes: int) -> float:
    g = ASSUMPTIONS["gpus_per_node"] * nodes
    return gpu_h / (g * ASSUMPTIONS["scaling_efficiency"][nodes])


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def ingest_hours(name: str, processes: int | None = None) -> float:
    p = processes or ASSUMPTIONS["ingest_processes"]
    return scale_sizes(name)["images"] / (RATES["ingest_per_cpu_s"] * p) / 3600


def stage_walls(name: str, scenario: str) -> list[tuple[str, float, float, float, list[float]]]:
    """(stage, FLOPs, rate share, GPU-hours, wall hours per entry of NODES); evaluate runs on one GPU."""
    out = []
    for stage, (flops, share) in stage_flops(name).items():
        gh = gpu_hours(flops, share, scenario)
        walls = [gh if stage.startswith("evaluate") else wall_hours(gh, n) for n in NODES]
        out.append((stage, flops, share, gh, walls))
    return out


def table_sizes() -> list[str]:
    rows = ["| scale | sources | images | pairs per epoch | epochs | pairs seen | texts after CapFilt | "
            "epochs | pairs seen |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, srcs in SCALES.items():
        z = scale_sizes(name)
        rows.append(f"| {name} | {' + '.join(s.name for s in srcs)} | {z['images'] / 1e6:.2f}M | "
                    f"{z['texts'] / 1e6:.2f}M | {z['epochs']} | {z['texts'] * z['epochs'] / 1e6:,.0f}M | "
                    f"{z['boot_texts'] / 1e6:.1f}M | {z['boot_epochs']} | "
                    f"{z['boot_texts'] * z['boot_epochs'] / 1e6:,.0f}M |")
    return rows


def table_compute(name: str, scenario: str = "paper") -> list[str]:
    head = " | ".join(f"wall h, {n} x 8" for n in NODES)
    rows = [f"| stage ({name}) | PFLOP | A100 GPU-hours | {head} |", "|---|---:|---:|" + "---:|" * len(NODES)]
    total_gpu, totals = 0.0, [0.0] * len(NODES)
    for stage, flops, _, gh, walls in stage_walls(name, scenario):
        total_gpu += gh
        totals = [t + w for t, w in zip(totals, walls)]
        cells = " | ".join(_fmt(w) + (" (1 GPU)" if stage.startswith("evaluate") else "") for w in walls)
        rows.append(f"| {stage} | {_fmt(flops / 1e15)} | {_fmt(gh)} | {cells} |")
    ing = ingest_hours(name)
    rows.append("| ingest (CPU, the pipeline's one process) | - | - | " + " | ".join(_fmt(ing) for _ in NODES) + " |")
    rows.append(f"| **total** | | **{_fmt(total_gpu)}** | "
                + " | ".join(f"**{_fmt(t + ing)}** ({(t + ing) / 24:.1f} d)" for t in totals) + " |")
    return rows


def table_summary() -> list[str]:
    rows = ["| scale | scenario | A100 GPU-hours | " + " | ".join(f"wall d, {n} x 8" for n in NODES)
            + " | of which ingest (d) |", "|---|---|---:|" + "---:|" * (len(NODES) + 1)]
    for name in SCALES:
        for scenario in ("paper", "bf16"):
            st = stage_walls(name, scenario)
            gh = sum(x[3] for x in st)
            walls = [sum(x[4][i] for x in st) + ingest_hours(name) for i in range(len(NODES))]
            label = (f"paper rate ({scenario_rate('paper') / 1e12:.1f} TFLOP/s per GPU)" if scenario == "paper"
                     else f"bf16 at {ASSUMPTIONS['bf16_mfu']:.0%} MFU ({scenario_rate('bf16') / 1e12:.0f} TFLOP/s)")
            rows.append(f"| {name} | {label} | {_fmt(gh)} | " + " | ".join(f"{w / 24:.1f}" for w in walls)
                        + f" | {ingest_hours(name) / 24:.1f} |")
    return rows


def _checkpoints(name: str, nodes: int, scenario: str = "paper") -> dict[str, float]:
    """Checkpoints of the two pre-training stages on S3 (an s3 output keeps every checkpoint written)."""
    n = 0
    for stage, _, _, _, walls in stage_walls(name, scenario):
        if stage in ("pretrain", "repretrain"):
            n += math.ceil(walls[NODES.index(nodes)] / ASSUMPTIONS["checkpoint_every_hours"])
    per = CHECKPOINT["objective_bytes"] + CHECKPOINT["optimizer_bytes"]
    return {"count": n, "per": per, "bytes": n * per}


def _raw_bytes(z: dict[str, float]) -> float:
    return z["human_images"] * ASSUMPTIONS["raw_bytes_human"] + z["web_images"] * ASSUMPTIONS["raw_bytes_web"]


def _size(b: float) -> str:
    return f"{b / TB:.2f} TB" if b >= 0.1 * TB else f"{b / GB:.0f} GB"


def table_storage(nodes: int = 4) -> list[str]:
    rows = ["| scale | raw images | ingested shards | CapFilt output | model outputs (4 stages) | "
            f"pre-training checkpoints on S3 ({nodes} x 8, paper rate) | total |", "|---|---:|---:|---:|---:|---:|---:|"]
    b = RATES["stored_bytes_per_image"]
    for name in SCALES:
        z = scale_sizes(name)
        raw, shards, boot = _raw_bytes(z), z["images"] * b, z["boot_images"] * b
        models = 4 * CHECKPOINT["objective_bytes"]
        ck = _checkpoints(name, nodes)
        total = raw + shards + boot + models + ck["bytes"]
        rows.append(f"| {name} | {_size(raw)} | {_size(shards)} | {_size(boot)} | {_size(models)} | "
                    f"{ck['count']} x {ck['per'] / GB:.1f} GB = {_size(ck['bytes'])} | {_size(total)} |")
    return rows


def table_traffic(nodes: int = 4) -> list[str]:
    rows = ["| scale | ingest (read raw + write shards) | pretrain (shards x epochs) | fine-tune (2 stages) | "
            "capfilt (read + write) | repretrain | evaluate | checkpoints + models written | total |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    b = RATES["stored_bytes_per_image"]
    a = ASSUMPTIONS
    for name in SCALES:
        z = scale_sizes(name)
        cells = [
            _raw_bytes(z) + z["images"] * b,
            z["epochs"] * z["images"] * b,
            2 * a["finetune_epochs"] * z["human_images"] * b,
            z["images"] * b + z["boot_images"] * b,
            z["boot_epochs"] * z["boot_images"] * b,
            a["eval_images"] * b + a["eval_models"] * CHECKPOINT["objective_bytes"],
            _checkpoints(name, nodes)["bytes"] + 4 * CHECKPOINT["objective_bytes"],
        ]
        rows.append(f"| {name} | " + " | ".join(_size(c) for c in [*cells, sum(cells)]) + " |")
    return rows


def table_paper_check() -> list[str]:
    """The paper's 14M run (20 epochs, 3-4 days on 2 x 16 A100) against the FLOP count: implied MFU."""
    z = scale_sizes("14M")
    total = z["texts"] * 20 * official_step_flops()
    rows = ["| days on 32 A100 | pairs seen | FLOPs (official step) | per GPU | pairs/s per GPU | of TF32 peak | "
            "of bf16 peak |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for days in (3, 3.5, 4):
        per_gpu = total / (ASSUMPTIONS["paper_gpus"] * days * 86400)
        pairs = z["texts"] * 20 / (ASSUMPTIONS["paper_gpus"] * days * 86400)
        rows.append(f"| {days} | {z['texts'] * 20 / 1e6:,.0f}M | {total / 1e18:,.0f} EFLOP | "
                    f"{per_gpu / 1e12:.1f} TFLOP/s | {pairs:.1f} | {per_gpu / ASSUMPTIONS['peak_tf32_flops']:.3f} | "
                    f"{per_gpu / ASSUMPTIONS['peak_bf16_flops']:.3f} |")
    return rows


def table_data_loading() -> list[str]:
    """CPU cores per node the training loader needs to keep 8 GPUs fed."""
    rows = ["| scenario | pairs/s per GPU | pairs/s per node | loader cores per node | `data.num_workers` per GPU |",
            "|---|---:|---:|---:|---:|"]
    for scenario in ("paper", "bf16"):
        per_gpu = scenario_rate(scenario) / FLOPS["pretrain_step"]
        node = ASSUMPTIONS["gpus_per_node"] * per_gpu
        cores = node / RATES["train_loader_per_cpu_s"]
        rows.append(f"| {scenario} | {per_gpu:.0f} | {node:,.0f} | {cores:.1f} | "
                    f"{math.ceil(cores / ASSUMPTIONS['gpus_per_node'])} |")
    return rows


def table_ingest() -> list[str]:
    rows = ["| scale | core-hours | one process (the pipeline step) | 16 processes | 64 processes |",
            "|---|---:|---:|---:|---:|"]
    for name in SCALES:
        h = ingest_hours(name, 1)
        rows.append(f"| {name} | {_fmt(h)} | {_fmt(h)} h ({h / 24:.1f} d) | {_fmt(h / 16)} h | {_fmt(h / 64)} h |")
    return rows


def print_tables() -> None:
    sections = [("Scales", table_sizes()), ("Paper cross-check (14M, ViT-B)", table_paper_check()),
                ("Summary: one pipeline run", table_summary())]
    sections += [(f"Compute per stage, {name}, paper rate", table_compute(name)) for name in SCALES]
    sections += [("Ingest (CPU)", table_ingest()), ("Data loading", table_data_loading()),
                 ("Storage", table_storage()), ("S3 traffic (bytes read + written, 4 x 8)", table_traffic())]
    for title, rows in sections:
        print(f"### {title}\n")
        print("\n".join(rows))
        print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure-flops", action="store_true", help="count FLOPs of the base preset on CPU")
    p.add_argument("--measure-ingest", action="store_true", help="ingest and loader rates on real photos")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.measure_flops:
        from benchmarks.scaling_measure import measure_flops

        measure_flops(args.threads)
    elif args.measure_ingest:
        from benchmarks.scaling_measure import measure_ingest

        measure_ingest()
    else:
        print_tables()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
