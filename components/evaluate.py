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

import contextlib
import html
import io
import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_core.capfilt import decide, threshold_for_share
from blip_core.checkpoint_io import load_checkpoint
from blip_core.config import Config, EvalConfig, load_config, to_dict
from blip_core.data.loader import EvalSplit, load_eval_split
from blip_core.data.toyweb import NOISE_KINDS, Scene, caption_matches
from blip_core.data.transforms import CLIP_MEAN, CLIP_STD
from blip_core.errors import UserError
from blip_core.generation import generate_captions
from blip_core.retrieval import recall_at_k, retrieval_scores
from blip_core.train import distributed as dist
from components import storage, training, vqa_eval
from components.spec import Option, StageSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CAPTIONS_FILE = "captions.json"
PROVENANCE_FILE = "provenance.jsonl"
SOURCES = ("web", "synthetic", "human")

# (column label, metric key) of the Table-1-style comparison
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TR@1", "tr_r1"), ("IR@1", "ir_r1"), ("TR@5", "tr_r5"), ("IR@5", "ir_r5"), ("mean R@1", "mean_r1"),
    ("BLEU-4", "bleu4"), ("CIDEr", "cider"), ("grammar match", "grammar_match"), ("VQA acc", "vqa_acc"),
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class EvalResult:
    """What the evaluate stage produced: the content of ``metrics.json`` and the comparison rows."""

    output: str
    metrics: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)
    report: str = ""  # report.md
    run_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Captioning metrics
# --------------------------------------------------------------------------------------------------


def caption_tokens(text: str) -> str:
    """Lowercase, replace punctuation by spaces and collapse whitespace (stands in for the Java PTB tokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap), both x100, of one candidate per image against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references) or not candidates:
        raise ValueError("caption_scores needs one candidate and a list of references per image")
    res = {i: [caption_tokens(c)] for i, c in enumerate(candidates)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


def grammar_match(captions: Sequence[str], samples: Sequence[dict]) -> float | None:
    """Percentage of captions that describe their toy-web scene exactly; None when no sample has a scene."""
    hits = total = 0
    for caption, sample in zip(captions, samples, strict=True):
        scene = sample.get("scene")
        if not isinstance(scene, dict):
            continue
        total += 1
        hits += caption_matches(Scene.from_json(scene), caption)
    return 100.0 * hits / total if total else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct-n: unique n-grams over all n-grams of the (tokenised) texts; None when there are none."""
    grams: Counter[tuple[str, ...]] = Counter()
    for t in texts:
        words = caption_tokens(t).split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


# --------------------------------------------------------------------------------------------------
# CapFilt provenance: the filter on known noise, kept shares, diversity
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


def threshold_note(summary: dict) -> str:
    """One sentence on how CapFilt's filter threshold was set ('' without a summary)."""
    if "threshold" not in summary:
        return ""
    cal = summary.get("calibration")
    if not cal:
        return f" Filter threshold {summary['threshold']:g} (capfilt.threshold)."
    return (f" Filter threshold {cal['threshold']:.4f}, chosen on {cal['captions']} labelled calibration captions "
            f"for precision >= {cal['target_precision']:g} there"
            + ("." if cal.get("met") else " (not reached there: the most precise threshold)."))


def decoding_note(ecfg: EvalConfig) -> str:
    """The captioning settings that differ from the defaults, for the report ('' when none does)."""
    parts = []
    if ecfg.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {ecfg.repetition_penalty:g}")
    if ecfg.length_norm != "current":
        parts.append("beams length-normalised as transformers 4.15")
    return "".join(f", {p}" for p in parts)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    out: dict[str, float] = {}
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if p is not None:
        out["precision"] = p
    if r is not None:
        out["recall"] = r
    if p is not None and r is not None and p + r > 0:
        out["f1"] = 2 * p * r / (p + r)
    return out


