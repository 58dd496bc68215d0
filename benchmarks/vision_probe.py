"""Vision probe: can the demo's image encoder learn to see shapes within the demo's step budget?

    python -m benchmarks.vision_probe [--config params.yaml] [--stem patch|conv] [--steps 900] [--eval-every 150]
        [--lr 5e-4] [--batch-size 32] [--stem-channels C1,C2,C3]

Trains image encoders from scratch, *supervised*, to say which shapes and which colours a toy-web image
shows (11 binary labels: 5 shapes, 6 colours; binary cross-entropy, AdamW, batch 32 unless ``--batch-size``
says otherwise, 100 warmup steps) on 4,000 clean web-split images, and reports on the 200 test-split images
the share whose shape set and colour set are predicted exactly. Direct labels are a far stronger signal than
captions, so an encoder that cannot learn shapes here within the pre-training stage's step count cannot learn
them from ITC/ITM/LM either.

- ``vit``: the demo's ViT (``model.vision`` of the config; ``--stem`` overrides its patch embedding: the
  paper's linear patchify or the convolutional stem), its [CLS] token read out, as ITC reads it.
- ``vit-max``: the same ViT, max over its patch tokens (what cross-attention could pick from).
- ``cnn``: a 4-layer CNN with global max pooling (a reference point: not BLIP's encoder).

Prints one line per evaluation and a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip_core.config import ConfigError, load_config
from blip_core.data import toyweb, toyweb_scenes
from blip_core.data.transforms import EvalTransform
from blip_core.models.vision import ConvStem, ImageEncoder, conv_stem_channels
from blip_core.seeding import make_generator

ENCODERS = ("vit", "vit-max", "cnn")


def _data(uri: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, S, S)`` (eval transform) and labels ``(N, 11)``: shapes present, colours present."""
    transform = EvalTransform(size)
    images, labels = [], []
    for s in toyweb.generate(uri):
        images.append(transform(Image.open(io.BytesIO(s.jpg)))[0])
        objs = s.json["scene"]["objects"]
        labels.append([float(any(o["shape"] == k for o in objs)) for k in toyweb_scenes.SHAPES]
                      + [float(any(o["color"] == k for o in objs)) for k in toyweb_scenes.COLORS])
    return torch.stack(images), torch.tensor(labels)


class _Cnn(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        layers, ch = [], 3
        for i, out in enumerate((32, 64, width, width)):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            ch = out
        self.net = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Probe(nn.Module):
    def __init__(self, kind: str, vision_cfg, stem_channels: list[int] | None = None):
        super().__init__()
        self.kind = kind
        self.encoder = _Cnn(vision_cfg.width) if kind == "cnn" else ImageEncoder(vision_cfg)
        if stem_channels and kind != "cnn":
            self.encoder.patch_embed = ConvStem(vision_cfg.patch_size, vision_cfg.width, stem_channels)
        self.head = nn.Linear(vision_cfg.width, len(toyweb_scenes.SHAPES) + len(toyweb_scenes.COLORS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        if self.kind == "vit":
            feats = feats[:, 0]  # [CLS]
        elif self.kind == "vit-max":
            feats = feats[:, 1:].max(dim=1).values
        return self.head(feats)


def _channels(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts, got {text!r}") from None


def _exact(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (pred == target.bool()).all(dim=1).float().mean().item()


def run_probe(kind: str, vision_cfg, train, test, steps: int, eval_every: int, lr: float, seed: int,
              batch_size: int = 32, stem_channels: list[int] | None = None) -> list[dict]:
    torch.manual_seed(seed)
    probe = _Probe(kind, vision_cfg, stem_channels)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.05)
    g = make_generator("cpu", seed)
    (x_train, y_train), (x_test, y_test) = train, test
    n_shapes = len(toyweb_scenes.SHAPES)
    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 100)
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        loss = F.binary_cross_entropy_with_logits(probe(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            probe.eval()
            with torch.no_grad():
                pred = probe(x_test) > 0
            probe.train()
            row = {"encoder": kind, "step": step, "loss": round(loss.item(), 4),
                   "shape_set_acc": round(_exact(pred[:, :n_shapes], y_test[:, :n_shapes]), 3),
                   "colour_set_acc": round(_exact(pred[:, n_shapes:], y_test[:, n_shapes:]), 3),
                   "seconds": round(time.time() - t0, 1)}
            print(f"{kind:8s} step {step:5d}  shape-set acc {row['shape_set_acc']:.2f}  "
                  f"colour-set acc {row['colour_set_acc']:.2f}  ({row['seconds']:.0f} s)", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="params.yaml", help="params.yaml whose model.vision is probed")
    p.add_argument("--stem", choices=("patch", "conv"), help="the ViT's patch embedding (default: the config's)")
    p.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    p.add_argument("--steps", type=int, default=900, help="optimizer steps (the demo pre-trains ~875)")
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stem-channels", type=_channels, metavar="C1,C2,C3",
                   help="the conv stem's stage channels (default: the stem's own, 16,32,64 at width 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--test-images", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    vision = load_config(args.config).model.vision
    if args.stem:
        vision = dataclasses.replace(vision, stem=args.stem)
    if args.stem_channels:
        if vision.stem != "conv":
            p.error("--stem-channels needs the conv stem (--stem conv)")
        try:  # before the data is drawn: a wrong count is a usage error, found at once
            conv_stem_channels(vision.patch_size, vision.width, args.stem_channels)
        except ConfigError as e:
            p.error(str(e))
    if args.batch_size < 1 or args.steps < 1 or args.eval_every < 1:
        p.error("--batch-size, --steps and --eval-every must be positive")
    size = vision.image_size
    train = _data(f"toyweb://?split=web&n={args.train_images}&noise=0&seed=0&size={size}", size)
    test = _data(f"toyweb://?split=test&n={args.test_images}&seed=0&size={size}", size)
    results = {kind: run_probe(kind, vision, train, test, args.steps, args.eval_every, args.lr, args.seed,
                               args.batch_size, args.stem_channels)
               for kind in args.encoders}
    final = {kind: rows[-1] for kind, rows in results.items()}
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "stem_channels": args.stem_channels,
                      "vision": dataclasses.asdict(vision), "final": final}, indent=1))
    return final


if __name__ == "__main__":
    main()
