"""Training objectives built from :class:`BlipModel` and :mod:`blip_core.losses`.

* :class:`PretrainObjective`: ITC (momentum distillation, queues) + ITM (hard negatives) + LM.
* :class:`CaptionerObjective`: LM with a prompt whose tokens are not supervised (captioner fine-tuning).
* :class:`FilterObjective`: ITC with positives by image id + ITM with same-image-masked negatives
  (retrieval fine-tuning, used as CapFilt's filter), optionally drawn from every rank's batch.

Every objective is an :class:`Objective`, the whole interface the training loop drives: :meth:`Objective.inputs`
picks the ``forward`` arguments from a batch (its :attr:`~Objective.batch_keys`) and from the step's values
(``alpha``, ``generator``: :attr:`~Objective.step_keys`); ``forward`` computes losses only and says how many
samples it saw; :meth:`~Objective.enqueue` runs after each micro-batch's backward, :meth:`~Objective.after_step`
after each optimizer step (the BLIP objectives clamp the ITC temperature there, the contrastive ones also
update their momentum encoders); :meth:`~Objective.momentum_state` / :meth:`~Objective.load_momentum_state`
carry momentum encoders and queues through checkpoints. Objectives without momentum inherit no-op hooks.

The queue is filled with features gathered from every rank through ``gather_fn`` (identity in a single
process, so no process group is needed). Each image's cross-attention keys/values are computed once and reused
by its ITM pairs and its LM pass.

Hard negatives for ITM follow the official code of each stage: pre-training weighs them by the student-vs-
momentum ITC similarities of the local batch; retrieval fine-tuning by student-vs-student similarities, over
the local batch or (``negative_all_rank``) over every rank's, with every pair of the anchor's image excluded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from blip_core import losses
from blip_core.checkpoint_io import has_queues, load_momentum_state, momentum_state_dict
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
    samples: int  # samples of the batch (pairs, questions, ...): the loop's throughput count
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # itc / itm / lm
    image_feat_m: torch.Tensor | None = None
    text_feat_m: torch.Tensor | None = None
    image_idx: torch.Tensor | None = None
    # filter: image ids of the ITM hard negatives, the negative image of each text and the image of each
    # image's negative text (B,)
    neg_image_idx: torch.Tensor | None = None
    neg_text_idx: torch.Tensor | None = None


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


class Objective(nn.Module):
    """What the training loop drives: a loss over one batch, and the hooks around the optimizer step.

    ``self.model`` is the module whose weights are trained and saved. ``forward`` takes exactly the keyword
    arguments :meth:`inputs` returns and gives an :class:`ObjectiveOutput`. The hooks default to nothing, so an
    objective without momentum encoders, queues or a temperature only writes ``forward``.
    """

    model: nn.Module
    batch_keys: ClassVar[tuple[str, ...]] = ()  # the batch entries ``forward`` takes, by name
    step_keys: ClassVar[tuple[str, ...]] = ()  # of the loop's per-step values "alpha" and "generator"
    keeps_momentum: ClassVar[bool] = False  # momentum encoders/queues: saved beside the model, taken from an init

    def inputs(self, batch: dict[str, Any], *, alpha: float,
               generator: torch.Generator | None) -> dict[str, Any]:
        """The keyword arguments of ``forward`` for ``batch`` at a step with momentum-distillation ``alpha``
        and the step's ``generator`` for explicit random draws."""
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} needs the batch entries {missing}; the batch has {sorted(batch)}")
        step = {"alpha": alpha, "generator": generator}
        return {**{k: batch[k] for k in self.batch_keys}, **{k: step[k] for k in self.step_keys}}

    def enqueue(self, out: ObjectiveOutput) -> None:
        """After each micro-batch's backward (e.g. write momentum features into the queues)."""

    def after_step(self) -> None:
        """After each optimizer step (e.g. clamp the temperature, update momentum encoders)."""

    def momentum_state(self) -> dict[str, torch.Tensor] | None:
        """Momentum encoders and queues to save beside the model; ``None`` when the objective keeps none."""
        return None

    def load_momentum_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the momentum encoders/queues from a checkpoint's ``state`` (only with ``keeps_momentum``)."""
        raise TypeError(f"{type(self).__name__} keeps no momentum state")

    def log_values(self) -> dict[str, float]:
        """Values logged with the losses at every logged step (e.g. the ITC temperature)."""
        return {}


