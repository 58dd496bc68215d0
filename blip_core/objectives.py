"""Training objectives built from :class:`BlipModel` and :mod:`blip_core.losses`.

* :class:`PretrainObjective`: ITC (momentum distillation, queues) + ITM (hard negatives) + LM.
* :class:`CaptionerObjective`: LM with a prompt whose tokens are not supervised (captioner fine-tuning).
* :class:`FilterObjective`: ITC with positives by image id + ITM with same-image-masked negatives
  (retrieval fine-tuning, used as CapFilt's filter).

An objective's ``forward`` computes losses only. The training step calls :meth:`momentum_update` after the
optimizer step and :meth:`enqueue` with the returned momentum features; the queue is filled with features
gathered from every rank through ``gather_fn`` (identity in a single process, so no process group is needed).
Each image's cross-attention keys/values are computed once and reused by its ITM pairs and its LM pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from blip_core import losses
from blip_core.losses import IGNORE_INDEX
from blip_core.models.blip import BlipModel
from blip_core.models.momentum import FeatureQueue, MomentumEncoders

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the objectives write at position 0 and ignore in labels."""

    cls: int
    enc: int
    dec: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        return cls(cls=tok.cls_id, enc=tok.enc_id, dec=tok.dec_id, pad=tok.pad_id)


@dataclass
class ObjectiveOutput:
    """Losses of one forward (``loss`` is their sum) and what the step needs afterwards."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # itc / itm / lm
    image_feat_m: torch.Tensor | None = None
    text_feat_m: torch.Tensor | None = None
    image_idx: torch.Tensor | None = None


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """A copy of ``input_ids`` whose position 0 is ``token_id``."""
    out = input_ids.clone()
    out[:, 0] = token_id
    return out


def lm_labels(decoder_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
    """Labels for the LM loss: padding and the first ``prompt_len`` positions set to ``IGNORE_INDEX``."""
    labels = decoder_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_len:
        labels[:, :prompt_len] = IGNORE_INDEX
    return labels


class _ContrastiveBase(nn.Module):
    """Shared machinery: momentum encoders, queues, ITC with soft targets, ITM with sampled negatives."""

    with_ids = False  # whether the queue also stores image ids (positives by image id)

    def __init__(self, model: BlipModel, ids: SpecialIds, *, queue_size: int | None = None,
                 momentum: float | None = None, gather_fn: GatherFn | None = None):
        super().__init__()
        self.model = model
        self.ids = ids
        self.momentum = model.cfg.momentum if momentum is None else momentum
        self.momentum_encoders = MomentumEncoders(model)
        self.queue = FeatureQueue(model.cfg.embed_dim, queue_size or model.cfg.queue_size, with_ids=self.with_ids)
        self.gather_fn = gather_fn or _identity

    def _encode(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Image tokens, student ITC features and momentum ITC features of a batch."""
        m = self.model
        image_embeds = m.encode_image(image)  # (B, 1+N, D)
        text_ids = with_first_token(input_ids, self.ids.cls)
        image_feat = m.image_features(image_embeds)  # (B, E)
        text_feat = m.text_features(m.encode_text(text_ids, attention_mask))  # (B, E)
        image_feat_m = self.momentum_encoders.image_features(image)
        text_feat_m = self.momentum_encoders.text_features(text_ids, attention_mask)
        return image_embeds, image_feat, text_feat, image_feat_m, text_feat_m

    @torch.no_grad()
    def momentum_update(self) -> None:
        self.momentum_encoders.update(self.model, self.momentum)

    @torch.no_grad()
    def enqueue(self, out: ObjectiveOutput) -> None:
        """Gather the momentum features of all ranks and write them into the queues."""
        idx = self.gather_fn(out.image_idx) if self.queue.with_ids else None
        self.queue.enqueue(self.gather_fn(out.image_feat_m), self.gather_fn(out.text_feat_m), idx)

    def _itc(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, hard_i2t, hard_t2i):
        """ITC against [batch momentum features | queue]; returns the loss and the student similarities."""
        temp = self.model.temp
        with torch.no_grad():
            image_all = torch.cat([image_feat_m.T, self.queue.image_queue.clone()], dim=1)  # (E, B+Q)
            text_all = torch.cat([text_feat_m.T, self.queue.text_queue.clone()], dim=1)  # (E, B+Q)
            targets_i2t = losses.soft_targets(image_feat_m @ text_all / temp, hard_i2t, alpha)
            targets_t2i = losses.soft_targets(text_feat_m @ image_all / temp, hard_t2i, alpha)
        sim_i2t = image_feat @ text_all / temp  # (B, B+Q)
        sim_t2i = text_feat @ image_all / temp  # (B, B+Q)
        return losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i), sim_i2t, sim_t2i

    def _itm(self, enc_ids, mask, cross, sim_i2t, sim_t2i, same, generator):
        """ITM over [positives; (text, hard-negative image); (hard-negative text, image)]."""
        b = enc_ids.shape[0]
        w_t2i = losses.negative_weights(sim_t2i[:, :b].detach(), same)
        w_i2t = losses.negative_weights(sim_i2t[:, :b].detach(), same)
        neg_image = losses.sample_hard_negatives(w_t2i, generator)  # image index for each text
        neg_text = losses.sample_hard_negatives(w_i2t, generator)  # text index for each image
        arange = torch.arange(b, device=enc_ids.device)
        ids_all = torch.cat([enc_ids, enc_ids, enc_ids[neg_text]])  # (3B, L)
        mask_all = torch.cat([mask, mask, mask[neg_text]])
        image_index = torch.cat([arange, neg_image, arange])  # (3B,) image row of each pair
        logits = self.model.itm_logits(ids_all, mask_all, cross.select(image_index))  # (3B, 2)
        return losses.itm_loss(logits, losses.itm_labels(b, enc_ids.device))


