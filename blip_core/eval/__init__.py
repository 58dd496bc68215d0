"""Evaluation metrics that need no model: VQA accuracy (:mod:`blip_core.eval.vqa`)."""