class _BlipObjective(Objective):
    """An objective over a :class:`BlipModel`: the ITC temperature is clamped after every step and logged."""

    model: BlipModel

    def after_step(self) -> None:
        self.model.clamp_temp()

    def log_values(self) -> dict[str, float]:
        return {"temp": self.model.temp.item()}


class _ContrastiveBase(_BlipObjective):
    """Shared machinery: momentum encoders, queues, ITC with soft targets, ITM with sampled negatives."""

    with_ids = False  # whether the queue also stores image ids (positives by image id)
    step_keys = ("alpha", "generator")
    keeps_momentum = True

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

    def after_step(self) -> None:
        super().after_step()
        self.momentum_update()

    def momentum_state(self) -> dict[str, torch.Tensor]:
        return momentum_state_dict(self.momentum_encoders, self.queue)

    def load_momentum_state(self, state: dict[str, torch.Tensor]) -> None:
        """As the official code, training from a checkpoint keeps its momentum encoders and queues (rather
        than fresh copies of the student and random queues); a state without queues leaves them random."""
        load_momentum_state(state, self.momentum_encoders, self.queue if has_queues(state) else None)

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

    def _itm(self, enc_ids, mask, cross, neg_image, neg_ids, neg_mask):
        """ITM over [positives; (text, negative image); (negative text, image)].

        ``neg_image`` (B,) is each text's negative image as a row of ``cross``; ``neg_ids``/``neg_mask`` are
        each image's negative text.
        """
        b = enc_ids.shape[0]
        arange = torch.arange(b, device=enc_ids.device)
        ids_all = torch.cat([enc_ids, enc_ids, neg_ids])  # (3B, L)
        mask_all = torch.cat([mask, mask, neg_mask])
        image_index = torch.cat([arange, neg_image, arange])  # (3B,) image row of each pair
        logits = self.model.itm_logits(ids_all, mask_all, cross.select(image_index))  # (3B, 2)
        return losses.itm_loss(logits, losses.itm_labels(b, enc_ids.device))


class PretrainObjective(_ContrastiveBase):
    """ITC + ITM + LM, each with weight 1, as BLIP pre-training."""

    batch_keys = ("image", "input_ids", "attention_mask")

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, generator: torch.Generator | None = None) -> ObjectiveOutput:
        """``image`` (B,3,H,W), ``input_ids``/``attention_mask`` (B,L) from the tokenizer ([CLS] first)."""
        m = self.model
        b = image.shape[0]
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._encode(image, input_ids, attention_mask)
        hard = torch.zeros(b, b + self.queue.size, device=image.device)
        hard[:, :b] = torch.eye(b, device=image.device)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, hard, hard)

        cross = m.cross_kv(image_embeds)  # shared by the ITM pairs and the LM pass
        enc_ids = with_first_token(input_ids, self.ids.enc)
        # negatives weighted by the student-vs-momentum similarities within the batch, as official pre-training
        w_t2i = losses.negative_weights(sim_t2i[:, :b].detach())
        w_i2t = losses.negative_weights(sim_i2t[:, :b].detach())
        neg_image = losses.sample_hard_negatives(w_t2i, generator)  # image index for each text
        neg_text = losses.sample_hard_negatives(w_i2t, generator)  # text index for each image
        loss_itm = self._itm(enc_ids, attention_mask, cross, neg_image, enc_ids[neg_text], attention_mask[neg_text])

        dec_ids = with_first_token(input_ids, self.ids.dec)
        logits, _ = m.decode(dec_ids, attention_mask, cross)
        loss_lm = losses.lm_loss(logits, lm_labels(dec_ids, attention_mask))

        return ObjectiveOutput(loss=loss_itc + loss_itm + loss_lm, samples=b,
                               parts={"itc": loss_itc, "itm": loss_itm, "lm": loss_lm},
                               image_feat_m=image_feat_m, text_feat_m=text_feat_m)


