"""Conversion between blip_core checkpoints, Hugging Face BLIP directories and official salesforce/BLIP files.

* :func:`load_hf` reads a ``save_pretrained`` directory of ``BlipForConditionalGeneration`` (caption),
  ``BlipForImageTextRetrieval`` (retrieval) or ``BlipForQuestionAnswering`` (vqa, into a
  :class:`~blip_core.models.vqa.BlipVQA`); :func:`save_hf` writes one that ``transformers`` loads with no
  missing and no unexpected keys.
* :func:`load_official` reads a released ``.pth`` (weights under ``'model'``) with ``weights_only=True``,
  interpolates position embeddings to the target resolution and keeps momentum encoders and queues; a VQA file
  (``visual_encoder``, ``text_encoder`` and ``text_decoder`` only, as ``model_vqa.pth``) becomes a ``BlipVQA``.
  :func:`official_state_dict` / :func:`save_official` write the same layout back.

blip_core parameter names are the official ones, so official <-> blip_core is one-to-one; Hugging Face renames
the ViT (blip-reference 6.2) and leaves text keys unchanged. Every key is accounted for: an unexpected,
mis-shaped or missing key is a :class:`UserError` naming it, except for whole modules a source legitimately
lacks (a caption model has no text-encoder self-attention, projections or ITM head; a retrieval model has no
decoder self-attention or LM head). Those are initialised as listed in the returned ``Checkpoint.notes``.

Convention differences with Hugging Face, both reproducible through explicit options:

* ``BlipTextConfig`` defaults differ from BLIP's (8 heads, vision LayerNorm eps 1e-5, label smoothing 0):
  configs are mapped field by field both ways, never from defaults; :func:`save_hf` writes
  ``label_smoothing`` (0.1 = BLIP training) explicitly.
* HF's ITM path keeps ``[CLS]`` where official training and evaluation use ``[ENC]``: see
  ``itm_first_token`` in :func:`blip_core.generation.itm_scores`. Its VQA processor likewise leaves ``[CLS]``
  first in the question, where the official model (and :func:`blip_core.vqa.question_tokens`) puts ``[ENC]``.
* HF's VQA answer decoder reads question states through cross-attention keys/values of the *vision* width
  (``BlipConfig`` sets one ``encoder_hidden_size`` for both text stacks); the official one (and ``BlipVQA``)
  uses the text width. The two agree only when both widths are equal (``base``), the only VQA models that
  convert to or from HF.
"""

from blip_core.convert.hf import (
    DEFAULT_LABEL_SMOOTHING,
    HF_TASKS,
    config_from_hf,
    config_to_hf,
    hf_state_dict,
    load_hf,
    save_hf,
)
from blip_core.convert.keys import hf_to_official_key, official_to_hf_key
from blip_core.convert.official import (
    OFFICIAL_TASKS,
    is_official_vqa,
    load_official,
    official_state_dict,
    save_official,
)

__all__ = ["DEFAULT_LABEL_SMOOTHING", "HF_TASKS", "OFFICIAL_TASKS", "config_from_hf", "config_to_hf", "hf_state_dict",
           "hf_to_official_key", "is_official_vqa", "load_hf", "load_official", "official_state_dict",
           "official_to_hf_key", "save_hf", "save_official"]
