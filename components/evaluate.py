"""Evaluate stage: retrieval and captioning on the clean test split, the filter on known noise, a comparison.

``blip evaluate --model NAME=URI [--model NAME=URI ...] --test URI --output URI [--capfilt URI]``

For every model (a checkpoint directory or a training stage output, local or s3) on the test split:

- retrieval: TR and IR R@1/5/10 (percent) with ITC top-``k_test`` candidates re-ranked by ITM
  (:mod:`blip_core.retrieval`); ``mean_r1 = (tr_r1 + ir_r1) / 2``;
- captioning: BLEU-4 and CIDEr (pycocoevalcap, x100 as the paper reports them) of beam-search captions
  (``evaluate.num_beams``/``max_length``/``min_length``/``prompt``), lowercased with punctuation removed;
- ``grammar_match``: the percentage of generated captions that name exactly the objects (shape, colour, size,
  count, left/right) of the drawn toy-web scene (only when the test samples carry ``json["scene"]``).

With ``--capfilt`` (a CapFilt output holding ``provenance.jsonl``, or the file itself):

- ``filter``: precision and recall of "dropped" against "noisy" over web captions, overall and per noise kind
  (for a kind, precision counts only clean captions and that kind, as if it were the only noise), and per
  ``noise_detail`` within a kind where the data records one (toy-web: which attribute a wrong caption changed);
- ``filter_itc``: the field's usual baseline next to it: a filter on the filter model's ITC cosine (the
  CLIP-style image-text cosine DataComp filters with), its threshold set so that it keeps as many web
  captions as the ITM filter kept; the same precision and recall, overall and per noise kind (needs the
  ``itc_cosine`` CapFilt records in its provenance);
- ``capfilt``: texts in and kept per source, the kept share, and distinct-1/2 of the synthetic captions.

The output directory holds ``metrics.json`` (numbers only: ``models.<name>.<metric>``, ``filter.*``,
``filter_itc.*``, ``capfilt.*``), ``report.md`` and ``report.html`` (the paper's Table 1 layout), and ``captions.json``
(each model's caption per test image). Every file is written atomically, ``metrics.json`` last. The MLflow
stage run ``evaluate`` gets every metric (``<name>/<metric>``, ``filter/...``, ``filter_itc/...``, ``capfilt/...``), the
comparison table ``comparison.json``, the report files and sample test images with each model's captions.
The pipeline's parent run gets the comparison too (``comparison.json``, ``report.html``, ``report.md`` and the
Table-1 metrics as ``<name>/<metric>``), so it shows the result of the whole run.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_core.checkpoint_io import load_model_dir
from blip_core.config import Config, EvalConfig, load_config, to_dict
from blip_core.constants import CLIP_MEAN, CLIP_STD
from blip_core.data.splits import EvalSplit, load_eval_split
from blip_core.errors import UserError
from blip_core.eval.captions import caption_scores, grammar_match
from blip_core.eval.filter import capfilt_metrics, filter_metrics, itc_filter_metrics
from blip_core.eval.retrieval import recall_at_k
from blip_core.generation import generate_captions
from blip_core.retrieval import retrieval_scores
from blip_core.train import distributed as dist
from components import storage, training, vqa_eval
from components.cli import run_as_process
from components.eval_report import (
    TABLE_COLUMNS,
    comparison_table,
    decoding_note,
    fmt_value,
    render_html,
    render_markdown,
    threshold_note,
)
from components.spec import Option, StageSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CAPTIONS_FILE = "captions.json"
PROVENANCE_FILE = "provenance.jsonl"

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class EvalResult:
    """What the evaluate stage produced: the content of ``metrics.json`` and the comparison rows."""

    output: str
    metrics: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)
    report: str = ""  # report.md
    run_id: str | None = None


# --------------------------------------------------------------------------------------------------
# CapFilt provenance
# --------------------------------------------------------------------------------------------------


def read_provenance(uri: str) -> list[dict]:
    """Records of a CapFilt ``provenance.jsonl`` (``uri`` is the CapFilt output or the file itself)."""
    path = uri if uri.endswith(".jsonl") else storage.join(uri, PROVENANCE_FILE)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise UserError(f"{path}: CapFilt provenance not found") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "source" not in rec or "kept" not in rec:
            raise UserError(f"{path} line {n}: a provenance record needs 'source' and 'kept'")
        records.append(rec)
    return records


def read_capfilt_summary(uri: str) -> dict:
    """A CapFilt output's ``summary.json`` (threshold and where it came from); {} when there is none."""
    if uri.endswith(".jsonl"):
        return {}
    path = storage.join(uri, "summary.json")
    return storage.read_json(path) if storage.exists(path) else {}







# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def retrieval_metrics(model, tokenizer, split: EvalSplit, ecfg: EvalConfig) -> dict[str, float]:
    """TR/IR recall@1/5/10, their means (``r_mean``: the official model-selection metric) and ``mean_r1``.

    ITC top-``ecfg.k_test`` candidates (all of them when there are fewer) re-ranked by ITM.
    """
    ids, mask = tokenizer(split.texts, max_length=ecfg.max_text_len)
    scores = retrieval_scores(model, split.images, ids, mask, enc_id=tokenizer.enc_id, k=ecfg.k_test,
                              batch_size=ecfg.batch_size, itm_batch_size=ecfg.itm_batch_size,
                              rank=dist.rank(), world_size=dist.world_size(),
                              reduce_fn=dist.all_reduce_sum if dist.world_size() > 1 else None,
                              partial_dir=ecfg.resume_dir or None, progress=True)
    return recall_at_k(scores.i2t, scores.t2i, split.img2txt, split.txt2img)


def split_captions(model, tokenizer, split: EvalSplit, ecfg: EvalConfig) -> list[str]:
    """One beam-search caption per image of the split, with the evaluation's decoding settings."""
    dev = next(model.parameters()).device
    captions: list[str] = []
    for s in range(0, split.images.shape[0], ecfg.batch_size):
        captions += generate_captions(model, tokenizer, split.images[s:s + ecfg.batch_size].to(dev, non_blocking=True),
                                      decoding="beam", num_beams=ecfg.num_beams, max_length=ecfg.max_length,
                                      min_length=ecfg.min_length, repetition_penalty=ecfg.repetition_penalty,
                                      length_norm=ecfg.length_norm, prompt=ecfg.prompt)
    return captions


def caption_metrics(model, tokenizer, split: EvalSplit, ecfg: EvalConfig) -> tuple[dict[str, float], list[str]]:
    """BLEU-4, CIDEr and (toy-web scenes) grammar match of the split's captions; returns (metrics, captions)."""
    captions = split_captions(model, tokenizer, split, ecfg)
    metrics = caption_scores(captions, [[split.texts[j] for j in js] for js in split.img2txt])
    gm = grammar_match(captions, split.samples)
    if gm is not None:
        metrics["grammar_match"] = gm
    return metrics, captions


def evaluate_model(model, tokenizer, split: EvalSplit, ecfg: EvalConfig) -> tuple[dict[str, float], list[str]]:
    """Retrieval, captioning and grammar metrics of one model on an eval split; returns (metrics, captions)."""
    t0 = time.perf_counter()
    metrics = retrieval_metrics(model, tokenizer, split, ecfg)
    t1 = time.perf_counter()
    caption_part, captions = caption_metrics(model, tokenizer, split, ecfg)
    t2 = time.perf_counter()
    metrics.update(caption_part)
    metrics.update(retrieval_seconds=t1 - t0, captioning_seconds=t2 - t1)
    return metrics, captions


