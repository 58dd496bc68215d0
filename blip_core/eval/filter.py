"""Metrics of a CapFilt run from its provenance records: the filter on known noise, kept shares, diversity.

A record is one caption of ``provenance.jsonl``: ``source`` (web, synthetic, human), ``kept``, ``caption``,
``itm_score``, ``itc_cosine`` and, for labelled web data, ``noise`` (the noise kind, or null) and
``noise_detail``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from blip_core.capfilt import decide, threshold_for_share
from blip_core.data.toyweb import NOISE_KINDS
from blip_core.eval.captions import distinct_n

SOURCES = ("web", "synthetic", "human")


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
