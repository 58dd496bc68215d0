"""The pipeline's ingest steps (one split, or one part of a parallel ingest and the merge of the parts).

Each ingested split is written to a content-addressed location under ``output_root``: the same source content
(listing with ETags / sizes and mtimes) and ingest settings give the same location, where a complete dataset is
reused. See :mod:`pipelines.steps` for the locations and the error reporting shared by every step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from blip_core.errors import UserError
from pipelines import steps


def _complete_dataset(uri: str):
    """The manifest of a complete, intact dataset directory at ``uri`` (every shard as listed), or None."""
    from blip_core.data.webdataset_io import check_shards, read_manifest

    try:
        m = read_manifest(uri)
    except UserError:
        return None
    return None if check_shards(uri, m) else m


def ingest(split: str, source: str, output_root: str, s3_endpoint: str, params_file: str,
           overrides: Sequence[str], dataset, report) -> None:
    """Ingest ``source`` (default: the config's ``sources.<split>``) into a content-addressed location."""
    from components import ingest as stage

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    cfg = steps.load_cfg(params_file, overrides)
    source = source or getattr(cfg.sources, split)
    if not source and split == "calibration":  # optional: without it CapFilt uses capfilt.threshold
        steps.output_location(dataset, "", "calibration")
        dataset.metadata.update({"split": split, "empty": True})
        Path(report.path).write_text("# Ingest calibration\n\nNo calibration source (pipeline parameter "
                                     "`calibration_source` or `sources.calibration`): CapFilt filters with "
                                     f"`capfilt.threshold` = {cfg.capfilt.threshold}.\n")
        print("ingest calibration: no source; CapFilt uses capfilt.threshold")
        return
    _make_dataset(cfg, split, source, output_root, dataset, report,
                  lambda out: stage.run(cfg, source, out, progress=False).manifest)


def _dataset_name(cfg, split: str, source: str, output_root: str) -> tuple[str, str]:
    """``(root, name)`` of the content-addressed location of an ingested split (root '' without output_root).

    Same source content (listing with ETags / sizes and mtimes) and ingest settings -> same location, where a
    complete dataset is reused; new data under an unchanged URI gets a new location.
    """
    from blip_core.config import to_dict
    from components import ingest as stage

    fingerprint = stage.source_fingerprint(source, cfg.ingest.image_root)
    key = hashlib.sha256(json.dumps([source, to_dict(cfg.ingest), fingerprint], sort_keys=True).encode()).hexdigest()[:12]
    return (f"{output_root.rstrip('/')}/datasets" if output_root else ""), f"{split}-{key}"


def _ingest_outputs(split: str, source: str, out: str, m, dataset, report) -> None:
    """The dataset artifact's metadata and the Markdown report of an ingested split."""
    from components import ingest as stage

    dataset.metadata.update({"split": split, "source": stage.redact(source), "samples": m.samples_out,
                             "captions": m.captions_out, "shards": len(m.shards), "rejected": dict(m.rejected)})
    rejected = "".join(f"| {k} | {v} |\n" for k, v in sorted(m.rejected.items())) or "| (none) | 0 |\n"
    Path(report.path).write_text(
        f"# Ingest {split}\n\nSource `{stage.redact(source)}` -> `{out}`\n\n"
        f"| in | out | captions | shards |\n|---|---|---|---|\n"
        f"| {m.samples_in} | {m.samples_out} | {m.captions_out} | {len(m.shards)} |\n\n"
        f"| rejected because | samples |\n|---|---|\n{rejected}")
    print(stage.summary(m, out, f"ingest {split}"))


def ingest_plan(parts: int) -> list[int]:
    """The part indices ``0..parts-1`` of a parallel ingest (the items of the pipeline's ParallelFor)."""
    from components.ingest_parts import MAX_PARTS

    if not 1 <= int(parts) <= MAX_PARTS:
        raise UserError(f"ingest_parts must be in 1..{MAX_PARTS}, got {parts}")
    return list(range(int(parts)))


def ingest_part(split: str, source: str, part: int, parts: int, output_root: str, s3_endpoint: str,
                params_file: str, overrides: Sequence[str], dataset) -> None:
    """Ingest part ``part`` of ``parts`` of a split (one pod of a parallel ingest; :func:`ingest_merge` joins them).

    Nothing is done when the merged dataset of the same source content and settings is already complete, and a
    complete part from an earlier attempt is reused.
    """
    from components import ingest as stage

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    cfg = steps.load_cfg(params_file, overrides)
    source = source or getattr(cfg.sources, split)
    part, parts = int(part), int(parts)
    root, name = _dataset_name(cfg, split, source, output_root)
    out = steps.output_location(dataset, root, f"{name}-part-{part:04d}-of-{parts:04d}")
    dataset.metadata.update({"split": split, "part": part, "parts": parts})
    if root and _complete_dataset(f"{root}/{name}") is not None:
        print(f"ingest {split} part {part}/{parts}: {root}/{name} is already complete")
        return
    m = _complete_dataset(out) if root else None
    if m is not None:
        print(f"ingest {split} part {part}/{parts}: reusing {out}")
    else:
        m = stage.run(cfg, source, out, progress=False, part=(part, parts)).manifest
    print(f"ingest {split} part {part}/{parts}: {m.samples_in} in, {m.samples_out} out at {out}")


def ingest_merge(split: str, source: str, parts: Sequence, output_root: str, s3_endpoint: str, params_file: str,
                 overrides: Sequence[str], dataset, report) -> None:
    """Join the parts of a parallel ingest into the split's dataset (reused when already complete)."""
    from components import ingest_parts

    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    cfg = steps.load_cfg(params_file, overrides)
    source = source or getattr(cfg.sources, split)
    _make_dataset(cfg, split, source, output_root, dataset, report,
                  lambda out: ingest_parts.merge([steps.input_location(p) for p in parts], out).manifest)


def _make_dataset(cfg, split: str, source: str, output_root: str, dataset, report, make) -> None:
    """The split's dataset at its content-addressed location: reused when complete, else ``make(out)`` writes it
    and returns its manifest."""
    root, name = _dataset_name(cfg, split, source, output_root)
    out = steps.output_location(dataset, root, name)
    m = _complete_dataset(out) if root else None
    if m is not None:
        print(f"ingest {split}: reusing {out} (same source content and settings)")
    else:
        m = make(out)
    _ingest_outputs(split, source, out, m, dataset, report)