class FilterObjective(_ContrastiveBase):
    """ITC + ITM with positives defined by image id (several captions of one image are all positives).

    With ``negative_all_rank`` the ITM negatives are drawn from every rank's batch (features gathered with
    ``gather_fn``, image tokens with ``gather_grad_fn`` so gradients reach the rank that encoded them);
    ``rank`` locates this rank's rows among the gathered ones.
    """

    with_ids = True
    batch_keys = ("image", "input_ids", "attention_mask", "image_idx")

    def __init__(self, model: BlipModel, ids: SpecialIds, *, queue_size: int | None = None,
                 momentum: float | None = None, gather_fn: GatherFn | None = None,
                 gather_grad_fn: GatherFn | None = None, negative_all_rank: bool = False, rank: int = 0):
        super().__init__(model, ids, queue_size=queue_size, momentum=momentum, gather_fn=gather_fn)
        self.gather_grad_fn = gather_grad_fn or _identity
        self.negative_all_rank = negative_all_rank
        self.rank = rank

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, image_idx: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        m = self.model
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._encode(image, input_ids, attention_mask)

        idx = image_idx.view(-1, 1)  # (B, 1)
        idx_all = torch.cat([idx.T, self.queue.idx_queue.clone()], dim=1)  # (1, B+Q)
        positives = (idx == idx_all).float()  # (B, B+Q)
        hard = positives / positives.sum(dim=1, keepdim=True)
        loss_itc, _, _ = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, hard, hard)

        b = image.shape[0]
        enc_ids = with_first_token(input_ids, self.ids.enc)
        if self.negative_all_rank:
            world = (self.gather_fn(image_feat.detach()), self.gather_fn(text_feat.detach()),
                     self.gather_fn(image_idx))
            world_idx = world[2]
            w_i2t, w_t2i = self.negative_weights(image_feat, text_feat, image_idx, world, self._offset(b))
            neg_image = losses.sample_hard_negatives(w_t2i, generator)  # a row of the world batch for each text
            neg_text = losses.sample_hard_negatives(w_i2t, generator)
            neg_embeds = self.gather_grad_fn(image_embeds)[neg_image]  # (B, 1+N, D), gradients flow home
            cross = m.cross_kv(torch.cat([image_embeds, neg_embeds]))  # own images, then the negatives
            enc_ids, mask, world_ids, world_mask = self._gather_text(enc_ids, attention_mask)
            loss_itm = self._itm(enc_ids, mask, cross, b + torch.arange(b, device=image.device),
                                 world_ids[neg_text], world_mask[neg_text])
        else:
            world_idx = image_idx
            w_i2t, w_t2i = self.negative_weights(image_feat, text_feat, image_idx)
            neg_image = losses.sample_hard_negatives(w_t2i, generator)  # an image of the batch for each text
            neg_text = losses.sample_hard_negatives(w_i2t, generator)  # a text of the batch for each image
            loss_itm = self._itm(enc_ids, attention_mask, m.cross_kv(image_embeds), neg_image, enc_ids[neg_text],
                                 attention_mask[neg_text])
        return ObjectiveOutput(loss=loss_itc + loss_itm, samples=b, parts={"itc": loss_itc, "itm": loss_itm},
                               image_feat_m=image_feat_m, text_feat_m=text_feat_m, image_idx=image_idx,
                               neg_image_idx=world_idx[neg_image], neg_text_idx=world_idx[neg_text])

    @torch.no_grad()
    def negative_weights(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_idx: torch.Tensor,
                         world: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                         offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM sampling weights ``(w_i2t, w_t2i)`` of the official retrieval fine-tuning, each ``(B, C)``.

        Anchors are this rank's ``B`` pairs: student ITC features ``image_feat``/``text_feat`` ``(B, E)`` and
        image ids ``(B,)``. Candidates are ``world`` = (image features, text features, image ids) of ``C``
        pairs, this rank's at rows ``offset .. offset+B``; default the anchors themselves.
        ``w_i2t[b] = softmax(image_feat[b] . text_feat_c / temp)`` over the candidates ``c``, ``w_t2i``
        likewise, with every candidate showing the anchor's image (same image id) set to 0.
        """
        world_image, world_text, world_idx = world if world is not None else (image_feat, text_feat, image_idx)
        temp = self.model.temp
        b = image_feat.shape[0]
        same = image_idx.view(-1, 1) == world_idx.view(1, -1)  # (B, C)
        own = torch.zeros_like(same)
        own[:, offset:offset + b] = torch.eye(b, dtype=torch.bool, device=same.device)
        w_i2t = losses.negative_weights(image_feat.detach() @ world_text.T / temp, same, own=own)
        w_t2i = losses.negative_weights(text_feat.detach() @ world_image.T / temp, same, own=own)
        return w_i2t, w_t2i

    def _offset(self, b: int) -> int:
        """Row of this rank's first pair among the gathered ones (ranks may hold different batch sizes)."""
        sizes = self.gather_fn(torch.tensor([b], device=self.model.temp.device))  # a collective: every rank calls it
        return int(sizes[: self.rank].sum())

    def _gather_text(self, ids: torch.Tensor, mask: torch.Tensor):
        """This rank's and every rank's ``[ENC]`` ids and masks, padded to the longest length of any rank."""
        length = int(self.gather_fn(torch.tensor([ids.shape[1]], device=ids.device)).max())
        if ids.shape[1] < length:
            pad = length - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, pad), value=self.ids.pad)
            mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        return ids, mask, self.gather_fn(ids), self.gather_fn(mask)


