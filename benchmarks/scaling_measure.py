"""The measurements behind the inputs of :mod:`benchmarks.scaling` (``--measure-flops``, ``--measure-ingest``).

    python -m benchmarks.scaling --measure-flops   # recount the FLOPs of the `base` preset on CPU (~1 min)
    python -m benchmarks.scaling --measure-ingest  # ingest + loader rates on real photos at 384 px (~1 min)
"""

from __future__ import annotations

import time


def measure_flops(threads: int = 2) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from blip_core import build_model
    from blip_core.config import load_config
    from blip_core.objectives import CaptionerObjective, FilterObjective, PretrainObjective, SpecialIds

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=base"])
    model = build_model(cfg.model)
    ids = SpecialIds(cls=101, enc=30523, dec=30522, pad=0)
    b, length = 2, 30
    image = torch.randn(b, 3, 224, 224)
    input_ids = torch.randint(1000, 30000, (b, length))
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    mask = torch.ones_like(input_ids)

    def count(fn) -> float:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / b

    out: dict[str, float] = {}
    with torch.no_grad():
        out["vit_fwd"] = count(lambda: model.encode_image(image))
        embeds = model.encode_image(image)
        out["text_fwd"] = count(lambda: model.encode_text(input_ids, mask))
        out["cross_kv"] = count(lambda: model.cross_kv(embeds))
        cross = model.cross_kv(embeds)
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = ids.enc
        out["itm_pass"] = count(lambda: model.itm_logits(enc_ids, mask, cross))
        out["decoder_pass"] = count(lambda: model.decode(input_ids, mask, cross))
    pre = PretrainObjective(model, ids)
    with torch.no_grad():
        out["pretrain_fwd"] = count(lambda: pre(image, input_ids, mask, alpha=0.4))
    out["pretrain_step"] = count(lambda: pre(image, input_ids, mask, alpha=0.4).loss.backward())
    fil = FilterObjective(model, ids)
    out["filter_step"] = count(lambda: fil(image, input_ids, mask, alpha=0.4,
                                           image_idx=torch.arange(b)).loss.backward())
    cap = CaptionerObjective(model, ids, prompt_len=4)
    out["captioner_step"] = count(lambda: cap(image, input_ids, mask).loss.backward())
    for k, v in out.items():
        print(f"    \"{k}\": {v / 1e9:.2f}e9,")
    brief = out["vit_fwd"] + out["text_fwd"] + out["cross_kv"] + 3 * out["itm_pass"] + out["decoder_pass"]
    print(f"ViT + text + K/V + 3 ITM + decoder forward = {brief / 1e9:.2f} GFLOP; x3 = {3 * brief / 1e9:.2f}; "
          f"+ momentum ViT + text forward = {(3 * brief + out['vit_fwd'] + out['text_fwd']) / 1e9:.2f} "
          f"(counted step: {out['pretrain_step'] / 1e9:.2f})")

    def nbytes(tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    trainable = [p for p in pre.parameters() if p.requires_grad]
    print(f"    \"objective_bytes\": {nbytes(pre.state_dict().values()) / 1e9:.2f}e9,")
    print(f"    \"optimizer_bytes\": {2 * nbytes(trainable) / 1e9:.2f}e9,")


def _photos() -> list:
    """The real photographs that ship with scikit-learn and matplotlib (427 x 640, 427 x 640, 512 x 600)."""
    from pathlib import Path

    import matplotlib
    import sklearn
    from PIL import Image

    paths = [Path(sklearn.__file__).parent / "datasets/images/china.jpg",
             Path(sklearn.__file__).parent / "datasets/images/flower.jpg",
             Path(matplotlib.get_data_path()) / "sample_data/grace_hopper.jpg"]
    return [Image.open(p).convert("RGB") for p in paths]


def measure_ingest(n: int = 300) -> None:
    """Ingest ``n`` photo crops through a Karpathy-style annotation file at 384 px; then the train loader."""
    import io
    import json
    import os
    import random
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from blip_core.config import load_config
    from blip_core.data.loader import make_loader
    from blip_core.tokenizer import BlipTokenizer
    from components import ingest

    torch.set_num_threads(1)
    photos = _photos()
    rng = random.Random(0)
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    entries, raw_bytes = [], 0
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = rng.randint(int(0.8 * w), w), rng.randint(int(0.8 * h), h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        buf = io.BytesIO()
        img.crop((x, y, x + cw, y + ch)).save(buf, "JPEG", quality=90)
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        raw_bytes += len(buf.getvalue())
        entries.append({"image": f"images/{i:05d}.jpg", "caption": f"a photo number {i} of a scene"})
    (root / "ann.json").write_text(json.dumps(entries))
    cfg = load_config(None, ["ingest.resolution=384"])

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    c0, t0 = cpu(), time.perf_counter()
    res = ingest.run(cfg, str(root / "ann.json"), str(root / "out"), progress=False)
    c1, t1 = cpu(), time.perf_counter()
    m = res.manifest
    stored = sum(s.bytes for s in m.shards) / m.samples_out
    print(f"ingest: {m.samples_out} photos ({raw_bytes / n / 1e3:.0f} KB raw each) at 384 px in {t1 - t0:.1f} s "
          f"wall, {c1 - c0:.1f} s CPU: {n / (c1 - c0):.1f} per CPU-s, {n / (t1 - t0):.1f} per wall s; "
          f"{stored / 1e3:.1f} KB stored per sample")
    tok = BlipTokenizer.from_corpus([e["caption"] for e in entries], vocab_size=200)
    loader = make_loader([str(root / "out")], tok, image_size=224, batch_size=20, train=True, min_scale=0.2,
                         expand_captions=True)
    c0, t0 = cpu(), time.perf_counter()
    pairs = sum(batch["image"].shape[0] for batch in loader)
    c1, t1 = cpu(), time.perf_counter()
    print(f"train loader 224 px: {pairs} pairs in {t1 - t0:.1f} s wall, {c1 - c0:.1f} s CPU: "
          f"{pairs / (c1 - c0):.1f} per CPU-s")
    shutil.rmtree(root, ignore_errors=True)
