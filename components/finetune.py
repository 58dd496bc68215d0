"""Fine-tuning stage: the captioner (LM with a prompt) or the filter (ITC + ITM, positives by image id).

``blip finetune --task captioner|filter --init CKPT --data URI [URI ...] --output URI [--val URI ...]``

``--task`` takes any fine-tuning task of :data:`components.tasks.TASKS`; everything task-specific (its
config section, objective, loader, trained parameters, validation metric) comes from the task object.

Both start from the pre-trained model (decoupled: each is fine-tuned separately from the same checkpoint,
as the paper's CapFilt) on clean human-annotated pairs, every caption of an image being its own pair. With
``data.image_size`` set (the paper: 384 px from a 224 px pre-training) the model is built at that resolution
and its ViT position embeddings are interpolated bicubically. The filter keeps the checkpoint's momentum
encoders and ITC queues, as the official retrieval fine-tuning does.

With ``--val`` (a held-out split of human-annotated data) the model is scored after every epoch and the best
epoch's model becomes ``model/``, as the official ``train_caption.py`` / ``train_retrieval.py`` keep their best
checkpoint: the captioner by CIDEr + BLEU-4 of its beam-search captions (``cider_bleu4``; the fine-tuning
prompt and the ``evaluate`` decoding settings), the filter by ``r_mean``, the mean of TR and IR recall@1/5/10
(ITC top-``evaluate.k_test`` re-ranked by ITM). Without it ``model/`` is the last epoch's model.
"""

from __future__ import annotations

import dataclasses

from blip_core.config import Config
from blip_core.errors import UserError
from blip_core.train import distributed as D
from components import training
from components.cli import run_as_process, run_distributed_main
from components.pretrain import NO_RESUME
from components.spec import Option, StageSpec
from components.tasks import finetune_tasks, get_task
from components.training import TrainStageResult


def run(cfg: Config, task: str, init: str, data: list[str], output: str, *, resume: bool = True,
        parent_run_id: str | None = None, val: list[str] | None = None, stage: str | None = None) -> TrainStageResult:
    """Fine-tune the checkpoint ``init`` for ``task`` (a name in :data:`components.tasks.TASKS`: the
    captioner, the filter or VQA); write the model under ``output``.

    ``val``: validation dataset directories; when given, the best epoch on them is the stage's model.
    ``stage`` names the MLflow run (default: the task's config section, e.g. ``finetune_vqa``).
    """
    spec = get_task(task)
    if not spec.finetune:
        raise UserError(f"{task}: not a fine-tuning task; choose one of {', '.join(finetune_tasks())}")
    spec.check(cfg)
    info = D.init_from_env()
    work = training.prepare_work(output, resume, info)
    model, tokenizer, momentum_state = training.load_init(init, cfg.data.image_size)
    model.set_grad_checkpointing(cfg.model.vision.grad_ckpt_layers)
    return training.run_training(
        cfg, spec, model=model, tokenizer=tokenizer, data=data, output=output, work=work, info=info,
        resume=resume, parent_run_id=parent_run_id, momentum_state=momentum_state, val=val, stage=stage,
        init_fingerprint=training.model_fingerprint(model))


SPEC = StageSpec(
    name="finetune", module=__name__, description=__doc__.split("\n\n")[0],
    inputs=(Option("--init", "pre-trained checkpoint or pretrain stage output", kind="input", required=True),
            Option("--data", "training dataset directories (human-annotated pairs; VQA data for --task vqa)",
                   kind="input", nargs="+", required=True),
            Option("--val", "validation dataset directories: score every epoch and keep the best one as model/",
                   kind="input", nargs="+", metavar="URI")),
    outputs=(Option("--output", "output directory or s3:// prefix", kind="output", required=True),),
    options=(Option("--task", "the fine-tuning task", choices=finetune_tasks, required=True),
             Option("--stage-name", "name of the MLflow stage run (default: the task's section)", param="stage"),
             NO_RESUME),
    config=("model", "data", "finetune_{task}"),
    extra=lambda v: tuple(get_task(v["task"]).validation_sections) if v["val"] else ())


def main(argv: list[str] | None = None) -> int:
    return run_distributed_main(SPEC.parser(), argv, lambda args, cfg: run(cfg, **SPEC.run_kwargs(args)),
                                lambda args, res: print(training.summary(f"finetune {args.task}", dataclasses.asdict(res))))


if __name__ == "__main__":
    run_as_process(main)
