"""Per-sample checks and cleaning shared by every stage that writes a data set (pure: no I/O).

An image is rejected, with a reason, when it is absent (``missing_image``), empty (``zero_byte``), not a
decodable image (``corrupt_image``), cut short (``truncated_image``), smaller than ``min_size`` on a side
(``too_small``) or larger than ``max_pixels`` in area (``too_large``: checked from the header, before
decoding, so a decompression bomb never gets decoded). Captions are rejected when they are not valid
UTF-8 (``invalid_utf8``) or nothing is left after :func:`~blip_core.tokenizer.pre_caption`
(``empty_caption``). A VQA sample (``json["questions"]``, no captions) is cleaned by :func:`clean_questions`
instead: a question left empty by :func:`~blip_core.tokenizer.pre_question` is dropped with the reason
``empty_question`` (and a sample left with none is rejected for it). Accepted images are turned upright and converted to RGB
(:func:`~blip_core.data.images.to_rgb`), downscaled so the short side is at most
``resolution`` and stored as JPEG (or PNG); a JPEG that needs no change is stored byte for byte.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from blip_core.constants import CAPTION_MAX_WORDS, QUESTION_MAX_WORDS
from blip_core.data.images import exif_orientation, swaps_sides, to_rgb
from blip_core.tokenizer import pre_caption, pre_question

REJECT_REASONS = (
    "missing_image", "zero_byte", "corrupt_image", "truncated_image", "too_small", "too_large",
    "invalid_utf8", "empty_caption", "empty_question", "bad_metadata", "duplicate", "unreadable_shard",
    "outside_root", "blocked_url",  # an image path outside the manifest's directory / the image root, a private URL
)


class Rejected(Exception):
    """A sample failed a check; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageRules:
    """Image checks and the stored form of accepted images."""

    resolution: int = 64  # short side downscaled to this (never upscaled); 0 = keep the size
    min_size: int = 16  # reject images with a side shorter than this
    max_pixels: int = 64_000_000  # reject images with more pixels than this (decompression bombs)
    image_format: str = "jpg"  # "jpg" or "png"
    jpeg_quality: int = 95


@dataclass(frozen=True)
class CheckedImage:
    """An accepted image: encoded bytes, their extension (``jpg``/``png``) and the stored size."""

    data: bytes
    ext: str
    width: int
    height: int