class PretrainObjective(_ContrastiveBase):
    """ITC + ITM + LM, each with weight 1, as BLIP pre-training."""

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, generator: torch.Generator | None = None, **_) -> ObjectiveOutput:
        """``image`` (B,3,H,W), ``input_ids``/``attention_mask`` (B,L) from the tokenizer ([CLS] first)."""
        m = self.model
        b = image.shape[0]
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._encode(image, input_ids, attention_mask)
        hard = torch.zeros(b, b + self.queue.size, device=image.device)
        hard[:, :b] = torch.eye(b, device=image.device)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, hard, hard)

        cross = m.cross_kv(image_embeds)  # shared by the ITM pairs and the LM pass
        enc_ids = with_first_token(input_ids, self.ids.enc)
        loss_itm = self._itm(enc_ids, attention_mask, cross, sim_i2t, sim_t2i, None, generator)

        dec_ids = with_first_token(input_ids, self.ids.dec)
        logits, _ = m.decode(dec_ids, attention_mask, cross)
        loss_lm = losses.lm_loss(logits, lm_labels(dec_ids, attention_mask))

        return ObjectiveOutput(loss=loss_itc + loss_itm + loss_lm,
                               parts={"itc": loss_itc, "itm": loss_itm, "lm": loss_lm},
                               image_feat_m=image_feat_m, text_feat_m=text_feat_m)


class FilterObjective(_ContrastiveBase):
    """ITC + ITM with positives defined by image id (several captions of one image are all positives)."""

    with_ids = True

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, image_idx: torch.Tensor, generator: torch.Generator | None = None,
                **_) -> ObjectiveOutput:
        m = self.model
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._encode(image, input_ids, attention_mask)

        idx = image_idx.view(-1, 1)  # (B, 1)
        idx_all = torch.cat([idx.T, self.queue.idx_queue.clone()], dim=1)  # (1, B+Q)
        positives = (idx == idx_all).float()  # (B, B+Q)
        hard = positives / positives.sum(dim=1, keepdim=True)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, hard, hard)

        cross = m.cross_kv(image_embeds)
        enc_ids = with_first_token(input_ids, self.ids.enc)
        same = idx == idx.T  # (B, B)
        loss_itm = self._itm(enc_ids, attention_mask, cross, sim_i2t, sim_t2i, same, generator)
        return ObjectiveOutput(loss=loss_itc + loss_itm, parts={"itc": loss_itc, "itm": loss_itm},
                               image_feat_m=image_feat_m, text_feat_m=text_feat_m, image_idx=image_idx)


class CaptionerObjective(nn.Module):
    """LM on captions prefixed by a prompt; the first ``prompt_len`` positions are not supervised."""

    def __init__(self, model: BlipModel, ids: SpecialIds, prompt_len: int = 0):
        super().__init__()
        self.model = model
        self.ids = ids
        self.prompt_len = prompt_len

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **_) -> ObjectiveOutput:
        m = self.model
        cross = m.cross_kv(m.encode_image(image))
        dec_ids = with_first_token(input_ids, self.ids.dec)
        logits, _ = m.decode(dec_ids, attention_mask, cross)
        loss = losses.lm_loss(logits, lm_labels(dec_ids, attention_mask, self.prompt_len))
        return ObjectiveOutput(loss=loss, parts={"lm": loss})

    def momentum_update(self) -> None:  # no momentum encoders in captioner fine-tuning
        pass

    def enqueue(self, out: ObjectiveOutput) -> None:
        pass


def prompt_length(tokenizer, prompt: str) -> int:
    """Number of leading decoder positions a prompt occupies: ``len(tok(prompt)) - 1`` (drops [SEP])."""
    if not prompt:
        return 0
    ids, _ = tokenizer([prompt], max_length=64)
    return int(ids.shape[1]) - 1
