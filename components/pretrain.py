"""Pre-training stage: ITC + ITM + LM on web (+ human) pairs; also the re-pretraining on CapFilt data.

``blip pretrain --data URI [URI ...] --output URI [--init CKPT | --vit-init FILE --bert-init DIR]``

From scratch (default), from a blip_core checkpoint (``--init``: a checkpoint directory or a stage output,
local or s3), or as the paper with the ViT from an ImageNet timm checkpoint file and the text transformer from
a BERT directory. Re-pretraining on the bootstrapped data is the same stage with a fresh model (the paper
trains a new model rather than continuing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from blip_core.config import Config
from blip_core.pretrained import load_bert_weights, load_vit_weights
from blip_core.train import distributed as D
from components import storage, training
from components.cli import run_as_process, run_distributed_main
from components.spec import Option, StageSpec
from components.tasks import get_task
from components.training import TrainStageResult

log = logging.getLogger(__name__)


def run(cfg: Config, data: list[str], output: str, *, init: str | None = None, vit_init: str | None = None,
        bert_init: str | None = None, resume: bool = True, parent_run_id: str | None = None,
        stage: str = "pretrain", vocab_data: list[str] | None = None) -> TrainStageResult:
    """Pre-train BLIP on the dataset directories ``data`` and write the model under ``output``.

    ``vocab_data``: more dataset directories whose texts (captions, VQA questions and answers) the corpus-built
    vocabulary (``model.tokenizer: corpus``) also covers, e.g. the VQA data the model is fine-tuned on later.
    """
    task = get_task("pretrain")
    task.check(cfg)
    info = D.init_from_env()
    torch.manual_seed(cfg.pretrain.seed)  # the same initial weights on every rank and every run
    work = training.prepare_work(output, resume, info)
    momentum_state = None
    if init:
        model, tokenizer, momentum_state = training.load_init(init)
    else:
        tokenizer = training.make_tokenizer(cfg, [*data, *(vocab_data or [])], work, info)
        model = training.new_model(cfg, tokenizer)
        with storage.local_copy(vit_init) if vit_init else contextlib.nullcontext() as vit_path:
            if vit_path is not None:
                ignored = load_vit_weights(model, vit_path)
                log.info("ViT initialised from %s (ignored: %s)", vit_init, ignored)
        with training.local_checkpoint(bert_init) if bert_init else contextlib.nullcontext() as bert_path:
            if bert_path is not None:
                unused = load_bert_weights(model, bert_path)
                log.info("text transformer initialised from %s (unused BERT tensors: %s)", bert_init, unused)
    return training.run_training(
        cfg, task, model=model, tokenizer=tokenizer, data=data, output=output, work=work, info=info,
        resume=resume, parent_run_id=parent_run_id, stage=stage, momentum_state=momentum_state,
        init_fingerprint=training.model_fingerprint(model) if init else None)


NO_RESUME = Option("--no-resume", "start over even if the output holds a checkpoint", action="store_true",
                   param="resume", invert=True)

SPEC = StageSpec(
    name="pretrain", module=__name__, description=__doc__.split("\n\n")[0],
    inputs=(Option("--data", "dataset directories (local or s3://)", kind="input", nargs="+", required=True),
            Option("--init", "start from this blip_core checkpoint or stage output", kind="input"),
            Option("--vit-init", "timm ViT state dict file (.pth/.safetensors)", kind="input"),
            Option("--bert-init", "Hugging Face BERT directory (save_pretrained)", kind="input"),
            Option("--vocab-data", "more dataset directories whose texts the corpus-built vocabulary covers "
                   "(e.g. VQA data)", kind="input", nargs="+", metavar="URI")),
    outputs=(Option("--output", "output directory or s3:// prefix", kind="output", required=True),),
    options=(Option("--stage-name", "name of the MLflow stage run (e.g. repretrain)", default="pretrain",
                    param="stage"),
             NO_RESUME),
    config=("model", "data", "pretrain"))


def main(argv: list[str] | None = None) -> int:
    return run_distributed_main(SPEC.parser(), argv, lambda args, cfg: run(cfg, **SPEC.run_kwargs(args)),
                                lambda args, res: print(training.summary(args.stage_name, dataclasses.asdict(res))))


if __name__ == "__main__":
    run_as_process(main)