class CaptionerObjective(_BlipObjective):
    """LM on captions prefixed by a prompt; the first ``prompt_len`` positions are not supervised (no momentum
    encoders in captioner fine-tuning)."""

    batch_keys = ("image", "input_ids", "attention_mask")

    def __init__(self, model: BlipModel, ids: SpecialIds, prompt_len: int = 0):
        super().__init__()
        self.model = model
        self.ids = ids
        self.prompt_len = prompt_len

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ObjectiveOutput:
        m = self.model
        cross = m.cross_kv(m.encode_image(image))
        dec_ids = with_first_token(input_ids, self.ids.dec)
        logits, _ = m.decode(dec_ids, attention_mask, cross)
        loss = losses.lm_loss(logits, lm_labels(dec_ids, attention_mask, self.prompt_len))
        return ObjectiveOutput(loss=loss, samples=image.shape[0], parts={"lm": loss})


def prompt_length(tokenizer, prompt: str) -> int:
    """Number of leading decoder positions a prompt occupies: ``len(tok(prompt)) - 1`` (drops [SEP])."""
    if not prompt:
        return 0
    ids, _ = tokenizer([prompt], max_length=64)
    return int(ids.shape[1]) - 1


class VQAObjective(Objective):
    """The official VQA answer loss over a :class:`~blip_core.models.vqa.BlipVQA`: each question's answers
    (``[DEC] answer [SEP]``) decoded from its question states, label-smoothed token sums weighted per answer
    (VQAv2: count / annotators), summed and divided by the number of questions. No momentum, no temperature."""

    batch_keys = ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "weights", "n")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor, weights: torch.Tensor,
                n: torch.Tensor) -> ObjectiveOutput:
        loss = self.model.answer_loss(image, question_ids, question_mask, answer_ids, answer_mask, weights, n)
        return ObjectiveOutput(loss=loss, samples=image.shape[0], parts={"vqa": loss})
