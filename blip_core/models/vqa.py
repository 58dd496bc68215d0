"""BLIP for visual question answering: image encoder, image-grounded question encoder, answer decoder.

As the official ``BLIP_VQA``:

* ``visual_encoder`` encodes the image;
* ``text_encoder`` encodes the question (``[ENC]`` at position 0) with cross-attention to the image tokens,
  giving the question states ``(B, L_q, H)``;
* ``text_decoder`` generates the answer (``[DEC] answer [SEP]``) with cross-attention to the question states,
  so its cross-attention keys/values read ``H``-wide inputs, not the ViT width.

Unlike :class:`~blip_core.models.blip.BlipModel`, the encoder and the decoder share nothing: both start from a
pre-trained BLIP (:meth:`BlipVQA.from_blip`) and are fine-tuned apart. The answer loss is the official one: each
answer's label-smoothed token sum, weighted per answer, summed and divided by the number of questions.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from blip_core.config import ModelConfig
from blip_core.losses import IGNORE_INDEX, LABEL_SMOOTHING, lm_loss
from blip_core.models.blip import BlipModel, TextDecoder, init_text_weights, require_vocab
from blip_core.models.text import CrossKV, KVCache, TextTransformer
from blip_core.models.vision import ImageEncoder

log = logging.getLogger(__name__)


class BlipVQA(nn.Module):
    """The VQA model. Attribute names follow the official checkpoint layout (``visual_encoder``,
    ``text_encoder``, ``text_decoder.{bert,cls}``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = require_vocab(cfg)
        self.visual_encoder = ImageEncoder(cfg.vision)
        self.text_encoder = TextTransformer(cfg.text, cfg.vision.width)  # reads the image tokens
        self.text_decoder = TextDecoder(cfg, encoder_width=cfg.text.hidden_size)  # reads the question states
        init_text_weights(cfg, self.text_encoder, self.text_decoder)
        self.init_notes: list[str] = []

    @classmethod
    def from_blip(cls, model: BlipModel) -> BlipVQA:
        """A VQA model initialised from a pre-trained :class:`BlipModel`, as the official code loads a
        pre-trained checkpoint into ``BLIP_VQA``.

        The ViT, the text encoder and the decoder are copied (so nothing is tied to ``model`` or between
        encoder and decoder); a tensor whose shape differs keeps its fresh initialisation: the decoder's
        cross-attention keys/values when the ViT width differs from the text hidden size (ViT-L). Those are
        listed in ``init_notes`` (and logged).
        """
        vqa = cls(model.cfg)
        source = model.state_dict()
        fresh = []
        with torch.no_grad():
            for name, t in vqa.state_dict().items():
                s = source.get(name)
                if s is not None and s.shape == t.shape:
                    t.copy_(s)
                else:
                    fresh.append(name)
        ref = next(model.parameters())
        vqa.to(device=ref.device)
        if fresh:
            note = (f"{len(fresh)} tensors keep their fresh initialisation (no tensor of that shape in the "
                    f"pre-trained model): {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}")
            vqa.init_notes.append(note)
            log.info("BlipVQA.from_blip: %s", note)
        vqa.train(model.training)
        return vqa

    # ------------------------------------------------------------------ forward parts
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> image tokens ``(B, 1+N, D_img)``."""
        return self.visual_encoder(image)

    def encode_question(self, image: torch.Tensor, question_ids: torch.Tensor,
                        question_mask: torch.Tensor, *, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Question states ``(B_q, L_q, H)``; ``question_ids[:, 0]`` should be ``[ENC]``.

        ``image`` is ``(B_q, 3, H, W)``, or one image ``(1, 3, H, W)`` asked all the questions (its keys/values
        are then read by every question in place). ``image_embeds`` skips the ViT.
        """
        if image_embeds is None:
            image_embeds = self.encode_image(image)
        cross = self.text_encoder.cross_kv(image_embeds)
        return self.text_encoder(question_ids, question_mask, cross)[0]

    def question_cross(self, question_states: torch.Tensor, question_mask: torch.Tensor | None) -> CrossKV:
        """The answer decoder's cross-attention keys/values of each question, computed once.

        ``question_mask`` hides the question's padding; None attends to every position (the official
        ``generate`` and ``transformers`` pass an all-ones mask).
        """
        return self.text_decoder.bert.cross_kv(question_states, question_mask)

    def decode(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, cross: CrossKV,
               past: KVCache | None = None, use_cache: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        """Answer decoder logits ``(B_a, L_a, V)``; ``answer_ids[:, 0]`` should be ``[DEC]``."""
        return self.text_decoder(answer_ids, answer_mask, cross, past=past, use_cache=use_cache)

    def answer_losses(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, cross: CrossKV, *,
                      label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
        """Each answer's label-smoothed token-sum loss ``(B_a,)`` (padding ignored), as the official
        ``reduction='none'``; ``cross`` rows map to answers by its index or by folding."""
        logits, _ = self.decode(answer_ids, answer_mask, cross)
        labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
        return lm_loss(logits, labels, label_smoothing, reduction="sum_per_sequence")

    def answer_loss(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                    answer_ids: torch.Tensor, answer_mask: torch.Tensor, weights: torch.Tensor, n: torch.Tensor,
                    *, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
        """The official VQA training loss: ``sum(weights * per_answer_loss) / B``.

        Args:
            image: ``(B, 3, H, W)``; question_ids, question_mask: ``(B, L_q)`` with ``[ENC]`` first.
            answer_ids, answer_mask: ``(A, L_a)``, ``[DEC] ... [SEP]``, the answers of all questions
                concatenated in question order.
            weights: ``(A,)`` float weight of each answer; n: ``(B,)`` long number of answers per question.
        """
        b = image.shape[0]
        n = torch.as_tensor(n, dtype=torch.long, device=answer_ids.device)
        if n.shape != (b,) or int(n.sum()) != answer_ids.shape[0] or weights.shape != (answer_ids.shape[0],):
            raise ValueError(f"n {tuple(n.shape)} must give one count per question ({b}) summing to the number "
                             f"of answers {answer_ids.shape[0]}, and weights one value per answer "
                             f"(got {tuple(weights.shape)})")
        states = self.encode_question(image, question_ids, question_mask)  # (B, L_q, H)
        owner = torch.repeat_interleave(torch.arange(b, device=answer_ids.device), n)  # (A,) question of each
        cross = self.question_cross(states, question_mask).select(owner)
        per_answer = self.answer_losses(answer_ids, answer_mask, cross, label_smoothing=label_smoothing)
        return (weights.to(per_answer) * per_answer).sum() / b

    # ------------------------------------------------------------------ training helpers
    def set_grad_checkpointing(self, last_k: int) -> None:
        """Gradient checkpointing of the last ``last_k`` ViT blocks."""
        self.visual_encoder.set_grad_checkpointing(last_k)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (position and class embeddings)."""
        return {"visual_encoder.pos_embed", "visual_encoder.cls_token"}


def is_vqa(model: nn.Module) -> bool:
    """Whether ``model`` is a VQA model (has the question-reading answer decoder)."""
    return isinstance(model, BlipVQA)
