"""KFP v2 lightweight components: one per pipeline step, each a single call into :mod:`pipelines.steps`.

KFP ships only a component function's source to the container, so every import is inside the body; the code
itself comes from the image (``base_image``: the project image, which has the package and kfp installed, hence
``install_kfp_package=False``: nothing is pip-installed at run time and an offline cluster works). Locally,
``kfp.local.SubprocessRunner(use_venv=False)`` runs the same command with the current interpreter.

Stage outputs are typed artifacts (Dataset, Model, Metrics, Markdown, HTML); the MLflow parent run and the
tracking/S3 settings travel in the ``ctx`` dict returned by :func:`start_run`.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.settings import IMAGE

component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def start_run(job_id: str, run_name: str, output_root: str, mlflow_tracking_uri: str, mlflow_experiment: str,
              s3_endpoint: str) -> NamedTuple("RunContext", [("parent_run_id", str), ("ctx", dict)]):
    """Create the MLflow parent run; return its id and the run context (env, run_root) for the stages."""
    from collections import namedtuple

    from pipelines import steps

    with steps.step("start_run"):
        parent, ctx = steps.start_run(job_id, run_name, output_root, mlflow_tracking_uri, mlflow_experiment,
                                      s3_endpoint)
    return namedtuple("RunContext", ["parent_run_id", "ctx"])(parent, ctx)


@component
def ingest(split: str, source: str, output_root: str, s3_endpoint: str, params_file: str, config_overrides: list,
           dataset: Output[Dataset], report: Output[Markdown]):
    """Ingest one split (web, human, test or the optional calibration sample) into checked WebDataset shards."""
    from pipelines import ingest_steps, steps

    with steps.step(f"ingest {split}"):
        ingest_steps.ingest(split, source, output_root, s3_endpoint, params_file, config_overrides, dataset, report)


@component
def ingest_plan(parts: int) -> list:
    """The part indices 0..parts-1 of the parallel web ingest."""
    from pipelines import ingest_steps, steps

    with steps.step("ingest plan"):
        return ingest_steps.ingest_plan(parts)


@component
def ingest_part(split: str, source: str, part: int, parts: int, output_root: str, s3_endpoint: str,
                params_file: str, config_overrides: list, dataset: Output[Dataset]):
    """Ingest one part of a split: the samples whose cleaned caption hashes into this part."""
    from pipelines import ingest_steps, steps

    with steps.step(f"ingest {split} part {part}"):
        ingest_steps.ingest_part(split, source, part, parts, output_root, s3_endpoint, params_file, config_overrides,
                          dataset)


@component
def ingest_merge(split: str, source: str, parts: Input[list[Dataset]], output_root: str, s3_endpoint: str,
                 params_file: str, config_overrides: list, dataset: Output[Dataset], report: Output[Markdown]):
    """Join the ingested parts of a split into one dataset (one manifest)."""
    from pipelines import ingest_steps, steps

    with steps.step(f"ingest {split} merge"):
        ingest_steps.ingest_merge(split, source, parts, output_root, s3_endpoint, params_file, config_overrides, dataset,
                           report)


@component
def pretrain(web: Input[Dataset], human: Input[Dataset], vocab: Input[Dataset], ctx: dict, params_file: str,
             config_overrides: list, launcher: str, torchx: dict, model: Output[Model], metrics: Output[Metrics]):
    """Pre-train BLIP (ITC + ITM + LM) on the noisy web pairs and the human pairs (the vocabulary also covers
    ``vocab``, the VQA training data)."""
    from pipelines import steps

    with steps.step("pretrain"):
        data = [steps.input_location(web), steps.input_location(human)]
        steps.train("pretrain", ctx, params_file, config_overrides, launcher, torchx, data, model, metrics,
                    vocab_data=[steps.input_location(vocab)])


@component
def finetune(task: str, stage: str, pretrained: Input[Model], data: Input[Dataset], ctx: dict, params_file: str,
             config_overrides: list, launcher: str, torchx: dict, model: Output[Model], metrics: Output[Metrics]):
    """Fine-tune the pre-trained model for ``task``: the captioner (LM) or the filter (ITC + ITM) on the human
    pairs, or VQA on the VQA training data; ``stage`` names the MLflow run and the output."""
    from pipelines import steps

    with steps.step(stage):
        steps.train(stage, ctx, params_file, config_overrides, launcher, torchx,
                    [steps.input_location(data)], model, metrics, init=steps.input_location(pretrained), task=task)


@component
def capfilt(captioner: Input[Model], filter_model: Input[Model], web: Input[Dataset], human: Input[Dataset],
            calibration: Input[Dataset], ctx: dict, params_file: str, config_overrides: list, launcher: str,
            torchx: dict, dataset: Output[Dataset], summary: Output[Markdown]):
    """Caption the web images, filter web and synthetic captions: the bootstrapped dataset."""
    from pipelines import steps

    with steps.step("capfilt"):
        calib = [] if calibration.metadata.get("empty") else [steps.input_location(calibration)]
        steps.capfilt(ctx, params_file, config_overrides, launcher, torchx, steps.input_location(captioner),
                      steps.input_location(filter_model), [steps.input_location(web)],
                      [steps.input_location(human)], dataset, summary, calibration=calib)


@component
def repretrain(data: Input[Dataset], vocab: Input[Dataset], ctx: dict, params_file: str, config_overrides: list,
               launcher: str, torchx: dict, model: Output[Model], metrics: Output[Metrics]):
    """Pre-train a new model from scratch on the bootstrapped dataset."""
    from pipelines import steps

    with steps.step("repretrain"):
        steps.train("repretrain", ctx, params_file, config_overrides, launcher, torchx,
                    [steps.input_location(data)], model, metrics, vocab_data=[steps.input_location(vocab)])


@component
def evaluate(noisy: Input[Model], bootstrapped: Input[Model], test: Input[Dataset], capfilt_data: Input[Dataset],
             vqa_noisy: Input[Model], vqa_bootstrapped: Input[Model], vqa_test: Input[Dataset],
             ctx: dict, params_file: str, config_overrides: list, results: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML]):
    """Compare both pre-trained models (and the VQA models fine-tuned from them) on the test splits."""
    from pipelines import settings, steps

    with steps.step("evaluate"):
        models = {settings.BASELINE: steps.input_location(noisy), settings.CANDIDATE: steps.input_location(bootstrapped)}
        vqa = {settings.BASELINE: steps.input_location(vqa_noisy),
               settings.CANDIDATE: steps.input_location(vqa_bootstrapped)}
        steps.evaluate(ctx, params_file, config_overrides, models, steps.input_location(test),
                       steps.input_location(capfilt_data), results, metrics, report, report_html, vqa=vqa,
                       vqa_test=steps.input_location(vqa_test))


@component
def register(model: Input[Model], results: Input[Artifact], ctx: dict, params_file: str, config_overrides: list,
             registered_model: str, min_gain: float) -> dict:
    """Register the bootstrapped model in MLflow if it beats the noisy one by more than ``min_gain``; the
    champion alias moves only if it beats the holder."""
    from pipelines import settings, steps

    with steps.step("register"):
        return steps.register(ctx, params_file, config_overrides, steps.input_location(model),
                              steps.input_location(results), settings.CANDIDATE, registered_model,
                              settings.BASELINE, min_gain)


@component
def end_run(job_id: str, mlflow_tracking_uri: str, mlflow_experiment: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: end the MLflow parent run with the pipeline's final state."""
    from pipelines import steps

    with steps.step("end_run"):
        steps.end_run(job_id, mlflow_tracking_uri, mlflow_experiment, status.state, status.error_message or "")
