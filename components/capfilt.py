"""CapFilt stage: caption every web image, filter web and synthetic captions with ITM, write the bootstrap set.

``blip capfilt --captioner CKPT --filter CKPT --web URI [URI ...] --human URI [URI ...] --output URI
[--calibration URI ...]``

The filter keeps a caption whose ITM match probability reaches ``capfilt.threshold`` (0.5, the paper's). With
``--calibration``, a dataset of web pairs whose sample json says which captions are wrong (``noise``: null
for a right caption, a reason for a wrong one; toy-web writes it, and so does ``blip ingest`` of a labelled
JSONL/CSV), the threshold is chosen on that sample instead: the one that drops the most wrong captions while
at least ``capfilt.target_precision`` of the captions it drops are wrong (:func:`blip_core.capfilt.choose_threshold`).

The output (local directory or ``s3://`` prefix) is a dataset directory (see
:mod:`blip_core.data.webdataset_io`) the pretrain stage reads directly::

    capfilt-XXXXXX.tar   one shard per input web shard: each web image with its kept web captions (every
                         web caption of an image is scored and kept or dropped on its own) and its kept
                         synthetic captions (images left with no caption are dropped and counted)
    human-XXXXXX.tar     the human-annotated shards, copied unchanged
    provenance.jsonl     every caption that entered, one line each: image, source (web/synthetic/human),
                         caption, ITM score, the filter's ITC cosine of the same pair (for the evaluate
                         stage's comparison with a CLIP-style cosine filter), kept
    summary.json         texts in and out per source, images dropped, the threshold and where it came from
    manifest.json        written last
    parts/               per-shard completion records (resume: finished shards are not redone)

Work is split over DDP ranks by input shard (rank ``r`` takes shards ``r, r + W, ...``); each rank writes its
own shards and rank 0 merges the manifest. Synthetic captions are sampled with a generator seeded by
``(capfilt.seed, shard)``, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from blip_core.capfilt import caption_batch, choose_threshold, decide, filter_batch, filter_scores
from blip_core.config import Config, to_dict
from blip_core.data.samples import ShardLost, dataset_shards, decode_image, sample_captions
from blip_core.data.splits import load_eval_split
from blip_core.data.transforms import EvalTransform
from blip_core.data.webdataset_io import (
    DATASET_FORMAT,
    IMAGE_EXTS,
    MANIFEST_NAME,
    DatasetWriter,
    Manifest,
    ShardInfo,
    ShardReadError,
    decode_json,
    iter_shard,
    sha256_file,
)
from blip_core.errors import UserError
from blip_core.seeding import derive_seed, make_generator
from blip_core.train import distributed as D
from components import storage, training
from components.cli import run_as_process, run_distributed_main
from components.spec import Option, StageSpec

log = logging.getLogger(__name__)


@dataclass
class CapFiltResult:
    output: str
    texts_in: dict[str, int]
    texts_out: dict[str, int]
    images_in: int
    images_out: int
    shards_done: int
    shards_skipped: int
    threshold: float = 0.5
    calibration: dict | None = None  # what calibrate() chose and measured, when the threshold came from it
    run_id: str | None = None

    @property
    def threshold_source(self) -> str:
        return _threshold_source(self.calibration)

    @property
    def record(self) -> dict:
        """The keys of ``summary.json`` this result holds."""
        return {"web_images_in": self.images_in, "web_images_out": self.images_out, "texts_in": self.texts_in,
                "texts_out": self.texts_out, "threshold": self.threshold, "threshold_source": self.threshold_source}


def _threshold_source(calibration: dict | None) -> str:
    return "calibration" if calibration else "capfilt.threshold"


def _image_of(sample: dict) -> tuple[str, bytes]:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return ext, sample[ext]
    raise ValueError("no image")


class _Models:
    def __init__(self, captioner: str, filter_: str, device: torch.device, image_size: int = 0):
        self.captioner, self.tokenizer, _ = training.load_init(captioner, image_size)
        self.filter, self.filter_tokenizer, _ = training.load_init(filter_, image_size)
        self.captioner.to(device).eval()
        self.filter.to(device).eval()
        self.device = device
        self.cap_tf = EvalTransform(self.captioner.cfg.vision.image_size)
        self.fil_tf = EvalTransform(self.filter.cfg.vision.image_size)


def calibrate(models: _Models, cfg: Config, uris: list[str]) -> dict:
    """Choose the filter threshold on a labelled calibration sample; returns what was chosen and measured."""
    c = cfg.capfilt
    if not 0.0 < c.target_precision <= 1.0:
        raise UserError(f"capfilt.target_precision: expected a share in (0, 1], got {c.target_precision}")
    split = load_eval_split(uris, models.filter.cfg.vision.image_size)
    wrong_img = [bool(s.get("noise")) for s in split.samples]
    wrong = [wrong_img[i] for i in split.txt2img]
    if not any(wrong) or all(wrong):
        kind = "wrong" if not any(wrong) else "right"
        raise UserError(f"calibration sample {', '.join(uris)}: no caption labelled {kind}; the sample json's "
                        "'noise' field must be null for a right caption and a reason (e.g. 'unrelated') for a "
                        "wrong one, with both kinds present")
    scores: list[float] = []
    step = max(1, c.batch_size)
    for b in range(0, len(split.samples), step):
        idx = range(b, min(b + step, len(split.samples)))
        images = split.images[b:b + step].to(models.device, non_blocking=True)
        for group in filter_batch(models.filter, models.filter_tokenizer, images,
                                  [[split.texts[j] for j in split.img2txt[i]] for i in idx]):
            scores.extend(group)
    choice = choose_threshold(scores, wrong, c.target_precision)
    info = {"threshold": choice.threshold, "target_precision": c.target_precision, "met": choice.met,
            "precision": choice.precision, "recall": choice.recall, "captions": choice.samples,
            "wrong": choice.wrong, "dropped": choice.dropped, "data": list(uris)}
    prec = "n/a" if choice.precision is None else f"{choice.precision:.3f}"
    msg = (f"calibration on {choice.samples} labelled captions ({choice.wrong} wrong): threshold "
           f"{choice.threshold:.4f} drops {choice.dropped}, precision {prec}, recall {choice.recall:.3f}")
    if choice.met:
        print(f"capfilt: {msg}", flush=True)
    else:
        log.warning("%s: no threshold reaches capfilt.target_precision %.2f on this sample; using the most "
                    "precise one", msg, c.target_precision)
    return info


def _process_shard(models: _Models, cfg: Config, shard_uri: str, index: int, work: Path, writer: DatasetWriter,
                   examples: list, threshold: float) -> dict:
    """Caption and filter one web shard; add its kept samples to ``writer`` (the shard ``capfilt-<index>.tar``,
    published by the caller) and write its provenance under ``work``; return stats."""
    c = cfg.capfilt
    name = f"capfilt-{index:06d}.tar"
    prov_lines: list[str] = []
    counts_in: Counter[str] = Counter()
    counts_out: Counter[str] = Counter()
    images_in = images_out = captions_out = 0
    unreadable = 0
    gen = make_generator(models.device, derive_seed(c.seed) + index)  # on the captioner's device
    batch: list[tuple[str, str, bytes, dict, Image.Image, list[str]]] = []

    def flush() -> None:
        nonlocal images_out, captions_out
        if not batch:
            return
        cap_images = torch.stack([models.cap_tf(b[4])[0] for b in batch]).to(models.device, non_blocking=True)
        synthetic = caption_batch(models.captioner, models.tokenizer, cap_images, c, gen)
        fil_images = torch.stack([models.fil_tf(b[4])[0] for b in batch]).to(models.device, non_blocking=True)
        # Every web caption of an image is a candidate of its own, then the synthetic ones.
        candidates = [web + syn for (*_, web), syn in zip(batch, synthetic)]
        scores, cosines = filter_scores(models.filter, models.filter_tokenizer, fil_images, candidates)
        for (key, ext, img_bytes, meta, img, web), texts, sc, cos in zip(batch, candidates, scores, cosines):
            kept = []
            record_meta = {"image_id": meta.get("image_id", key), "key": key, "shard": name}
            # The sample's known-noise labels (toy-web) describe its web captions, never the synthetic ones.
            web_labels = {"noise": meta.get("noise"),
                          **({"noise_detail": meta["noise_detail"]} if meta.get("noise_detail") else {})}
            decisions = []
            for j, (text, s, c_itc) in enumerate(zip(texts, sc, cos)):
                source = "web" if j < len(web) else "synthetic"
                ok = decide(s, threshold)
                counts_in[source] += 1
                if ok:
                    counts_out[source] += 1
                    kept.append(text)
                decisions.append({"source": source, "caption": text, "itm_score": round(s, 6), "kept": ok})
                labels = web_labels if source == "web" else {"noise": None}
                prov_lines.append(json.dumps({**record_meta, **labels, "source": source, "caption": text,
                                              "itm_score": round(s, 6), "itc_cosine": round(c_itc, 6),
                                              "kept": ok}))
            if len(examples) < 16:
                examples.append((img, decisions))
            if not kept:
                continue
            out_meta = {**meta, "captions": kept, "source": "web", "capfilt": decisions}
            writer.add(key, img_bytes, ext, out_meta)
            images_out += 1
            captions_out += len(kept)
        batch.clear()

    for sample in iter_shard(shard_uri):
        images_in += 1
        try:
            ext, data = _image_of(sample)
            img = decode_image(data)
            meta = decode_json(sample.get("json"))
            web_captions, _ = sample_captions(sample)  # txt first, then the other json captions
        except Exception as e:  # noqa: BLE001 - a bad sample is counted, never fatal
            unreadable += 1
            prov_lines.append(json.dumps({"key": sample.get("__key__"), "shard": name, "source": "web",
                                          "caption": None, "itm_score": None, "kept": False,
                                          "error": f"unreadable: {type(e).__name__}"}))
            continue
        batch.append((sample["__key__"], ext, data, meta, img, web_captions))
        if len(batch) >= c.batch_size:
            flush()
    flush()
    prov_path = work / "provenance" / f"{name}.jsonl"
    prov_path.parent.mkdir(parents=True, exist_ok=True)
    prov_path.write_text("".join(line + "\n" for line in prov_lines))
    return {"shard": name, "images_in": images_in, "images_out": images_out, "captions_out": captions_out,
            "unreadable": unreadable, "texts_in": dict(counts_in), "texts_out": dict(counts_out)}


def _fingerprint(cfg: Config, models: _Models, threshold: float) -> str:
    """Identity of a CapFilt run's settings and weights: finished shards are reused only when it matches."""
    h = hashlib.sha256(json.dumps([asdict(cfg.capfilt), threshold], sort_keys=True).encode())
    for model in (models.captioner, models.filter):
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _figure_html(examples: list) -> str:
    """The paper's Figure 4 for this run: images with web and synthetic captions, accepted in green."""
    rows = []
    for img, decisions in examples:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        src = base64.b64encode(buf.getvalue()).decode()
        caps = "".join(
            f'<li style="color:{"#1a7f37" if d["kept"] else "#cf222e"}">[{d["source"]}] '
            f'{html.escape(d["caption"])} <small>(ITM {d["itm_score"]:.2f})</small></li>' for d in decisions)
        rows.append(f'<tr><td><img src="data:image/png;base64,{src}" width="96"></td><td><ul>{caps}</ul></td></tr>')
    return ("<html><body><h3>CapFilt examples: accepted captions in green, rejected in red</h3>"
            f"<table>{''.join(rows)}</table></body></html>")


