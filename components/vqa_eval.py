"""VQA evaluation for the evaluate stage: each VQA model's answers on a VQA test split, scored by VQAv2 accuracy.

``evaluate.vqa_inference: rank`` (the paper's numbers) picks each answer from the answer list of the model's
training data (``answer_list.json`` in the model directory, written by ``blip finetune --task vqa``):
first-token top-``vqa_k_test``, then the full answer loss (:func:`blip_core.vqa.rank_answers`).
``generate`` decodes free text (:func:`blip_core.vqa.generate_answers`). Accuracy is the VQAv2 one (min(matches/3,
1) over the ten leave-one-out subsets of the annotators' answers, after the official answer normalisation),
overall and per question kind; the majority-answer baseline always answers the most frequent training answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from blip_core.config import EvalConfig
from blip_core.data.samples import read_answer_list as loader_answer_list
from blip_core.data.webdataset_io import ANSWER_LIST_NAME
from blip_core.errors import UserError
from blip_core.eval.vqa import vqa_report
from blip_core.vqa import generate_answers, rank_answers
from components import storage

log = logging.getLogger(__name__)



def read_answer_list(model_dir: str) -> list[str]:
    """The answers in ``answer_list.json`` of a VQA model directory (written by ``blip finetune --task vqa``)."""
    if not storage.exists(storage.join(model_dir, ANSWER_LIST_NAME)):
        raise UserError(f"{model_dir}: no {ANSWER_LIST_NAME} (rank mode needs the answer list that fine-tuning "
                        "writes next to a VQA model; or set evaluate.vqa_inference=generate)")
    answers = loader_answer_list(model_dir)
    if not answers:
        raise UserError(f"{storage.join(model_dir, ANSWER_LIST_NAME)}: the answer list is empty")
    return answers


def model_answers(model, tokenizer, split, ecfg: EvalConfig, answer_list: Sequence[str] | None) -> list[str]:
    """One answer per question of ``split``, in batches of ``evaluate.vqa_batch_size`` questions."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    out: list[str] = []
    n = len(split.questions)
    bar = tqdm(total=n, desc="vqa", unit="q", dynamic_ncols=True, leave=False)
    for s in range(0, n, ecfg.vqa_batch_size):
        idx = split.image_index[s:s + ecfg.vqa_batch_size]
        images = split.images[idx].to(dev, non_blocking=True)
        questions = list(split.questions[s:s + ecfg.vqa_batch_size])
        if ecfg.vqa_inference == "rank":
            if not answer_list:
                raise UserError("evaluate.vqa_inference=rank needs an answer list")
            out += [a for a, _ in rank_answers(model, tokenizer, images, questions, answer_list,
                                              k=min(ecfg.vqa_k_test, len(answer_list)))]
        else:
            out += generate_answers(model, tokenizer, images, questions,
                                    decoding="beam" if ecfg.vqa_num_beams > 1 else "greedy",
                                    num_beams=ecfg.vqa_num_beams, max_length=ecfg.vqa_max_length,
                                    min_length=ecfg.vqa_min_length)
        bar.update(len(questions))
    bar.close()
    return out


def vqa_metrics(model, tokenizer, split, ecfg: EvalConfig,
                answer_list: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """VQAv2 accuracy (percent) overall and per question kind (``per_kind``); returns (metrics, answers)."""
    answers = model_answers(model, tokenizer, split, ecfg, answer_list)
    return vqa_report(answers, split.answers, split.kinds), answers


def majority_baseline(answer_list: Sequence[str], split) -> dict[str, Any]:
    """The accuracy of always giving the most frequent training answer (the first of the answer list)."""
    majority = answer_list[0]
    return {"answer": majority, **vqa_report([majority] * len(split.questions), split.answers, split.kinds)}


def examples(split, answers: dict[str, list[str]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` questions with every model's answer and the annotators' answers (the MLflow table)."""
    rows = []
    for i in range(min(n, len(split.questions))):
        rows.append({"question_id": str(split.question_ids[i]), "question": split.questions[i],
                     "kind": split.kinds[i] if split.kinds else "",
                     **{f"answer_{name}": a[i] for name, a in answers.items()},
                     "true_answers": ", ".join(split.answers[i])})
    return rows


def check_vqa_models(models: dict[str, str]) -> None:
    """Refuse, before any evaluation runs, a VQA model that is missing or not a VQA checkpoint."""
    from blip_core.checkpoint_io import ARCH_VQA
    from components import training

    for uri in models.values():
        config = storage.join(training.resolve_model_dir(uri), "config.json")
        if not storage.exists(config):
            raise UserError(f"{uri}: no VQA model there (no config.json)")
        try:
            arch = json.loads(storage.read_text(config)).get("architecture")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{config}: not a checkpoint config") from None
        if arch != ARCH_VQA:
            raise UserError(f"{uri}: not a VQA model (fine-tune one with blip finetune --task vqa)")


def evaluate_vqa(cfg, models: dict[str, str], test: str, device) -> tuple[dict[str, Any], dict[str, list[str]], Any]:
    """Score every VQA model (name -> checkpoint or stage output) on the VQA test split ``test``.

    Returns ``(metrics, answers, split)``: ``metrics`` holds ``models.<name>`` (accuracy and ``per_kind``), the
    majority-answer ``baseline`` (from the first model's answer list) and the split's size.
    """
    from blip_core.checkpoint_io import load_model_dir
    from blip_core.data.splits import load_vqa_split
    from blip_core.models.vqa import BlipVQA
    from components import training

    ecfg = cfg.evaluate
    splits: dict[int, Any] = {}
    out: dict[str, Any] = {"models": {}}
    answers: dict[str, list[str]] = {}
    split = None
    for name, uri in models.items():
        model_dir = training.resolve_model_dir(uri)
        with training.local_checkpoint(model_dir) as d:
            ckpt = load_model_dir(d, with_momentum=False, image_size=cfg.data.image_size or None)
        if not isinstance(ckpt.model, BlipVQA):
            raise UserError(f"{uri}: not a VQA model (fine-tune one with blip finetune --task vqa)")
        if ckpt.tokenizer is None:
            raise UserError(f"{uri}: the checkpoint has no tokenizer/ directory")
        answer_list = read_answer_list(model_dir) if ecfg.vqa_inference == "rank" else None
        model = ckpt.model.to(device).eval()
        size = model.cfg.vision.image_size
        if size not in splits:
            splits[size] = load_vqa_split(test, size)
        split = splits[size]
        log.info("evaluate VQA %s (%s) on %d questions", name, uri, len(split.questions))
        out["models"][name], answers[name] = vqa_metrics(model, ckpt.tokenizer, split, ecfg, answer_list)
        if "baseline" not in out:
            base_list = answer_list or (read_answer_list(model_dir) if storage.exists(
                storage.join(model_dir, ANSWER_LIST_NAME)) else None)
            if base_list:
                out["baseline"] = majority_baseline(base_list, split)
        del model, ckpt
    assert split is not None
    out["test"] = {"questions": len(split.questions), "images": int(split.images.shape[0]),
                   "inference": ecfg.vqa_inference}
    return out, answers, split
