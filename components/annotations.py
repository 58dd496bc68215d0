"""BLIP's official annotation files as an ingest source (``blip ingest --source FILE.json``).

A ``.json`` source is one JSON list in one of the formats of the official BLIP code:

- **caption lists**: entries ``{"image": path, "caption": str | [str, ...]}``, optionally ``"image_id"``.
  This covers the pre-training lists (``coco_karpathy_train.json``, ``vg_caption.json``, ``cc3m.json``,
  ...), the COCO and Flickr30K Karpathy train files (one entry per caption, with ``image_id``) and their val
  and test files (one entry per image with every caption in a list). Entries naming the same image are
  grouped into one sample whose ``json["captions"]`` holds all its captions (first-seen order): the layout of
  the toy-web human and test splits, so training expands them into one pair per caption and evaluation
  scores retrieval and captioning against all references, as the official code does.
- **VQA**: entries ``{"question_id", "image", "question", "answer": [str, ...] | str}`` plus an optional
  ``"dataset"`` (``"vqa"`` or ``"vg"``) and ``"kind"`` (or the VQAv2 ``"answer_type"``); ``answer`` is absent
  in test files. Entries naming the same image are grouped into one VQA sample (no caption) whose
  ``json["questions"]`` lists them in file order as ``{"question_id", "question", "answers", "kind"?,
  "dataset"?}``: every annotator answer as given (the loader weighs each unique VQAv2 answer by
  count / number of answers, and Visual Genome answers, ``dataset: "vg"``, by 0.2 each, as the official
  training code). The data set also gets ``answer_list.json`` (:mod:`blip_core.data.webdataset_io`).

The format is read from the first entry (``question`` present: VQA) and every entry is validated before
anything is written: malformed JSON, a top level that is not a list of objects, a missing key or a value of
the wrong type is a one-line :class:`UserError` naming the entry index. Image paths are relative to the
image root (``ingest.image_root`` / ``--image-root``, else the annotation file's directory; local or
``s3://``). A path that leaves the root (``..``, an absolute path elsewhere, a symlink pointing out) is
rejected as ``outside_root`` unless ``ingest.allow_paths_outside`` (the rule of JSONL/CSV manifests); an
image that cannot be read is rejected as ``missing_image``. Rejections are per sample and counted, never
fatal.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_core.config import IngestConfig
from blip_core.data.checks import Rejected
from blip_core.errors import UserError
from blip_core.redact import redact
from components import storage
from components.sources import FetchingSource, RawSample, file_listing

log = logging.getLogger(__name__)

_CAPTION_KEYS = ("image", "caption", "image_id")
_VQA_KEYS = ("question_id", "image", "question", "answer", "dataset", "kind", "answer_type")


@dataclass
class _Item:
    """One output sample: where its image is and what its json will hold."""

    index: int  # index of its first entry in the JSON list
    key: str
    ref: str  # image path as written in the file
    captions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _load_entries(uri: str) -> list[dict]:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise UserError(f"source not found: {redact(uri)}") from None
    except IsADirectoryError:
        raise UserError(f"{redact(uri)}: is a directory, not an annotation file") from None
    try:
        entries = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{redact(uri)}: not valid JSON ({e})") from None
    if isinstance(entries, dict) and "images" in entries:
        raise UserError(f"{redact(uri)}: an object with 'images' (Karpathy's dataset_*.json?); expected BLIP's "
                        "annotation list [{\"image\": ..., \"caption\": ...}, ...] (coco_karpathy_*.json)")
    if not isinstance(entries, list):
        raise UserError(f"{redact(uri)}: the top level must be a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise UserError(f"{redact(uri)}: the annotation list is empty")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{redact(uri)}: entry {i}: not a JSON object ({type(e).__name__})")
    return entries


def _strip_ext(ref: str) -> str:
    stem, dot, ext = ref.rpartition(".")
    return stem if dot and "/" not in ext else ref


class AnnotationSource(FetchingSource):
    """A BLIP annotation file (caption list or VQA list), see the module docstring."""

    name = "annotations"

    def __init__(self, uri: str, cfg: IngestConfig) -> None:
        self.uri = uri
        self.threads = max(1, cfg.fetch_threads)
        self.allow_outside = cfg.allow_paths_outside
        self.where = redact(uri)
        root = cfg.image_root or (uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent))
        if storage.is_s3(root):
            storage.split_s3(root)  # a malformed bucket name is a one-line error
            self.root = root.rstrip("/")
        else:
            if not Path(root).is_dir():
                raise UserError(f"image root not found or not a directory: {root} (ingest.image_root)")
            self.root = str(Path(root).resolve())
        entries = _load_entries(uri)
        self.kind = "vqa" if "question" in entries[0] else "captions"
        self.items = self._vqa(entries) if self.kind == "vqa" else self._captions(entries)
        self.entries = self.items
        self.total = len(self.items)
        log.info("%s: %d %s entries -> %d samples", self.where, len(entries), self.kind, len(self.items))

    @classmethod
    def matches(cls, uri: str) -> bool:
        return uri.endswith(".json")

    @classmethod
    def open(cls, uri: str, cfg: IngestConfig) -> AnnotationSource:
        return cls(uri, cfg)

    @classmethod
    def listing(cls, uri: str, image_root: str = "") -> list[tuple[str, int, str]]:
        """The files under the annotation file's directory, and under ``image_root`` when one is given."""
        listing = file_listing(uri)
        return [*listing, *storage.list_versions(image_root)] if image_root else listing

    # ---------------------------------------------------------------------------------------------- parsing

    def _fail(self, i: int, what: str) -> UserError:
        return UserError(f"{self.where}: entry {i}: {what}")

    def _image(self, i: int, e: dict, fmt: str) -> str:
        ref = e.get("image")
        if "image" not in e:
            raise self._fail(i, f"missing key 'image' ({fmt} entries need {self._needs(fmt)})")
        if not isinstance(ref, str) or not ref.strip():
            raise self._fail(i, f"'image' must be a non-empty string path, got {json.dumps(ref)[:60]}")
        return ref

    @staticmethod
    def _needs(fmt: str) -> str:
        return "image and caption" if fmt == "caption" else "question_id, image and question"

    def _captions(self, entries: list[dict]) -> list[_Item]:
        items: dict[str, _Item] = {}
        for i, e in enumerate(entries):
            ref = self._image(i, e, "caption")
            if "caption" not in e:
                raise self._fail(i, "missing key 'caption' (caption entries need image and caption)")
            cap = e["caption"]
            caps = [cap] if isinstance(cap, str) else cap
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise self._fail(i, "'caption' must be a string or a list of strings")
            image_id = e.get("image_id")
            if image_id is not None and not isinstance(image_id, (str, int)):
                raise self._fail(i, "'image_id' must be a string or an integer")
            item = items.get(ref)
            if item is None:
                extra = {k: v for k, v in e.items() if k not in _CAPTION_KEYS}
                meta = {**extra, "image_path": ref}
                if image_id is not None:
                    meta["image_id"] = str(image_id)
                item = items[ref] = _Item(i, _strip_ext(ref), ref, meta=meta)
            item.captions += caps
        return list(items.values())

    def _vqa(self, entries: list[dict]) -> list[_Item]:
        items: dict[str, _Item] = {}
        seen: dict[str, int] = {}  # question id -> entry index
        for i, e in enumerate(entries):
            for k in ("question_id", "question"):
                if k not in e:
                    raise self._fail(i, f"missing key '{k}' (VQA entries need question_id, image and question)")
            ref = self._image(i, e, "VQA")
            qid, question = e["question_id"], e["question"]
            if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                raise self._fail(i, "'question_id' must be a string or an integer")
            if not isinstance(question, str):
                raise self._fail(i, "'question' must be a string")
            dataset = e.get("dataset")
            if dataset is not None and not isinstance(dataset, str):
                raise self._fail(i, "'dataset' must be a string")
            answer = e.get("answer", [])
            answers = [answer] if isinstance(answer, str) else answer
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise self._fail(i, "'answer' must be a string or a list of strings")
            kind = e.get("kind", e.get("answer_type"))
            if kind is not None and not isinstance(kind, str):
                raise self._fail(i, "'kind' must be a string")
            if str(qid) in seen:
                raise self._fail(i, f"question_id {qid} repeats entry {seen[str(qid)]}")
            seen[str(qid)] = i
            extra = {k: v for k, v in e.items() if k not in _VQA_KEYS}
            q = {**extra, "question_id": str(qid), "question": question, "answers": list(answers)}
            if kind is not None:
                q["kind"] = kind
            if dataset is not None:
                q["dataset"] = dataset
            item = items.get(ref)
            if item is None:
                item = items[ref] = _Item(i, _strip_ext(ref), ref, meta={"image_path": ref, "image_id": ref,
                                                                         "questions": []})
            item.meta["questions"].append(q)
        return list(items.values())

    # ---------------------------------------------------------------------------------------------- images

    def location(self, ref: str) -> str:
        """Where the image ``ref`` is read from; raises ``Rejected("outside_root")`` when it leaves the root."""
        if ref.startswith(("http://", "https://")):
            raise Rejected("missing_image", f"{redact(ref)}: annotation files are read with local or s3:// "
                           "images; download the images and pass --image-root")
        if storage.is_s3(self.root) or storage.is_s3(ref):
            if storage.is_s3(ref) or ref.startswith("/"):  # a local absolute path is never under an s3 root
                loc = ref
            else:
                loc = self.root + "/" + ref
            inside = False
            if storage.is_s3(loc):
                bucket, key = storage.split_s3(loc)
                loc = f"s3://{bucket}/{posixpath.normpath('/' + key).lstrip('/')}"
                if storage.is_s3(self.root):
                    root_bucket, root_key = storage.split_s3(self.root)
                    root_key = root_key.strip("/")
                    inside = loc.startswith(f"s3://{root_bucket}/" + (f"{root_key}/" if root_key else ""))
        else:
            loc = str(Path(self.root) / ref)
            inside = Path(loc).resolve().is_relative_to(self.root)
        if not inside and not self.allow_outside:
            raise Rejected("outside_root", f"{ref}: outside the image root {redact(self.root)} "
                           "(ingest.allow_paths_outside)")
        return loc

    def fetch(self, ref: str) -> tuple[bytes | None, Rejected | None]:
        try:
            loc = self.location(ref)
            return storage.read_bytes(loc), None
        except Rejected as r:
            return None, r
        except (OSError, ValueError, storage.StorageError) as e:
            reason = "not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            return None, Rejected("missing_image", f"{redact(ref)}: {reason}")

    def prepare(self, entry: _Item) -> tuple[RawSample, str | None]:
        if self.kind == "vqa":
            meta, txt = dict(entry.meta), None
        else:
            meta, txt = {**entry.meta, "captions": entry.captions[1:]}, entry.captions[0]
        return RawSample(entry.key, f"entry {entry.index}", None, txt, meta, default_image_id=entry.ref), entry.ref
