"""``blip caption``, ``blip itm`` and ``blip vqa``: caption images, score image-text pairs and answer questions
with a blip_core checkpoint.

Examples::

    blip caption --checkpoint ckpt/caption photo1.jpg photo2.png --decoding beam --num-beams 3
    blip caption --checkpoint ckpt/caption *.jpg --decoding nucleus --seed 0 --json
    blip itm --checkpoint ckpt/filter photo.jpg "a dog on the grass" "a plate of food"
    blip vqa --checkpoint ckpt/vqa photo1.jpg photo2.jpg --question "what is the dog doing?"
    blip vqa --checkpoint ckpt/vqa photo.jpg --question "what colour is the car?" --answers answer_list.json --json

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

from blip_core.checkpoint_io import Checkpoint, load_model_dir
from blip_core.constants import DEFAULT_PROMPT, QUESTION_MAX_TOKENS
from blip_core.data.transforms import EvalTransform
from blip_core.errors import UserError
from blip_core.generation import LENGTH_NORMS, generate_captions, itm_scores
from blip_core.images import MAX_PIXELS, ImageTooLarge, open_rgb
from blip_core.models.vqa import is_vqa
from blip_core.seeding import make_generator
from blip_core.tokenizer import pre_question
from blip_core.vqa import generate_answers, rank_answers
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


def _check_decoding_args(args, min_max_length: int = 1) -> None:
    """Refuse batch and length options that cannot decode, before the model is loaded."""
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.num_beams < 1:
        raise UserError("--num-beams must be >= 1")
    if args.max_length < min_max_length:
        raise UserError(f"--max-length must be >= {min_max_length}"
                        + (" (the [DEC] start token and at least one answer token)" if min_max_length > 1 else ""))
    if not 0 <= args.min_length <= args.max_length:
        raise UserError(f"--min-length must be between 0 and --max-length ({args.max_length}), "
                        f"got {args.min_length}")
    if args.max_pixels < 1:
        raise UserError("--max-pixels must be >= 1")


def _check_caption_args(args) -> None:
    """Refuse option values that cannot decode, before the model is loaded."""
    _check_decoding_args(args)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")


def _open(checkpoint: str, device: torch.device, *, vqa: bool = False) -> Checkpoint:
    ckpt = load_model_dir(checkpoint, with_momentum=False)
    if vqa and not is_vqa(ckpt.model):
        raise UserError(f"{checkpoint} has no VQA decoder: it is a BLIP captioning/retrieval checkpoint (answer "
                        "questions with a VQA checkpoint, e.g. one converted from model_vqa.pth)")
    if not vqa and is_vqa(ckpt.model):
        raise UserError(f"{checkpoint} is a VQA model: use 'blip vqa'")
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
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=None, help="seed for nucleus sampling")
    _add_batch_args(p)
    return p


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run over images in batches, and one-line usage errors."""
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images with more pixels, before decoding (default {MAX_PIXELS})")
    one_line_errors(p)


def main_caption(argv: list[str] | None = None) -> int:
    args = caption_parser().parse_args(argv)
    _check_caption_args(args)
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    generator = None
    if args.seed is not None:
        generator = make_generator(device, args.seed)

    def run_batch(batch: torch.Tensor) -> list[dict]:
        try:
            captions = generate_captions(
                ckpt.model, ckpt.tokenizer, batch, decoding=args.decoding, num_beams=args.num_beams,
                max_length=args.max_length, min_length=args.min_length, top_p=args.top_p,
                temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                length_norm=args.length_norm, prompt=args.prompt, generator=generator)
        except ValueError as e:  # decoding options that do not fit this checkpoint (e.g. the prompt's length)
            raise UserError(f"decoding options: {e} (--max-length and --min-length count the --prompt tokens)") \
                from None
        return [{"caption": text} for text in captions]

    return _per_image("caption", args, transform, device, run_batch, {},
                      lambda r: f"{r['image']}\t{r['caption']}")


