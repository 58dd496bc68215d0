"""``blip convert``: Hugging Face / official BLIP checkpoints <-> blip_core checkpoint directories.

Examples::

    blip convert --from hf ./blip-image-captioning-base --to ckpt/caption
    blip convert --from official model_base_capfilt_large.pth --to ckpt/pretrained --preset base
    blip convert --from blip ckpt/caption --to hf/caption --format hf --task caption
    blip convert --from official model_base_vqa_capfilt_large.pth --to ckpt/vqa --image-size 480
    blip convert --from blip ckpt/vqa --to hf/vqa --format hf

A VQA model (transformers' ``BlipForQuestionAnswering``, the official ``model_vqa.pth`` layout, or a blip_core
VQA checkpoint) converts as a VQA model; its task is ``vqa`` whether ``--task`` says so or not.

Every conversion prints what it did beyond a one-to-one copy (initialised modules, ignored buffers,
interpolated position embeddings); unexpected, missing or mis-shaped keys stop it with an error naming them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blip_core import convert
from blip_core.checkpoint_io import Checkpoint, load_model_dir
from blip_core.errors import UserError
from blip_core.models.vqa import is_vqa
from blip_core.tokenizer import BlipTokenizer
from components.cli import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip convert", description=__doc__.split("\n\n")[0])
    one_line_errors(p)
    p.add_argument("--from", dest="source", required=True, choices=["hf", "official", "blip"],
                   help="source layout: a transformers directory, an official .pth, or a blip_core checkpoint")
    p.add_argument("src", help="source directory or .pth file")
    p.add_argument("--to", dest="dst", required=True, help="destination directory (or .pth for --format official)")
    p.add_argument("--format", choices=["blip", "hf", "official"], default="blip",
                   help="destination layout (default: blip_core checkpoint)")
    p.add_argument("--task", choices=["caption", "retrieval", "pretrain", "vqa"],
                   help="which modules to export for --format hf (caption|retrieval) or official "
                        "(caption|retrieval|pretrain); a VQA model exports as vqa")
    p.add_argument("--preset", choices=["base", "large"], default="base",
                   help="architecture of an official checkpoint (default: base)")
    p.add_argument("--image-size", type=int, default=None,
                   help="build the model for this resolution, interpolating the ViT position embeddings "
                        "bicubically (default: the source's own)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory to bundle when the source has none (e.g. bert-base-uncased)")
    p.add_argument("--label-smoothing", type=float, default=convert.DEFAULT_LABEL_SMOOTHING,
                   help="label_smoothing written into an HF config (default 0.1, as BLIP training)")
    return p


def _load(args) -> Checkpoint:
    if args.source == "hf":
        return convert.load_hf(args.src, image_size=args.image_size)
    if args.source == "official":
        return convert.load_official(args.src, args.preset, image_size=args.image_size)
    return load_model_dir(args.src, image_size=args.image_size)


def _task(args, vqa: bool) -> str | None:
    """The export task: ``vqa`` for a VQA model (``--task`` may be omitted), else ``--task``, checked."""
    if vqa:
        if args.task not in (None, "vqa"):
            raise UserError(f"the source is a VQA model: it exports only as --task vqa, not {args.task}")
        return "vqa"
    if args.task == "vqa":
        raise UserError("--task vqa needs a VQA model as the source")
    if args.format == "hf" and args.task not in ("caption", "retrieval"):
        raise UserError("--format hf needs --task caption or --task retrieval")
    if args.format == "official" and args.task is None:
        raise UserError("--format official needs --task caption, retrieval or pretrain")
    return args.task


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "vqa" and args.format == "blip":
        raise UserError("--task applies to --format hf or official")
    if args.format != "blip" and args.task not in (None, "vqa"):
        _task(args, vqa=False)  # refuse a wrong --task before loading the source
    ckpt = _load(args)
    task = _task(args, is_vqa(ckpt.model)) if args.format != "blip" else None
    if args.tokenizer:
        try:
            ckpt.tokenizer = BlipTokenizer.from_dir(args.tokenizer)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    if ckpt.tokenizer is not None and len(ckpt.tokenizer) > ckpt.model.cfg.text.vocab_size:
        raise UserError(f"the tokenizer has {len(ckpt.tokenizer)} tokens but the model's vocabulary is "
                        f"{ckpt.model.cfg.text.vocab_size}")
    for note in ckpt.notes:
        print(f"note: {note}")
    dst = Path(args.dst)
    if args.format == "hf":
        convert.save_hf(ckpt.model, dst, task, ckpt.tokenizer, label_smoothing=args.label_smoothing)
        dropped = {"caption": "text encoder, projections, ITM head and temperature",
                   "retrieval": "decoder self-attention, LM head and temperature"}.get(task)
        if dropped:
            print(f"note: the Hugging Face {task} model has no {dropped}: not exported")
    elif args.format == "official":
        convert.save_official(ckpt.model, dst, task, ckpt.momentum_state)
    else:
        ckpt.save(dst)
    if ckpt.tokenizer is None and args.format == "blip":
        print("note: no tokenizer bundled (pass --tokenizer DIR); 'blip caption' needs one")
    print(f"wrote {dst}")
    return 0