def check_image(data: bytes | None, rules: ImageRules) -> CheckedImage:
    """Decode, check and re-encode one image; raises :class:`Rejected` with the reason."""
    if data is None:
        raise Rejected("missing_image", "no image in sample")
    if len(data) == 0:
        raise Rejected("zero_byte", "image file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Rejected("too_large", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Rejected("corrupt_image", str(e) or type(e).__name__) from None
        w, h = im.size
        if w * h > rules.max_pixels:
            raise Rejected("too_large", f"{w}x{h} > {rules.max_pixels} pixels")
        if min(w, h) < rules.min_size:
            raise Rejected("too_small", f"{w}x{h} < {rules.min_size} px")
        scale = rules.resolution / min(w, h) if rules.resolution else 1.0
        target = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1.0 else (w, h)
        source_format = im.format
        try:
            if source_format == "JPEG" and target != (w, h):
                im.draft("RGB", target)  # decode at a reduced DCT scale: much faster for large JPEGs
            im.load()
        except OSError as e:
            msg = str(e)
            reason = "truncated_image" if "truncat" in msg.lower() else "corrupt_image"
            raise Rejected(reason, msg) from None
        except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise Rejected("corrupt_image", str(e) or type(e).__name__) from None
    want_ext = "png" if rules.image_format == "png" else "jpg"
    orientation = exif_orientation(im)
    if source_format == "JPEG" and want_ext == "jpg" and im.mode == "RGB" and target == (w, h) and orientation == 1:
        return CheckedImage(data, "jpg", w, h)
    rgb = to_rgb(im)  # upright (EXIF orientation applied), 8-bit RGB, transparency on white
    if swaps_sides(orientation):
        target = target[::-1]
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    if want_ext == "png":
        rgb.save(buf, format="PNG", optimize=False)
    else:
        rgb.save(buf, format="JPEG", quality=rules.jpeg_quality)
    return CheckedImage(buf.getvalue(), want_ext, rgb.width, rgb.height)


def decode_text(raw: bytes | str | None) -> str | None:
    """Decode a caption as strict UTF-8; strings read with ``surrogateescape`` are checked the same way."""
    if raw is None:
        return None
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("invalid_utf8", f"caption is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("invalid_utf8", "caption is not UTF-8") from None
    return raw


def clean_captions(primary: bytes | str | None, others: Iterable[object] = (), max_words: int = CAPTION_MAX_WORDS) -> list[str]:
    """Cleaned, de-duplicated captions with the primary first; raises :class:`Rejected` if none is left.

    ``others`` are further captions of the same image (e.g. ``json["captions"]``); non-strings are
    ignored. The primary caption being invalid UTF-8 rejects the sample; if it is empty after cleaning,
    the next non-empty caption becomes the primary.
    """
    texts: list[str] = []
    first = decode_text(primary)
    if first is not None:
        texts.append(first)
    for c in others:
        if isinstance(c, str):
            texts.append(decode_text(c) or "")
    out: list[str] = []
    for t in texts:
        cleaned = pre_caption(t, max_words)
        if cleaned and cleaned not in out:
            out.append(cleaned)
    if not out:
        raise Rejected("empty_caption", "no caption left after cleaning" if texts else "no caption")
    return out


def clean_answer(answer: str) -> str:
    """An annotator answer as stored: lower case, whitespace collapsed (VQA normalisation is the metric's)."""
    return " ".join(answer.lower().split())


def clean_questions(questions: object, max_words: int = QUESTION_MAX_WORDS) -> tuple[list[dict], list[dict]]:
    """Check and clean the questions of a VQA sample; returns ``(kept, dropped)``.

    ``questions`` must be a list of objects with ``question_id`` (string or integer, stored as a string),
    ``question`` (a string) and optionally ``answers`` (a list of strings; absent in a test split) and ``kind``
    (a string); other keys are kept. Anything else rejects the sample as ``bad_metadata``. Each kept question
    is cleaned with :func:`~blip_core.tokenizer.pre_question` and its answers with :func:`clean_answer`
    (empty answers left out). A question left empty (or with punctuation only), or repeating an earlier question id, is dropped and
    listed in ``dropped`` as ``{"question_id", "reason", "detail"}`` (reasons ``empty_question`` and
    ``duplicate``); if no question is left the sample is rejected as ``empty_question``.
    """
    if not isinstance(questions, list):
        raise Rejected("bad_metadata", "json questions is not a list")
    kept: list[dict] = []
    dropped: list[dict] = []
    ids: set[str] = set()
    for j, q in enumerate(questions):
        if not isinstance(q, dict):
            raise Rejected("bad_metadata", f"question {j} is not an object")
        qid, text, answers = q.get("question_id"), q.get("question"), q.get("answers", [])
        if isinstance(qid, bool) or not isinstance(qid, str | int) or str(qid) == "":
            raise Rejected("bad_metadata", f"question {j}: question_id must be a non-empty string or integer")
        if not isinstance(text, str):
            raise Rejected("bad_metadata", f"question {j}: question must be a string")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise Rejected("bad_metadata", f"question {j}: answers must be a list of strings")
        if "kind" in q and not isinstance(q["kind"], str):
            raise Rejected("bad_metadata", f"question {j}: kind must be a string")
        qid = str(qid)
        cleaned = pre_question(decode_text(text) or "", max_words)
        if qid in ids:
            dropped.append({"question_id": qid, "reason": "duplicate", "detail": "question id repeated"})
            continue
        ids.add(qid)
        if not any(ch.isalnum() for ch in cleaned):  # nothing, or only punctuation ("?") left
            dropped.append({"question_id": qid, "reason": "empty_question",
                            "detail": "no question left after cleaning"})
            continue
        clean = [c for c in (clean_answer(decode_text(a) or "") for a in answers) if c]
        kept.append({**q, "question_id": qid, "question": cleaned, "answers": clean})
    if not kept:
        raise Rejected("empty_question", "no question left after cleaning" if questions else "no question")
    return kept, dropped
