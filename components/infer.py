"""``blip caption`` and ``blip itm``: caption images and score image-text pairs with a blip_core checkpoint.

Examples::

    blip caption --checkpoint ckpt/caption photo1.jpg photo2.png --decoding beam --num-beams 3
    blip caption --checkpoint ckpt/caption *.jpg --decoding nucleus --seed 0 --json
    blip itm --checkpoint ckpt/filter photo.jpg "a dog on the grass" "a plate of food"

An image that cannot be read gets a one-line error and the others still run; the exit code is 1 when any
image failed. ``blip itm`` prints, per text, the ITM match probability (a caption confidence score) and the
ITC cosine similarity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from blip_core.checkpoint_io import Checkpoint, load_checkpoint
from blip_core.data.images import to_rgb
from blip_core.errors import UserError
from blip_core.generation import generate_captions, itm_scores

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _LocalEvalTransform:
    """``Resize((S, S), bicubic) -> ToTensor -> Normalize(CLIP mean/std)``."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, img: Image.Image, caption: str = "", rng=None) -> tuple[torch.Tensor, str]:
        img = img.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.image_size, self.image_size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
        mean = torch.tensor(_CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(_CLIP_STD).view(3, 1, 1)
        return (x - mean) / std, caption


def eval_transform(image_size: int):
    """The evaluation transform: the data package's when available, else an equivalent local one."""
    try:
        from blip_core.data.transforms import EvalTransform
    except ImportError:
        return _LocalEvalTransform(image_size)
    return EvalTransform(image_size)


def load_image(path: str | Path, transform) -> torch.Tensor:
    """Read an image file into a normalised ``(3, S, S)`` tensor; raises ``UserError`` with the reason."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(p) as img:
            img.load()
            return transform(to_rgb(img), "")[0]  # upright (EXIF orientation), 8-bit RGB
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    p.add_argument("--prompt", default="a picture of ")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None, help="seed for nucleus sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    return p


def main_caption(argv: list[str] | None = None) -> int:
    args = caption_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)

    results: dict[int, dict] = {}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([x for _, x in pending]).to(device)  # (B, 3, S, S)
        captions = generate_captions(
            ckpt.model, ckpt.tokenizer, batch, decoding=args.decoding, num_beams=args.num_beams,
            max_length=args.max_length, min_length=args.min_length, top_p=args.top_p,
            temperature=args.temperature, repetition_penalty=args.repetition_penalty, prompt=args.prompt,
            generator=generator)
        for (i, _), text in zip(pending, captions):
            results[i] = {"image": args.images[i], "caption": text}
        pending.clear()

    for i, path in enumerate(args.images):
        try:
            pending.append((i, load_image(path, transform)))
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
    return 1 if failed else 0


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
    return p


def main_itm(argv: list[str] | None = None) -> int:
    args = itm_parser().parse_args(argv)
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    try:
        image = load_image(args.image, transform).to(device)
    except UserError as e:
        _error("itm", str(e))
        return 1
    prob, cosine = itm_scores(ckpt.model, ckpt.tokenizer, image, args.texts,
                              itm_first_token=args.itm_first_token, max_length=args.max_length)
    for text, p, c in zip(args.texts, prob.tolist(), cosine.tolist()):
        if args.json:
            print(json.dumps({"image": args.image, "text": text, "itm": p, "itc": c}))
        else:
            print(f"itm={p:.4f}\titc={c:.4f}\t{text}")
    return 0