def parse_models(items: Sequence[str]) -> dict[str, str]:
    """``["NAME=URI", ...]`` -> ``{NAME: URI}`` in order; names are letters, digits, ``_``, ``-`` and ``.``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        name, uri = name.strip(), uri.strip()
        if not sep or not name or not uri:
            raise UserError(f"--model expects NAME=URI, got {item!r}")
        if not _NAME.match(name):
            raise UserError(f"--model {item!r}: the name may hold only letters, digits, '_', '-' and '.'")
        if name in out:
            raise UserError(f"--model: the name {name!r} is given twice")
        out[name] = uri
    return out


def _pil_images(images: torch.Tensor) -> list:
    """Undo the eval normalisation of ``(B, 3, S, S)`` tensors to RGB PIL images."""
    from PIL import Image

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for t in images:
        arr = ((t.cpu().float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr, "RGB"))
    return out


def _flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}{sep}", sep))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def log_comparison_to_parent(run_, metrics: dict[str, Any], table: list[dict[str, Any]], reports: Path) -> None:
    """Put the Table-1 comparison on the pipeline's parent run, where a reviewer lands first: each model's
    table metrics (``<name>/<metric>``) and the filters' precision/recall as metrics, ``comparison.json`` as a
    table, and ``report.html`` / ``report.md`` (from the ``reports`` directory) under ``report/``."""
    if not run_.enabled or not run_.parent_run_id:
        return
    parent = run_.parent()
    values = {f"{name}/{key}": m.get(key) for name, m in metrics["models"].items() for _, key in TABLE_COLUMNS}
    for section in ("filter", "filter_itc"):
        values.update({f"{section}/{k}": (metrics.get(section) or {}).get(k) for k in ("precision", "recall")})
    parent.log_metrics(0, values)
    parent.log_table(table, "comparison.json")
    for fname in (REPORT_HTML, REPORT_MD):
        parent.log_artifact(reports / fname, "report")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(cfg: Config, models: dict[str, str], test: str, output: str, *, capfilt: str | None = None,
        vqa: dict[str, str] | None = None, vqa_test: str | None = None,
        parent_run_id: str | None = None) -> EvalResult:
    """Evaluate ``models`` (name -> checkpoint or stage output) on ``test``; write reports under ``output``.

    ``vqa`` (name -> VQA model) are scored on the VQA test split ``vqa_test``; a VQA model named as one of
    ``models`` (the VQA model fine-tuned from it) fills that model's "VQA acc" column.
    """
    from components import tracking

    _check_names(models, vqa, vqa_test)
    ecfg = cfg.evaluate
    records = read_provenance(capfilt) if capfilt else None
    capfilt_summary = read_capfilt_summary(capfilt) if capfilt else {}
    device = _device()
    config = {**to_dict(cfg), "inputs": {"models": dict(models), "test": test, "capfilt": capfilt}}
    with tracking.stage_run("evaluate", config, parent_run_id=parent_run_id) as run_, \
            tempfile.TemporaryDirectory(prefix="blip-eval-") as tmp:
        model_metrics, captions, timings, split = _score_models(cfg, models, test, device)
        vqa_metrics, vqa_answers, vqa_split = ({}, {}, None)
        if vqa:
            vqa_metrics, vqa_answers, vqa_split = vqa_eval.evaluate_vqa(cfg, vqa, vqa_test, device)
            for name, m in vqa_metrics["models"].items():
                if name in model_metrics:
                    model_metrics[name]["vqa_acc"] = m["accuracy"]
        metrics: dict[str, Any] = {
            "models": model_metrics,
            "filter": filter_metrics(records) if records is not None else {},
            "filter_itc": itc_filter_metrics(records) if records is not None else {},
            "capfilt": capfilt_metrics(records) if records is not None else {},
            "test": {"images": len(split.samples), "texts": len(split.texts), "k_test": ecfg.k_test},
        }
        if vqa_metrics:
            metrics["vqa"] = vqa_metrics
        if metrics["filter"] and "threshold" in capfilt_summary:
            metrics["filter"]["threshold"] = capfilt_summary["threshold"]
        info = {"test": test, "capfilt": capfilt, "images": len(split.samples), "texts": len(split.texts),
                "k_test": ecfg.k_test, "num_beams": ecfg.num_beams, "min_length": ecfg.min_length,
                "max_length": ecfg.max_length, "prompt": ecfg.prompt, "threshold": threshold_note(capfilt_summary),
                "decoding_note": decoding_note(ecfg), "vqa_test": vqa_test}
        table = comparison_table(model_metrics)
        keys = [s.get("__key__") for s in split.samples]
        files = {
            REPORT_MD: render_markdown(metrics, info),
            REPORT_HTML: render_html(metrics, info),
            CAPTIONS_FILE: json.dumps({"keys": keys, "captions": captions}, indent=1) + "\n",
            METRICS_FILE: json.dumps(metrics, indent=2, sort_keys=True) + "\n",
        }
        for fname, text in files.items():
            (Path(tmp) / fname).write_text(text)
        for fname in files:  # each file appears whole; metrics.json (the dict order) last
            storage.upload_file(Path(tmp) / fname, storage.join(output, fname))

        flat = {f"{name}/{k}": v for name, m in model_metrics.items() for k, v in {**m, **timings[name]}.items()}
        flat.update(_flatten(metrics["filter"], "filter/"))
        flat.update(_flatten(metrics["filter_itc"], "filter_itc/"))
        flat.update(_flatten(metrics["capfilt"], "capfilt/"))
        flat.update(_flatten(vqa_metrics.get("models", {}), "vqa/"))
        run_.log_metrics(0, flat)
        run_.set_tags({"blip.models": ",".join(models), "blip.output": output})
        run_.log_table(table, "comparison.json")
        for fname in files:
            run_.log_artifact(Path(tmp) / fname, "report")
        log_comparison_to_parent(run_, metrics, table, Path(tmp))
        if run_.enabled:
            _log_examples(run_, ecfg.log_samples, split, captions, vqa_split, vqa_answers)
        run_id = run_.run_id
    return EvalResult(output=output, metrics=metrics, table=table, report=files[REPORT_MD], run_id=run_id)


def _check_names(models: dict[str, str], vqa: dict[str, str] | None, vqa_test: str | None) -> None:
    if not models:
        raise UserError("evaluate: give at least one model (--model NAME=URI)")
    for name in models:
        if not _NAME.match(name):
            raise UserError(f"evaluate: model name {name!r} may hold only letters, digits, '_', '-' and '.'")
    if bool(vqa) != bool(vqa_test):
        raise UserError("evaluate: --vqa and --vqa-test go together")
    for name in vqa or {}:
        if not _NAME.match(name):
            raise UserError(f"evaluate: VQA model name {name!r} may hold only letters, digits, '_', '-' and '.'")
    if vqa:
        vqa_eval.check_vqa_models(vqa)


def _score_models(cfg: Config, models: dict[str, str], test: str, device: torch.device):
    """Each model's metrics and captions on the test split (loaded once per image size), the seconds its parts
    took, and the split; returns ``(metrics, captions, timings, split)``, each by model name but the split."""
    splits: dict[int, EvalSplit] = {}
    model_metrics: dict[str, dict[str, float]] = {}
    captions: dict[str, list[str]] = {}
    timings: dict[str, dict[str, float]] = {}
    split = None
    for name, uri in models.items():
        with training.local_checkpoint(training.resolve_model_dir(uri)) as d:
            ckpt = load_model_dir(d, with_momentum=False, image_size=cfg.data.image_size or None)
        if ckpt.tokenizer is None:
            raise UserError(f"{uri}: the checkpoint has no tokenizer/ directory")
        model = ckpt.model.to(device).eval()
        size = model.cfg.vision.image_size  # data.image_size when set: position embeddings interpolated
        if size not in splits:
            splits[size] = load_eval_split(test, size, cfg.data.max_words)
        split = splits[size]
        log.info("evaluate %s (%s) on %d images / %d captions", name, uri, len(split.samples), len(split.texts))
        model_metrics[name], captions[name] = evaluate_model(model, ckpt.tokenizer, split, cfg.evaluate)
        timings[name] = {k: model_metrics[name].pop(k) for k in ("retrieval_seconds", "captioning_seconds")}
        del model, ckpt
    assert split is not None
    return model_metrics, captions, timings, split


def _log_examples(run_, log_samples: int, split: EvalSplit, captions: dict[str, list[str]], vqa_split,
                  vqa_answers) -> None:
    """Sample test images with each model's caption and, with VQA, sample questions with their answers."""
    n = min(log_samples, len(split.samples))
    if n:
        images = _pil_images(split.images[:n])
        refs = [split.texts[split.img2txt[i][0]] for i in range(n)]
        for name, caps in captions.items():
            run_.log_image_captions(images, caps[:n], step=0, key=f"captions_{name}", references=refs)
    if vqa_split is not None:
        rows = vqa_eval.examples(vqa_split, vqa_answers, log_samples * 4)
        pics = _pil_images(vqa_split.images[vqa_split.image_index[:len(rows)]])
        run_.log_table([{"image": p, **r} for p, r in zip(pics, rows, strict=True)], "vqa_examples.json")


