"""Time the official salesforce/BLIP pre-training step, from a local checkout, for ``benchmarks.train``.

    python -m benchmarks.official_blip --official-dir DIR [--image-size 224] [--batch 8] [--queue-size 57600]
                                       [--steps 3] [--threads 2]

``DIR`` holds the official repository's ``models/`` and ``configs/`` (nothing of it is copied into this
project). The official code was written for transformers 4.15, timm 0.4 and fairscale; this module adds, at
run time and only in its own process, the few things it needs from today's libraries:

- ``transformers.modeling_utils`` gets ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and
  ``prune_linear_layer`` (moved to ``transformers.pytorch_utils`` or removed), and the official ``BertModel``
  classes get ``get_head_mask`` / ``invert_attention_mask`` (no longer on ``PreTrainedModel``);
- ``fairscale.nn.checkpoint.checkpoint_activations.checkpoint_wrapper`` is the identity (gradient checkpointing
  is off in this benchmark);
- nothing is downloaded: the DeiT weights are skipped (random initialisation), ``from_pretrained`` of the text
  models builds them from the config with random weights, and the tokenizer is a BERT WordPiece tokenizer over
  a generated 30,522-entry vocabulary laid out as ``bert-base-uncased``'s special ids, plus ``[DEC]`` and
  ``[ENC]`` (30,524 tokens, as blip_core's ``base``);
- ``torch.distributed`` runs as a one-process gloo group (the official queue update all-gathers).

One step is what the official ``train()`` does per batch: the model's forward (ITC + ITM + LM, with the
momentum update and the enqueue inside it), backward of the summed losses, AdamW step. Inputs are random
images and captions of 28 random words (30 tokens with [CLS] and [SEP], no padding), the same sizes as the
blip_core side of ``benchmarks.train``. Prints one JSON line: seconds per step, pairs/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
import types
from pathlib import Path

BERT_VOCAB = 30522


def _vocab() -> list[str]:
    """A vocabulary with bert-base-uncased's size and special ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, and one word per remaining id."""
    return (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + [f"w{i}" for i in range(104, BERT_VOCAB)])


def install_shims() -> None:
    """Make the official code importable and runnable offline with today's transformers and timm."""
    import torch
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    from transformers import BertTokenizer

    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, None) or _unavailable(name))

    fairscale = types.ModuleType("fairscale")
    chain = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"]
    for name in chain:
        sys.modules.setdefault(name, types.ModuleType(name) if name != "fairscale" else fairscale)
    sys.modules[chain[-1]].checkpoint_wrapper = lambda module, **_: module

    torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}  # DeiT init skipped: random weights

    class OfflineBertTokenizer(BertTokenizer):
        @property
        def additional_special_tokens_ids(self):  # gone from today's tokenizers; the official code reads it
            return [self.convert_tokens_to_ids(t) for t in ("[ENC]",)]

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls(vocab={w: i for i, w in enumerate(_vocab())})

    import transformers

    transformers.BertTokenizer = OfflineBertTokenizer


def _unavailable(name: str):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"{name} is not available in this transformers version")
    return missing


def _patch_med(med) -> None:
    """Methods the official BERT classes inherit from transformers 4.15's PreTrainedModel, and offline
    ``from_pretrained``."""
    import torch

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        if head_mask is not None:
            raise NotImplementedError("head masks are not used by BLIP")
        return [None] * num_hidden_layers

    def invert_attention_mask(self, mask):
        ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        ext = ext.to(dtype=self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    def tie(self):
        out = self.get_output_embeddings() if hasattr(self, "get_output_embeddings") else None
        if out is not None:
            out.weight = getattr(self, "bert", self).get_input_embeddings().weight

    def init_weights(self):  # 4.15: initialise every module, then tie the LM head to the word embeddings
        self.apply(self._init_weights)
        tie(self)

    def resize_token_embeddings(self, n):  # 4.15's behaviour: new rows initialised, the tie kept
        base = getattr(self, "bert", self)
        old = base.get_input_embeddings()
        new = torch.nn.Embedding(n, old.embedding_dim, padding_idx=old.padding_idx)
        self._init_weights(new)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight[:n]
        base.set_input_embeddings(new)
        out = self.get_output_embeddings() if hasattr(self, "get_output_embeddings") else None
        if out is not None:
            bias = torch.nn.Parameter(torch.zeros(n))
            with torch.no_grad():
                bias[: out.bias.shape[0]] = out.bias[:n]
            self.cls.predictions.bias = bias
            out.bias = bias
            out.out_features = n
            tie(self)
        self.config.vocab_size = n
        return new

    cls = med.BertPreTrainedModel
    if not hasattr(cls, "get_head_mask"):
        cls.get_head_mask = get_head_mask
    if not hasattr(cls, "invert_attention_mask"):
        cls.invert_attention_mask = invert_attention_mask
    cls.init_weights = init_weights
    cls.resize_token_embeddings = resize_token_embeddings
    for cls in (med.BertModel, med.BertLMHeadModel):
        cls.from_pretrained = classmethod(lambda c, _name, config=None, **kw: c(config=config, **kw))


def _init_process_group() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run(official_dir: str, image_size: int, batch: int, queue_size: int, steps: int, threads: int) -> dict:
    root = Path(official_dir).resolve()
    if not (root / "models" / "blip_pretrain.py").is_file() or not (root / "configs" / "bert_config.json").is_file():
        raise SystemExit(f"{root}: not a salesforce/BLIP checkout (needs models/blip_pretrain.py and "
                         "configs/bert_config.json)")
    import torch

    from blip_core.seeding import make_generator

    torch.set_num_threads(threads)
    install_shims()
    sys.path.insert(0, str(root))
    from models import med  # noqa: E402  (the official package)

    _patch_med(med)
    from models.blip_pretrain import BLIP_Pretrain

    _init_process_group()
    torch.manual_seed(0)
    model = BLIP_Pretrain(med_config=str(root / "configs" / "bert_config.json"), image_size=image_size,
                          vit="base", queue_size=queue_size)
    model.train()
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=3e-4,
                                  weight_decay=0.05)
    g = make_generator("cpu", 0)
    vocab = _vocab()
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        image = torch.randn(batch, 3, image_size, image_size, generator=g)
        words = torch.randint(104, BERT_VOCAB, (batch, 28), generator=g)
        captions = [" ".join(vocab[w] for w in row.tolist()) for row in words]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_ita, loss_itm, loss_lm = model(image, captions, alpha=0.4)
        (loss_ita + loss_itm + loss_lm).backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    return {"side": "official", "batch": batch, "image_size": image_size, "s_per_step": step,
            "pairs_per_s": batch / step, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "steps": steps, "threads": threads,
            "losses": [float(loss_ita), float(loss_itm), float(loss_lm)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-dir", required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=57600)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run(args.official_dir, args.image_size, args.batch, args.queue_size, args.steps, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
