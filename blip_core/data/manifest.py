"""Dataset-directory manifests: names, :class:`ShardInfo`, :class:`Manifest` and reading ``manifest.json``.

The contract these implement is described in :mod:`blip_core.data.webdataset_io`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blip_core.errors import UserError
from blip_core.io import Opener, join_uri, opener_or_default

DATASET_FORMAT = "blip-capfilt/webdataset-v1"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
ANSWER_LIST_NAME = "answer_list.json"
ANSWER_COUNTS_NAME = "answer_counts.json"  # an ingest part's answer counts, summed by the merge
SHARD_PREFIX = "shard-"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_name(index: int, prefix: str = SHARD_PREFIX) -> str:
    """File name of shard ``index``: ``shard-000000.tar`` (``prefix`` replaces ``shard-``)."""
    return f"{prefix}{index:06d}.tar"


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """One shard of a dataset directory."""

    path: str  # relative to the dataset directory
    samples: int
    captions: int
    bytes: int | None = None  # None in manifests written without it: size not checked
    sha256: str | None = None  # None in manifests written without it: content not checked
    questions: int | None = None  # VQA questions in the shard (None: a caption data set)


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring)."""

    source: str
    samples_in: int
    samples_out: int
    captions_out: int
    rejected: dict[str, int]
    shards: list[ShardInfo]
    config: dict[str, Any] = field(default_factory=dict)
    format: str = DATASET_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific top-level keys (e.g. filter stats)

    def to_json(self) -> str:
        d = asdict(self)
        extra = d.pop("extra")
        for shard in d["shards"]:
            if shard["questions"] is None:  # caption data sets keep the manifest they always had
                del shard["questions"]
        d["rejected"] = dict(sorted(self.rejected.items()))
        return json.dumps({**extra, **d}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(text)
            shards = [ShardInfo(**s) for s in d.pop("shards")]
            known = {f for f in cls.__dataclass_fields__ if f not in ("shards", "extra")}
            extra = {k: d.pop(k) for k in list(d) if k not in known}
            return cls(shards=shards, extra=extra, **d)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{where}: not a valid dataset manifest ({e})") from None

    def check_counts(self) -> None:
        """Raise if a sample went missing: ``samples_in == samples_out + sum(rejected)`` and shard sums."""
        if self.samples_in != self.samples_out + sum(self.rejected.values()):
            raise AssertionError(f"samples_in {self.samples_in} != samples_out {self.samples_out} + "
                                 f"rejected {sum(self.rejected.values())}")
        if sum(s.samples for s in self.shards) != self.samples_out:
            raise AssertionError("shard sample counts do not add up to samples_out")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def answer_list(counts: Counter[str]) -> list[str]:
    """Distinct answers, most frequent first (ties in alphabetical order): ``answer_list.json``."""
    return sorted(counts, key=lambda a: (-counts[a], a))



def read_manifest(dataset_uri: str, opener: Opener | None = None) -> Manifest:
    """Read ``manifest.json`` of a dataset directory; a missing one is a :class:`UserError`."""
    uri = join_uri(dataset_uri, MANIFEST_NAME)
    try:
        text = opener_or_default(opener).read_bytes(uri)
    except FileNotFoundError:
        raise UserError(f"{dataset_uri}: no {MANIFEST_NAME}: not a complete dataset directory "
                        "(missing, or the stage that writes it did not finish)") from None
    except OSError as e:
        raise UserError(f"{dataset_uri}: cannot read {MANIFEST_NAME}: {e}") from None
    return Manifest.from_json(text, uri)