def filter_metrics(records: Iterable[dict]) -> dict[str, Any]:
    """Precision/recall of the filter's "dropped" against the known "noisy" label, over scored web captions.

    Web records without a caption or score (unreadable images) are not filter decisions and are skipped.
    Per kind, precision is ``dropped & kind / dropped & (clean | kind)``; recall ``dropped & kind / kind``.
    """
    web = [r for r in records if r.get("source") == "web" and r.get("caption") is not None
           and r.get("itm_score") is not None]
    noisy = [r for r in web if r.get("noise")]
    clean = [r for r in web if not r.get("noise")]
    clean_dropped = sum(not r["kept"] for r in clean)
    tp = sum(not r["kept"] for r in noisy)
    out: dict[str, Any] = {
        "web_captions": len(web), "noisy": len(noisy), "dropped": tp + clean_dropped, "noisy_dropped": tp,
        "clean_dropped": clean_dropped, **_prf(tp, clean_dropped, len(noisy) - tp),
    }
    if clean:
        out["clean_drop_rate"] = clean_dropped / len(clean)
    kinds = list(NOISE_KINDS) + sorted({r["noise"] for r in noisy} - set(NOISE_KINDS))
    for kind in kinds:
        of_kind = [r for r in noisy if r["noise"] == kind]
        if not of_kind:
            continue
        out[kind] = _noise_group(of_kind, clean_dropped)
        details = sorted({r["noise_detail"] for r in of_kind if r.get("noise_detail")})
        if details:  # e.g. wrong_attribute: which attribute the noisy caption got wrong
            out[kind]["by_detail"] = {d: _noise_group([r for r in of_kind if r.get("noise_detail") == d],
                                                      clean_dropped) for d in details}
    return out


def _noise_group(noisy: list[dict], clean_dropped: int) -> dict[str, Any]:
    """Count, dropped, and precision/recall/F1 of one group of noisy captions against the clean ones."""
    tp = sum(not r["kept"] for r in noisy)
    return {"count": len(noisy), "dropped": tp, **_prf(tp, clean_dropped, len(noisy) - tp)}


def itc_filter_metrics(records: Iterable[dict]) -> dict[str, Any]:
    """The ITC-cosine baseline: :func:`filter_metrics` of a filter that keeps the web captions whose ITC cosine
    is highest, as many as the ITM filter kept (:func:`blip_core.capfilt.threshold_for_share`).

    Adds ``threshold`` (the cosine), ``kept`` (web captions it keeps; more than ``itm_kept`` only when equal
    cosines straddle the cut) and ``itm_kept``. ``{}`` when the scored web captions lack ``itc_cosine``
    (provenance written before CapFilt recorded it) or there is none.
    """
    web = [r for r in records if r.get("source") == "web" and r.get("caption") is not None
           and r.get("itm_score") is not None]
    if not web or any(not isinstance(r.get("itc_cosine"), int | float) for r in web):
        return {}
    itm_kept = sum(bool(r["kept"]) for r in web)
    threshold = threshold_for_share([r["itc_cosine"] for r in web], itm_kept)
    as_itc = [{**r, "kept": decide(r["itc_cosine"], threshold)} for r in web]
    return {**filter_metrics(as_itc), "threshold": threshold, "kept": sum(r["kept"] for r in as_itc),
            "itm_kept": itm_kept}


