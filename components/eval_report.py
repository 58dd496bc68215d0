"""The evaluate stage's reports: the Table-1 comparison, the filter on known noise, VQA, the CapFilt output.

:func:`render_markdown` and :func:`render_html` lay out the same tables (:func:`report_sections`) from the
content of ``metrics.json`` and a few facts about the run (``info``: test split, decoding settings, notes).
"""

from __future__ import annotations

import html
from typing import Any

from blip_core.config import EvalConfig

# (column label, metric key) of the Table-1-style comparison
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TR@1", "tr_r1"), ("IR@1", "ir_r1"), ("TR@5", "tr_r5"), ("IR@5", "ir_r5"), ("mean R@1", "mean_r1"),
    ("BLEU-4", "bleu4"), ("CIDEr", "cider"), ("grammar match", "grammar_match"), ("VQA acc", "vqa_acc"),
)


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


def comparison_table(model_metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per model: ``{"model": name, "TR@1": ..., ..., "grammar match": ...}`` (None when absent)."""
    return [{"model": name, **{label: m.get(key) for label, key in TABLE_COLUMNS}} for name, m in model_metrics.items()]


def fmt_value(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report_sections(metrics: dict[str, Any], info: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of every report table, shared by the Markdown and HTML reports."""
    sections = []
    header = ["model", *(label for label, _ in TABLE_COLUMNS)]
    rows = [[name, *(fmt_value(m.get(key)) for _, key in TABLE_COLUMNS)] for name, m in metrics["models"].items()]
    note = (f"Test split `{info['test']}`: {info['images']} images, {info['texts']} captions. Retrieval: ITC "
            f"top-{info['k_test']} re-ranked by ITM (score = ITM match logit + ITC cosine), recall in %. "
            f"Captioning: beam {info['num_beams']}, length {info['min_length']}-{info['max_length']}, prompt "
            f"\"{info['prompt']}\"{info.get('decoding_note', '')}; BLEU-4 and CIDEr x100. Grammar match: % of "
            "captions naming the drawn scene's objects exactly.")
    sections.append(("Models on the clean test split", note, header, rows))
    flt = metrics.get("filter") or {}
    if flt:
        frows = [["all noise", str(flt["noisy"]), str(flt["noisy_dropped"]), fmt_value(flt.get("precision"), 3),
                  fmt_value(flt.get("recall"), 3)]]
        for kind, d in ((k, v) for k, v in flt.items() if isinstance(v, dict)):
            labelled = [(kind, d)] + [(f"{kind}: {detail}", g) for detail, g in d.get("by_detail", {}).items()]
            for label, g in labelled:
                frows.append([label, str(g["count"]), str(g["dropped"]), fmt_value(g.get("precision"), 3),
                              fmt_value(g.get("recall"), 3)])
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
        crows = [[src, str(cf["texts_in"][src]), str(cf["texts_kept"][src]), fmt_value(cf["kept_share"][src], 3)]
                 for src in cf["texts_in"]]
        div = ", ".join(f"{k.replace('_', ' ')} {fmt_value(v, 3)}" for k, v in cf.items() if "distinct" in k)
        sections.append(("CapFilt output", f"Caption diversity: {div or '–'}.",
                         ["source", "texts in", "kept", "kept share"], crows))
    return sections


def vqa_section(vq: dict[str, Any], info: dict[str, Any]) -> tuple[str, str, list[str], list[list[str]]]:
    """The VQA table: accuracy overall and per question kind, the majority-answer baseline first."""
    cols = ([("majority baseline", vq["baseline"])] if vq.get("baseline") else []) + list(vq["models"].items())
    kinds = sorted({k for _, m in cols for k in m.get("per_kind", {})})
    rows = [["all", *(fmt_value(m.get("accuracy")) for _, m in cols)]]
    rows += [[k, *(fmt_value(m.get("per_kind", {}).get(k, {}).get("accuracy")) for _, m in cols)] for k in kinds]
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
    rows = [[label, str(g["count"]), fmt_value(g.get("precision"), 3), fmt_value(g.get("recall"), 3),
             fmt_value(b.get(label, {}).get("precision"), 3), fmt_value(b.get(label, {}).get("recall"), 3)]
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
    for title, note, header, rows in report_sections(metrics, info):
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
    for title, note, header, rows in report_sections(metrics, info):
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(note.replace('`', ''))}</p>", "<table>",
                  "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