def run(cfg: Config, captioner: str, filter: str, web: list[str], human: list[str], output: str, *,  # noqa: A002
        calibration: list[str] | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> CapFiltResult:
    """Bootstrap ``web`` with the captioner and the filter; copy ``human``; write the dataset to ``output``.

    ``calibration``: labelled web pairs on which the filter threshold is chosen (else ``capfilt.threshold``).
    """
    from components import tracking

    info = D.init_from_env()
    models = _Models(captioner, filter, info.device, cfg.data.image_size)
    web_shards = dataset_shards(web)
    human_shards = dataset_shards(human) if human else []
    if not web_shards:
        raise UserError(f"no web shards in {web}")
    if info.is_main:
        storage.delete(storage.join(output, MANIFEST_NAME))  # an unfinished output never looks complete
    sink = storage.dataset_sink(output)  # on every rank before any writes (a local sink clears stale files)
    D.barrier()

    calib = None
    if calibration:
        calib = calibrate(models, cfg, list(calibration)) if info.is_main else None
        calib = D.broadcast_object(calib)  # every rank filters with rank 0's threshold
    threshold = calib["threshold"] if calib else cfg.capfilt.threshold

    mine = [(i, s) for i, s in enumerate(web_shards) if i % info.world_size == info.rank]
    done = skipped = 0
    examples: list = []
    with tracking.stage_run("capfilt", to_dict(cfg), parent_run_id=parent_run_id) as run_:
        bar = tqdm(total=sum(s.samples for _, s in mine), desc="capfilt", unit="img",
                   disable=not (progress and info.is_main))
        fingerprint = _fingerprint(cfg, models, threshold)
        for i, shard in mine:
            part = storage.join(output, "parts", f"capfilt-{i:06d}.json")
            if storage.exists(part) and storage.read_json(part).get("fingerprint") == f"{fingerprint}:{shard.uri}":
                skipped += 1
                bar.update(shard.samples)
                continue
            with tempfile.TemporaryDirectory(prefix="blip-capfilt-") as tmp:
                writer = DatasetWriter(sink, None, Path(tmp) / "staging", shard_prefix="capfilt-", first_shard=i,
                                       fresh=False)
                try:
                    stats = _process_shard(models, cfg, shard.uri, i, Path(tmp), writer, examples, threshold)
                    if stats["images_in"] != shard.samples:  # e.g. a zeroed tail reads as a shorter archive
                        raise ShardLost(f"{shard.uri}: {stats['images_in']} samples read, the manifest says "
                                        f"{shard.samples}; re-run the stage that wrote it")
                    out = writer.end_shard()
                except ShardReadError as e:
                    raise ShardLost(f"{shard.uri}: unreadable ({e}); re-run the stage that wrote it") from None
                finally:
                    writer.close()
                stats.update(bytes=out.bytes, sha256=out.sha256)
                storage.upload_file(Path(tmp) / "provenance" / f"{stats['shard']}.jsonl",
                                    storage.join(output, "parts", f"{stats['shard']}.provenance.jsonl"))
            stats["fingerprint"] = f"{fingerprint}:{shard.uri}"
            storage.write_json(part, stats)  # the shard's completion record, written last
            done += 1
            bar.update(shard.samples)
        bar.close()
        D.barrier()
        result = None
        if info.is_main:
            result = _merge(cfg, output, web_shards, human_shards, done, skipped, threshold, calib)
            result.run_id = run_.run_id
            calib_metrics = {f"calibration_{k}": calib[k] for k in ("precision", "recall")
                             if calib and calib[k] is not None}
            run_.log_metrics(0, {**{f"texts_in_{k}": v for k, v in result.texts_in.items()},
                                 **{f"texts_out_{k}": v for k, v in result.texts_out.items()},
                                 "images_in": result.images_in, "images_out": result.images_out,
                                 "threshold": threshold, **calib_metrics})
            if examples:
                run_.log_text(_figure_html(examples), "capfilt_examples.html")
                run_.log_table([{"source": d["source"], "caption": d["caption"], "itm_score": d["itm_score"],
                                 "kept": d["kept"], "example": n} for n, (_, ds) in enumerate(examples) for d in ds],
                               "capfilt_examples.json")
        D.barrier()
    if result is None:
        return CapFiltResult(output, {}, {}, 0, 0, done, skipped, threshold, calib)
    return result


def _merge(cfg: Config, output: str, web_shards, human_shards, done: int, skipped: int, threshold: float,
           calib: dict | None) -> CapFiltResult:
    """Rank 0: copy human shards, concatenate provenance, write summary.json and then manifest.json."""
    parts = [storage.read_json(storage.join(output, "parts", f"capfilt-{i:06d}.json")) for i in range(len(web_shards))]
    shards = [ShardInfo(p["shard"], p["images_out"], p["captions_out"], p["bytes"], p["sha256"]) for p in parts]
    texts_in: Counter[str] = Counter()
    texts_out: Counter[str] = Counter()
    for p in parts:
        texts_in.update(p["texts_in"])
        texts_out.update(p["texts_out"])
    prov: list[str] = [storage.read_text(storage.join(output, "parts", f"{p['shard']}.provenance.jsonl"))
                       for p in parts]
    human_samples = 0
    for j, hs in enumerate(human_shards):
        name = f"human-{j:06d}.tar"
        with tempfile.TemporaryDirectory(prefix="blip-human-") as tmp:
            local = Path(tmp) / name
            with storage.local_copy(hs.uri) as src:
                local.write_bytes(Path(src).read_bytes())
            lines = []
            for sample in iter_shard(str(local)):
                meta = decode_json(sample.get("json"))
                for cap in meta.get("captions") or [sample["txt"].decode("utf-8")]:
                    texts_in["human"] += 1
                    texts_out["human"] += 1
                    lines.append(json.dumps({"image_id": meta.get("image_id", sample["__key__"]),
                                             "key": sample["__key__"], "shard": name, "source": "human",
                                             "caption": cap, "itm_score": None, "kept": True, "noise": None}))
            prov.append("".join(line + "\n" for line in lines))
            storage.upload_file(local, storage.join(output, name))
            shards.append(ShardInfo(name, hs.samples, hs.captions, local.stat().st_size, sha256_file(local)))
            human_samples += hs.samples
    images_in = sum(p["images_in"] for p in parts)
    images_out = sum(p["images_out"] for p in parts)
    unreadable = sum(p["unreadable"] for p in parts)
    storage.write_text(storage.join(output, "provenance.jsonl"), "".join(prov))
    summary = {"texts_in": dict(texts_in), "texts_out": dict(texts_out), "web_images_in": images_in,
               "web_images_out": images_out, "web_images_dropped": images_in - images_out - unreadable,
               "unreadable": unreadable, "human_images": human_samples, "threshold": threshold,
               "threshold_source": _threshold_source(calib),
               **({"calibration": calib} if calib else {}),
               "decoding": cfg.capfilt.decoding, "shards_done": done, "shards_skipped": skipped}
    storage.write_json(storage.join(output, "summary.json"), summary)
    rejected = {"no_caption_kept": images_in - images_out - unreadable}
    if unreadable:
        rejected["unreadable"] = unreadable
    manifest = Manifest(source=f"capfilt({','.join(s.uri for s in web_shards[:1])}...)",
                        samples_in=images_in + human_samples, samples_out=images_out + human_samples,
                        captions_out=sum(s.captions for s in shards), rejected=rejected, shards=shards,
                        config={"capfilt": asdict(cfg.capfilt)}, format=DATASET_FORMAT,
                        extra={"capfilt": summary})
    manifest.check_counts()
    storage.write_text(storage.join(output, MANIFEST_NAME), manifest.to_json())
    return CapFiltResult(output, dict(texts_in), dict(texts_out), images_in, images_out, done, skipped,
                         threshold, calib)


SPEC = StageSpec(
    name="capfilt", module=__name__, description=__doc__.split("\n\n")[0],
    inputs=(Option("--captioner", "fine-tuned captioner (checkpoint or stage output)", kind="input", required=True),
            Option("--filter", "fine-tuned filter (checkpoint or stage output)", kind="input", required=True),
            Option("--web", "web dataset directories to bootstrap", kind="input", nargs="+", required=True),
            Option("--human", "human-annotated dataset directories (copied)", kind="input", nargs="*", default=[]),
            Option("--calibration", "labelled web pairs (dataset directories; sample json 'noise': null = right "
                   "caption) on which to choose the filter threshold for capfilt.target_precision",
                   kind="input", nargs="*", default=[])),
    outputs=(Option("--output", "output dataset directory or s3:// prefix", kind="output", required=True),),
    config=("capfilt", "data.image_size"))


def summary(info: dict, output: str) -> str:
    """The final line of the stage, from its ``summary.json`` record (:meth:`CapFiltResult.record`): printed by
    ``blip capfilt`` and by the pipeline's capfilt step."""
    threshold = info.get("threshold")
    threshold = f"{threshold:.4f}" if isinstance(threshold, int | float) else "?"
    return (f"capfilt: web images {info.get('web_images_in', '?')} -> {info.get('web_images_out', '?')}; texts in "
            f"{info.get('texts_in', {})}, kept {info.get('texts_out', {})}; threshold {threshold} "
            f"({info.get('threshold_source', '?')}); output {output}")


def main(argv: list[str] | None = None) -> int:
    return run_distributed_main(SPEC.parser(), argv, lambda args, cfg: run(cfg, **SPEC.run_kwargs(args)),
                                lambda args, res: print(summary(res.record, res.output)))


if __name__ == "__main__":
    run_as_process(main)
