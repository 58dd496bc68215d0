"""Evaluation metrics that need no model: VQA accuracy (:mod:`blip_core.eval.vqa`), caption scores, grammar
match and distinct-n (:mod:`blip_core.eval.captions`), the CapFilt filter on known noise
(:mod:`blip_core.eval.filter`), retrieval recall@K (:mod:`blip_core.eval.retrieval`)."""