def capfilt_metrics(records: Iterable[dict]) -> dict[str, Any]:
    """Texts in, kept and kept share per source; distinct-1/2 of synthetic (and web) captions."""
    records = [r for r in records if r.get("caption") is not None]
    out: dict[str, Any] = {"texts_in": {}, "texts_kept": {}, "kept_share": {}}
    sources = list(SOURCES) + sorted({str(r["source"]) for r in records} - set(SOURCES))
    for src in sources:
        rows = [r for r in records if r["source"] == src]
        if not rows:
            continue
        kept = sum(bool(r["kept"]) for r in rows)
        out["texts_in"][src], out["texts_kept"][src] = len(rows), kept
        out["kept_share"][src] = kept / len(rows)
    for src in ("synthetic", "web"):
        caps = [r["caption"] for r in records if r["source"] == src]
        for n in (1, 2):
            d = distinct_n(caps, n)
            if d is not None:
                out[f"{src}_distinct_{n}"] = d
    return out


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


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def comparison_table(model_metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per model: ``{"model": name, "TR@1": ..., ..., "grammar match": ...}`` (None when absent)."""
    return [{"model": name, **{label: m.get(key) for label, key in TABLE_COLUMNS}} for name, m in model_metrics.items()]


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _report_sections(metrics: dict[str, Any], info: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of every report table, shared by the Markdown and HTML reports."""
    sections = []
    header = ["model", *(label for label, _ in TABLE_COLUMNS)]
    rows = [[name, *(_fmt(m.get(key)) for _, key in TABLE_COLUMNS)] for name, m in metrics["models"].items()]
    note = (f"Test split `{info['test']}`: {info['images']} images, {info['texts']} captions. Retrieval: ITC "
            f"top-{info['k_test']} re-ranked by ITM (score = ITM match logit + ITC cosine), recall in %. "
            f"Captioning: beam {info['num_beams']}, length {info['min_length']}-{info['max_length']}, prompt "
            f"\"{info['prompt']}\"{info.get('decoding_note', '')}; BLEU-4 and CIDEr x100. Grammar match: % of "
            "captions naming the drawn scene's objects exactly.")
    sections.append(("Models on the clean test split", note, header, rows))
    flt = metrics.get("filter") or {}
    if flt:
        frows = [["all noise", str(flt["noisy"]), str(flt["noisy_dropped"]), _fmt(flt.get("precision"), 3),
                  _fmt(flt.get("recall"), 3)]]
        for kind, d in ((k, v) for k, v in flt.items() if isinstance(v, dict)):
            labelled = [(kind, d)] + [(f"{kind}: {detail}", g) for detail, g in d.get("by_detail", {}).items()]
            for label, g in labelled:
                frows.append([label, str(g["count"]), str(g["dropped"]), _fmt(g.get("precision"), 3),
                              _fmt(g.get("recall"), 3)])
        frows.append(["clean", str(flt["web_captions"] - flt["noisy"]), str(flt["clean_dropped"]), "–", "–"])
        sections.append(("Filter on the known web-caption noise",
                         f"CapFilt `{info['capfilt']}`: a dropped web caption counts as a positive; a noisy one "
                         f"is the truth.{info.get('threshold', '')}",
                         ["web captions", "count", "dropped", "precision", "recall"], frows))
    itc = _itc_section(metrics, info)
    if itc:
        sections.append(itc)
    vq = metrics.get("vqa") or {}
    if vq.get("models"):
        sections.append(vqa_section(vq, info))
    cf = metrics.get("capfilt") or {}
    if cf.get("texts_in"):
        crows = [[src, str(cf["texts_in"][src]), str(cf["texts_kept"][src]), _fmt(cf["kept_share"][src], 3)]
                 for src in cf["texts_in"]]
        div = ", ".join(f"{k.replace('_', ' ')} {_fmt(v, 3)}" for k, v in cf.items() if "distinct" in k)
        sections.append(("CapFilt output", f"Caption diversity: {div or '–'}.",
                         ["source", "texts in", "kept", "kept share"], crows))
    return sections


def vqa_section(vq: dict[str, Any], info: dict[str, Any]) -> tuple[str, str, list[str], list[list[str]]]:
    """The VQA table: accuracy overall and per question kind, the majority-answer baseline first."""
    cols = ([("majority baseline", vq["baseline"])] if vq.get("baseline") else []) + list(vq["models"].items())
    kinds = sorted({k for _, m in cols for k in m.get("per_kind", {})})
    rows = [["all", *(_fmt(m.get("accuracy")) for _, m in cols)]]
    rows += [[k, *(_fmt(m.get("per_kind", {}).get(k, {}).get("accuracy")) for _, m in cols)] for k in kinds]
    t = vq.get("test", {})
    base = f" The baseline always answers \"{vq['baseline']['answer']}\"." if vq.get("baseline") else ""
    note = (f"VQA test split `{info.get('vqa_test')}`: {t.get('questions')} questions on {t.get('images')} images; "
            f"answers by {t.get('inference')}; VQAv2 accuracy in % (min(matches/3, 1) over the 10 leave-one-out "
            f"subsets of the annotators' answers).{base}")
    return ("VQA", note, ["question kind", *(name for name, _ in cols)], rows)


def _itc_section(metrics: dict[str, Any], info: dict[str, Any]) -> tuple[str, str, list[str], list[list[str]]] | None:
    """The ITM filter next to the ITC-cosine filter keeping the same share of web captions (None without it)."""
    flt, itc = metrics.get("filter") or {}, metrics.get("filter_itc") or {}
    if not flt or not itc or not flt.get("noisy"):
        return None

    def groups(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {"all noise": {"count": d["noisy"], **d}}
        for kind, g in ((k, v) for k, v in d.items() if isinstance(v, dict) and "count" in v):
            out[kind] = g
            out.update({f"{kind}: {detail}": dg for detail, dg in g.get("by_detail", {}).items()})
        return out

    a, b = groups(flt), groups(itc)
    rows = [[label, str(g["count"]), _fmt(g.get("precision"), 3), _fmt(g.get("recall"), 3),
             _fmt(b.get(label, {}).get("precision"), 3), _fmt(b.get(label, {}).get("recall"), 3)]
            for label, g in a.items()]
    n = flt["web_captions"]
    note = (f"Both filters keep the same share of the {n} web captions: the ITM filter kept {itc['itm_kept']}; "
            f"the ITC-cosine filter (the CLIP-style baseline of large-scale data filtering, with the filter "
            f"model's image-text cosine) keeps the {itc['kept']} with the highest cosine (threshold "
            f"{itc['threshold']:.4f}). Precision and recall of dropping the noisy captions, as above.")
    return ("ITM filter against an ITC-cosine filter at the same kept share", note,
            ["web captions", "count", "ITM precision", "ITM recall", "ITC precision", "ITC recall"], rows)


def render_markdown(metrics: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report: the model comparison (Table 1 layout), the filter and the CapFilt output."""
    lines = ["# BLIP evaluation", ""]
    for title, note, header, rows in _report_sections(metrics, info):
        lines += [f"## {title}", "", note, "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def render_html(metrics: dict[str, Any], info: dict[str, Any]) -> str:
    """The same report as a self-contained HTML page."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>BLIP evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child"
             "{text-align:left}th{background:#f3f3f3}</style></head><body>", "<h1>BLIP evaluation</h1>"]
    for title, note, header, rows in _report_sections(metrics, info):
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(note.replace('`', ''))}</p>", "<table>",
                  "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
    ecfg = cfg.evaluate
    records = read_provenance(capfilt) if capfilt else None
    capfilt_summary = read_capfilt_summary(capfilt) if capfilt else {}
    device = _device()
    splits: dict[int, EvalSplit] = {}
    config = {**to_dict(cfg), "inputs": {"models": dict(models), "test": test, "capfilt": capfilt}}
    with tracking.stage_run("evaluate", config, parent_run_id=parent_run_id) as run_, \
            tempfile.TemporaryDirectory(prefix="blip-eval-") as tmp:
        model_metrics: dict[str, dict[str, float]] = {}
        captions: dict[str, list[str]] = {}
        timings: dict[str, dict[str, float]] = {}
        split = None
        for name, uri in models.items():
            with training.local_checkpoint(training.resolve_model_dir(uri)) as d:
                ckpt = load_checkpoint(d, with_momentum=False, image_size=cfg.data.image_size or None)
            if ckpt.tokenizer is None:
                raise UserError(f"{uri}: the checkpoint has no tokenizer/ directory")
            model = ckpt.model.to(device).eval()
            size = model.cfg.vision.image_size  # data.image_size when set: position embeddings interpolated
            if size not in splits:
                splits[size] = load_eval_split(test, size, cfg.data.max_words)
            split = splits[size]
            log.info("evaluate %s (%s) on %d images / %d captions", name, uri, len(split.samples), len(split.texts))
            model_metrics[name], captions[name] = evaluate_model(model, ckpt.tokenizer, split, ecfg)
            timings[name] = {k: model_metrics[name].pop(k) for k in ("retrieval_seconds", "captioning_seconds")}
            del model, ckpt
        assert split is not None
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
        n = min(ecfg.log_samples, len(split.samples))
        if n and run_.enabled:
            images = _pil_images(split.images[:n])
            refs = [split.texts[split.img2txt[i][0]] for i in range(n)]
            for name, caps in captions.items():
                run_.log_image_captions(images, caps[:n], step=0, key=f"captions_{name}", references=refs)
        if vqa_split is not None and run_.enabled:
            rows = vqa_eval.examples(vqa_split, vqa_answers, ecfg.log_samples * 4)
            pics = _pil_images(vqa_split.images[vqa_split.image_index[:len(rows)]])
            run_.log_table([{"image": p, **r} for p, r in zip(pics, rows, strict=True)], "vqa_examples.json")
        run_id = run_.run_id
    return EvalResult(output=output, metrics=metrics, table=table, report=files[REPORT_MD], run_id=run_id)


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
    scores = ", ".join(f"{name} mean_r1={_fmt(m.get('mean_r1'))}" for name, m in models.items())
    return f"evaluate: {scores or 'no models'}; wrote {METRICS_FILE}, {REPORT_MD}, {REPORT_HTML} to {output}"


def main(argv: list[str] | None = None) -> int:
    args = SPEC.parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = run(cfg, **SPEC.run_kwargs(args))
    print(res.report)
    print(summary(res.metrics, res.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