def _per_image(command: str, args, transform, device: torch.device, run_batch, extra: dict, line) -> int:
    """Run ``run_batch`` (a ``(B, 3, S, S)`` batch -> one result dict per image) over ``args.images`` in batches
    of ``args.batch_size``; print one line (``line(row)``) or JSON object per image in the given order.

    An image that cannot be read gets a one-line error and the others still run; the exit code is then 2.
    """
    results: dict[int, dict] = {}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([x for _, x in pending]).to(device, non_blocking=True)  # (B, 3, S, S)
        for (i, _), row in zip(pending, run_batch(batch)):
            results[i] = {"image": args.images[i], **extra, **row}
        pending.clear()

    for i, path in enumerate(args.images):
        try:
            pending.append((i, load_image(path, transform, args.max_pixels)))
        except UserError as e:
            results[i] = {"image": path, **extra, "error": str(e)}
        if len(pending) >= args.batch_size:
            flush()
    flush()

    failed = 0
    for i in range(len(args.images)):
        r = results[i]
        if "error" in r:
            failed += 1
            _error(command, r["error"])
        if args.json:
            print(json.dumps(r), flush=True)
        elif "error" not in r:
            print(line(r), flush=True)
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


# --------------------------------------------------------------------------------------------------
# blip vqa
# --------------------------------------------------------------------------------------------------

MAX_ANSWER_FILE_BYTES = 16 * 2**20


def vqa_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip vqa", description="Answer a question about images with a blip_core "
                                "VQA checkpoint: generated (default) or picked from an answer list (--answers).")
    p.add_argument("--checkpoint", required=True, help="blip_core VQA checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--question", required=True, help="the question asked about every image")
    p.add_argument("--decoding", choices=["greedy", "beam"], default="beam")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=10, help="total tokens including the [DEC] start token")
    p.add_argument("--min-length", type=int, default=1, help="total tokens including the [DEC] start token")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="candidate answers, one per line or a JSON list: pick the best of them (the official "
                        "'rank' inference) instead of generating")
    p.add_argument("--k", type=int, default=128,
                   help="with --answers: candidates re-scored after the first-token filter (official k_test 128)")
    _add_batch_args(p)
    return p


def read_answer_list(path: str | Path) -> list[str]:
    """Candidate answers from a file: a JSON list of strings, or one answer per line (blank lines skipped).

    Duplicates are dropped (first kept); an empty list, a JSON value that is not a list of strings, or an
    unreadable file is a :class:`UserError`.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--answers {path}: no such file")
    if p.stat().st_size > MAX_ANSWER_FILE_BYTES:
        raise UserError(f"--answers {path}: larger than {MAX_ANSWER_FILE_BYTES // 2**20} MiB")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--answers {path}: cannot read ({type(e).__name__}: {e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--answers {path}: not valid JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
            raise UserError(f"--answers {path}: the JSON must be a list of strings")
    else:
        items = text.splitlines()
    answers = list(dict.fromkeys(a.strip() for a in items if a.strip()))
    if not answers:
        raise UserError(f"--answers {path}: no answers in the file")
    return answers


def _check_vqa_args(args) -> None:
    if not args.question.strip():
        raise UserError("--question is empty: give the question to ask about the images")
    _check_decoding_args(args, min_max_length=2)
    if args.k < 1:
        raise UserError("--k must be >= 1")


def main_vqa(argv: list[str] | None = None) -> int:
    args = vqa_parser().parse_args(argv)
    _check_vqa_args(args)
    answer_list = read_answer_list(args.answers) if args.answers else None
    device = _device(args.device)
    ckpt = _open(args.checkpoint, device, vqa=True)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    n_tokens = len(ckpt.tokenizer.hf(pre_question(args.question))["input_ids"])
    if n_tokens > QUESTION_MAX_TOKENS:
        print(f"blip vqa: note: the question has {n_tokens} tokens; the model reads its first "
              f"{QUESTION_MAX_TOKENS} (as the official VQA model)", file=sys.stderr)

    def run_batch(batch: torch.Tensor) -> list[dict]:
        questions = [args.question] * batch.shape[0]
        if answer_list is not None:
            ranked = rank_answers(ckpt.model, ckpt.tokenizer, batch, questions, answer_list, k=args.k)
            return [{"answer": a, "score": s} for a, s in ranked]
        answers = generate_answers(ckpt.model, ckpt.tokenizer, batch, questions, decoding=args.decoding,
                                   num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length)
        return [{"answer": a} for a in answers]

    def line(r: dict) -> str:
        return f"{r['image']}\t{r['answer']}" + (f"\t{r['score']:.4f}" if "score" in r else "")

    return _per_image("vqa", args, transform, device, run_batch, {"question": args.question}, line)