SPEC = StageSpec(
    name="evaluate", module=__name__, description=__doc__.split("\n\n")[0],
    inputs=(Option("--model", "a model to evaluate: checkpoint directory or stage output, local or s3 (repeatable)",
                   kind="input", action="append", required=True, metavar="NAME=URI", param="models",
                   convert=lambda v: parse_models(v)),
            Option("--test", "the clean test split (dataset directory, local or s3)", kind="input", required=True),
            Option("--capfilt", "CapFilt output (with provenance.jsonl) to score the filter", kind="input"),
            Option("--vqa", "a VQA model (blip finetune --task vqa output) to score on --vqa-test (repeatable); "
                   "named as a --model, it fills that model's VQA column", kind="input", action="append",
                   metavar="NAME=URI", convert=lambda v: parse_models(v) or None),
            Option("--vqa-test", "the VQA test split (dataset directory, local or s3)", kind="input")),
    outputs=(Option("--output", "output directory or s3:// prefix", kind="output", required=True),),
    config=("evaluate", "data.image_size", "data.max_words"))


def summary(metrics: dict, output: str) -> str:
    """The final line of the stage, from its ``metrics.json``: printed by ``blip evaluate`` and by the
    pipeline's evaluate step."""
    models = metrics.get("models") or {}
    scores = ", ".join(f"{name} mean_r1={fmt_value(m.get('mean_r1'))}" for name, m in models.items())
    return f"evaluate: {scores or 'no models'}; wrote {METRICS_FILE}, {REPORT_MD}, {REPORT_HTML} to {output}"


def main(argv: list[str] | None = None) -> int:
    args = SPEC.parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = run(cfg, **SPEC.run_kwargs(args))
    print(res.report)
    print(summary(res.metrics, res.output))
    return 0


if __name__ == "__main__":
    run_as_process(main)
