"""``blip caption`` and ``blip itm``: caption images and score image-text pairs with a blip_core checkpoint.

Examples::

    blip caption --checkpoint ckpt/caption photo1.jpg photo2.png --decoding beam --num-beams 3
    blip caption --checkpoint ckpt/caption *.jpg --decoding nucleus --seed 0 --json
    blip itm --checkpoint ckpt/filter photo.jpg "a dog on the grass" "a plate of food"

An image that cannot be read (missing, not an image, or over ``--max-pixels``, checked before decoding) gets
a one-line error and the others still run; the exit code is 2, like every other input error, when any image
failed. ``blip itm`` prints, per text, the ITM match probability (a caption confidence score) and the
ITC cosine similarity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from blip_core.checkpoint_io import Checkpoint, load_checkpoint
from blip_core.data.transforms import EvalTransform
from blip_core.errors import UserError
from blip_core.generation import LENGTH_NORMS, generate_captions, itm_scores
from blip_core.images import MAX_PIXELS, ImageTooLarge, open_rgb
from blip_core.seeding import make_generator
from components.cli import one_line_errors


def eval_transform(image_size: int):
    """The evaluation transform (``blip_core.data.transforms.EvalTransform``)."""
    return EvalTransform(image_size)


def load_image(path: str | Path, transform, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an image file into a normalised ``(3, S, S)`` tensor; raises ``UserError`` with the reason.

    The pixel count is checked on the header, before decoding (see :func:`blip_core.images.open_rgb`).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    try:
        img = open_rgb(p, max_pixels)
    except ImageTooLarge as e:
        raise UserError(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return transform(img, "")[0]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def _check_caption_args(args) -> None:
    """Refuse option values that cannot decode, before the model is loaded."""
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.num_beams < 1:
        raise UserError("--num-beams must be >= 1")
    if args.max_length < 1:
        raise UserError("--max-length must be >= 1")
    if not 0 <= args.min_length <= args.max_length:
        raise UserError(f"--min-length must be between 0 and --max-length ({args.max_length}), "
                        f"got {args.min_length}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.max_pixels < 1:
        raise UserError("--max-pixels must be >= 1")


def _open(checkpoint: str, device: torch.device) -> Checkpoint:
    ckpt = load_checkpoint(checkpoint, with_momentum=False)
    if ckpt.tokenizer is None:
        raise UserError(f"{checkpoint} has no tokenizer/ directory (convert again with --tokenizer DIR)")
    ckpt.model.to(device).eval()
    return ckpt


def _error(command: str, message: str) -> None:
    print(f"blip {command}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# blip caption
# --------------------------------------------------------------------------------------------------


def caption_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip caption", description="Caption images with a blip_core checkpoint.")
    p.add_argument("--checkpoint", required=True, help="blip_core checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--decoding", choices=["greedy", "beam", "nucleus"], default="beam")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20, help="total tokens including the prompt")
    p.add_argument("--min-length", type=int, default=5, help="total tokens including the prompt")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="default 1.0 for greedy/beam, 1.1 for nucleus")
    p.add_argument("--length-norm", choices=list(LENGTH_NORMS), default="current",
                   help="beam search: score finished captions as today's transformers (current) or as "
                        "transformers 4.15, which the official BLIP numbers used (hf415)")
    p.add_argument("--prompt", default="a picture of ")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None, help="seed for nucleus sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images with more pixels, before decoding (default {MAX_PIXELS})")
    one_line_errors(p)
    return p


def main_caption(argv: list[str] | None = None) -> int:
    args = caption_parser().parse_args(argv)
    _check_caption_args(args)
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    generator = None
    if args.seed is not None:
        generator = make_generator(device, args.seed)

    results: dict[int, dict] = {}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([x for _, x in pending]).to(device, non_blocking=True)  # (B, 3, S, S)
        try:
            captions = generate_captions(
                ckpt.model, ckpt.tokenizer, batch, decoding=args.decoding, num_beams=args.num_beams,
                max_length=args.max_length, min_length=args.min_length, top_p=args.top_p,
                temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                length_norm=args.length_norm, prompt=args.prompt, generator=generator)
        except ValueError as e:  # decoding options that do not fit this checkpoint (e.g. the prompt's length)
            raise UserError(f"decoding options: {e} (--max-length and --min-length count the --prompt tokens)") \
                from None
        for (i, _), text in zip(pending, captions):
            results[i] = {"image": args.images[i], "caption": text}
        pending.clear()

    for i, path in enumerate(args.images):
        try:
            pending.append((i, load_image(path, transform, args.max_pixels)))
        except UserError as e:
            results[i] = {"image": path, "error": str(e)}
        if len(pending) >= args.batch_size:
            flush()
    flush()

    failed = 0
    for i in range(len(args.images)):
        r = results[i]
        if "error" in r:
            failed += 1
            _error("caption", r["error"])
            if args.json:
                print(json.dumps(r), flush=True)
        elif args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['image']}\t{r['caption']}", flush=True)
    return 2 if failed else 0


# --------------------------------------------------------------------------------------------------
# blip itm
# --------------------------------------------------------------------------------------------------


def itm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip itm",
                                description="ITM match probability and ITC cosine of texts against an image.")
    p.add_argument("--checkpoint", required=True, help="blip_core checkpoint directory")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--itm-first-token", choices=["enc", "cls"], default="enc",
                   help="enc: official training/evaluation; cls: official demo and transformers")
    p.add_argument("--max-length", type=int, default=35, help="text tokens (official retrieval: 35)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse an image with more pixels, before decoding (default {MAX_PIXELS})")
    one_line_errors(p)
    return p


def main_itm(argv: list[str] | None = None) -> int:
    args = itm_parser().parse_args(argv)
    empty = [i + 1 for i, t in enumerate(args.texts) if not t.strip()]
    if empty:
        raise UserError(f"TEXT {empty[0]} is empty: give each text to score as a non-empty argument")
    if args.max_length < 3:
        raise UserError("--max-length must be >= 3 (room for at least one word besides the special tokens)")
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    try:
        image = load_image(args.image, transform, args.max_pixels).to(device, non_blocking=True)
    except UserError as e:
        _error("itm", str(e))
        return 2
    prob, cosine = itm_scores(ckpt.model, ckpt.tokenizer, image, args.texts,
                              itm_first_token=args.itm_first_token, max_length=args.max_length)
    for text, p, c in zip(args.texts, prob.tolist(), cosine.tolist()):
        if args.json:
            print(json.dumps({"image": args.image, "text": text, "itm": p, "itc": c}))
        else:
            print(f"itm={p:.4f}\titc={c:.4f}\t{text}")
    return 0
