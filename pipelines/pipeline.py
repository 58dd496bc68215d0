"""The BLIP CapFilt workflow as a Kubeflow (KFP v2) pipeline.

::

    start_run ──► ingest web/human/test ──► pretrain ──► finetune captioner ─┐
    (MLflow parent)                            │    └──► finetune filter ────┴─► capfilt ──► repretrain
                                               └──────────────────────────────────────────────────┐   │
                                 test split ──────────────────────────────────────────────► evaluate ◄┘
                                                                                               │
                                                                                           register
    end_run (exit handler): ends the MLflow parent run FINISHED or FAILED

The register step holds the promotion gate (:mod:`components.register`, as ``dvc repro``): it registers the
bootstrapped model only when it beats the noisy one by more than ``min_gain``, and moves the champion alias
only when it also beats the holder.

An optional labelled calibration sample is ingested with the other splits; capfilt chooses its filter
threshold on it (without one, ``capfilt.threshold``). The web source is ingested in ``ingest_parts`` parts, one
pod each (``ParallelFor`` over the indices a small plan step lists), joined by a merge step into one dataset: the
same samples and rejection counts whatever the number of parts (see :mod:`components.ingest_parts`).

Task settings (see :func:`make_pipeline`):

- resources: CPU/memory requests and limits per step; training, CapFilt and evaluate ask for
  ``gpus`` accelerators of type ``gpu_type`` (and a node with ``nvidia.com/gpu.product=gpu_product`` when
  given). With ``launcher="torchx"`` the training and CapFilt steps only launch and follow TorchX jobs and
  ask for 1 CPU and 2 GiB, the jobs' pods get the GPUs (pipeline parameter ``torchx``);
- retries: ingest and evaluate (idempotent: same input, same output) and the training and CapFilt steps
  (they resume from the newest checkpoint, or finished shards, in their output: with ``output_root`` on S3 a
  retry continues where the failed attempt stopped; with artifact outputs it starts over). Not retried:
  start_run (a retry would leave a second parent run) and register (it writes registry versions);
- caching: no step is cached by KFP, whose cache key sees only the source URI, not the data under it. Ingest
  does its own: its output location in ``output_root`` is content-addressed by the source's current listing
  (S3 ETags, local sizes and modification times) and the ingest settings, and a complete dataset found there
  is reused. Every other step logs to MLflow or writes to the registry, and takes the per-run context;
- every stage step gets the S3 credentials from the Kubernetes secret ``blip-s3-credentials``
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) and every step that talks to MLflow the pipeline's MLflow
  account from ``blip-mlflow-credentials`` (``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``);
  training, CapFilt and evaluate get a memory-backed ``/dev/shm`` (emptyDir, medium Memory) for the data loaders;
- the training and CapFilt steps read the cluster operator's launch policy (ConfigMap ``blip-launch-policy``,
  optional) into their environment: what the ``torchx`` parameter may ask for; every step with the MLflow
  credentials reads from it the tracking servers they may be sent to (``BLIP_ALLOWED_TRACKING_URIS``);
- every container runs as the image's non-root user (uid 1000), the only security settings kfp-kubernetes
  can compile (the KFP backend adds its own defaults: docs/deploy.md, "Hardening: trade-offs").
"""

from kfp import dsl, kubernetes

from pipelines import components as C
from pipelines import settings
from pipelines.settings import Resources


def _configure(task, res: Resources, *, name: str, image: str, gpu_type: str, gpu_product: str, retries: int = 0,
               cache: bool = False, secret: bool = True, mlflow: bool = True, policy: str = "tracking"):
    task.set_display_name(name)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        task.set_accelerator_type(gpu_type).set_accelerator_limit(res.gpus)
        if gpu_product:
            kubernetes.add_node_selector(task, "nvidia.com/gpu.product", gpu_product)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if res.shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=res.shm)
    if secret:
        kubernetes.use_secret_as_env(task, secret_name=settings.S3_SECRET,
                                     secret_key_to_env=dict(settings.S3_SECRET_KEYS))
    if mlflow:
        kubernetes.use_secret_as_env(task, secret_name=settings.MLFLOW_SECRET,
                                     secret_key_to_env=dict(settings.MLFLOW_SECRET_KEYS))
    if policy:
        from components.launch import POLICY_ENV
        from pipelines.steps import TRACKING_URIS_ENV

        keys = [*POLICY_ENV.values(), TRACKING_URIS_ENV] if policy == "launch" else [TRACKING_URIS_ENV]
        kubernetes.use_config_map_as_env(task, settings.LAUNCH_POLICY_CONFIG_MAP, {k: k for k in keys},
                                         optional=True)
    kubernetes.set_security_context(task, run_as_user=settings.RUN_AS_USER, run_as_group=settings.RUN_AS_USER,
                                    run_as_non_root=True)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s")
    task.set_caching_options(enable_caching=cache)
    if image != settings.DEFAULT_IMAGE or settings.IMAGE != settings.DEFAULT_IMAGE:
        task.set_container_image(image)
    return task


def _parallel_ingest(conf, split: str, source, parts, output_root, s3_endpoint, cfg: dict):
    """Ingest ``split`` as ``parts`` parts, one pod each (a ParallelFor over the planned part indices), joined by
    a merge step: the same dataset whatever the number of parts, but for its shard boundaries."""
    plan = conf(C.ingest_plan(parts=parts), "start", f"plan {split} ingest parts", secret=False, mlflow=False,
                policy="")
    with dsl.ParallelFor(plan.output, name=f"ingest-{split}-parts") as part:
        task = conf(C.ingest_part(split=split, source=source, part=part, parts=parts, output_root=output_root,
                                  s3_endpoint=s3_endpoint, **cfg), "ingest", f"ingest {split} part", retries=2,
                    mlflow=False, policy="")
    return conf(C.ingest_merge(split=split, source=source, parts=dsl.Collected(task.outputs["dataset"]),
                               output_root=output_root, s3_endpoint=s3_endpoint, **cfg), "ingest",
                f"ingest {split} merge", retries=2, mlflow=False, policy="")


SPLITS = ("human", "test", "calibration", "vqa_train", "vqa_test")  # ingested in one step each (web: in parts)


def _ingest_all(conf, sources: dict, ingest_parts, output_root, s3_endpoint, cfg: dict) -> dict:
    """The ingest task of every split, by split."""
    data = {}
    for split in SPLITS:
        data[split] = conf(C.ingest(split=split, source=sources[split], output_root=output_root,
                                    s3_endpoint=s3_endpoint, **cfg), "ingest", f"ingest {split}",
                           retries=2, mlflow=False, policy="")
    data["web"] = _parallel_ingest(conf, "web", sources["web"], ingest_parts, output_root, s3_endpoint, cfg)
    return {split: task.outputs["dataset"] for split, task in data.items()}


def _train_all(conf, data: dict, train: dict) -> dict:
    """Pre-training, captioner and filter, CapFilt, re-pre-training and both VQA fine-tunings: their tasks."""
    vocab = data["vqa_train"]
    t = {"pretrain": conf(C.pretrain(web=data["web"], human=data["human"], vocab=vocab, **train), "pretrain",
                          "pretrain", retries=2, policy="launch")}
    for task in ("captioner", "filter"):
        t[task] = conf(C.finetune(task=task, stage=f"finetune_{task}", pretrained=t["pretrain"].outputs["model"],
                                  data=data["human"], **train), "finetune", f"finetune {task}", retries=2,
                       policy="launch")
    t["capfilt"] = conf(C.capfilt(captioner=t["captioner"].outputs["model"], filter_model=t["filter"].outputs["model"],
                                  web=data["web"], human=data["human"], calibration=data["calibration"], **train),
                        "capfilt", "capfilt", retries=2, policy="launch")
    t["repretrain"] = conf(C.repretrain(data=t["capfilt"].outputs["dataset"], vocab=vocab, **train), "pretrain",
                           "repretrain", retries=2, policy="launch")
    for name, base in (("noisy", "pretrain"), ("capfilt", "repretrain")):
        t[f"vqa_{name}"] = conf(C.finetune(task="vqa", stage=f"finetune_vqa_{name}", pretrained=t[base].outputs["model"],
                                           data=data["vqa_train"], **train),
                                "finetune", f"finetune vqa {name}", retries=2, policy="launch")
    return t


def _evaluate_and_register(conf, data: dict, t: dict, ctx, cfg: dict, min_gain, registered_model) -> None:
    """Evaluate both pre-trained models (and their VQA fine-tunings), then the register step (its gate decides)."""
    ev = conf(C.evaluate(noisy=t["pretrain"].outputs["model"], bootstrapped=t["repretrain"].outputs["model"],
                         test=data["test"], capfilt_data=t["capfilt"].outputs["dataset"],
                         vqa_noisy=t["vqa_noisy"].outputs["model"], vqa_bootstrapped=t["vqa_capfilt"].outputs["model"],
                         vqa_test=data["vqa_test"], ctx=ctx, **cfg), "evaluate", "evaluate", retries=2)
    conf(C.register(model=t["repretrain"].outputs["model"], results=ev.outputs["results"], ctx=ctx,
                    registered_model=registered_model, min_gain=min_gain, **cfg), "register", "register")


def _configurer(*, image: str, launcher: str, gpu_type: str | None, gpus: int, gpu_product: str | None,
                retries: bool):
    """``conf(task, kind, name, **kw)``: :func:`_configure` with the compile-time settings and the resources of
    ``kind``."""
    if launcher not in settings.LAUNCHERS:
        raise ValueError(f"launcher must be one of {settings.LAUNCHERS}, got {launcher!r}")
    gpu_type = gpu_type or settings.GPU_TYPE
    gpu_product = settings.GPU_PRODUCT if gpu_product is None else gpu_product
    res = settings.resources(launcher, gpus)

    def conf(task, kind: str, name: str, **kw):
        if not retries:
            kw.pop("retries", None)
        return _configure(task, res[kind], name=name, image=image, gpu_type=gpu_type, gpu_product=gpu_product, **kw)

    return conf


def make_pipeline(*, image: str | None = None, launcher: str | None = None, gpu_type: str | None = None,
                  gpus: int = 1, gpu_product: str | None = None, retries: bool = True):
    """Build the ``@dsl.pipeline`` function with these compile-time settings (defaults: :mod:`pipelines.settings`).

    ``retries=False`` drops the retry policies (``blip pipeline run-local``: a local failure is reported at once
    instead of after the back-off).
    """
    image = image or settings.IMAGE
    launcher = launcher or settings.LAUNCHER
    conf = _configurer(image=image, launcher=launcher, gpu_type=gpu_type, gpus=gpus, gpu_product=gpu_product,
                       retries=retries)
    torchx_defaults = {**settings.TORCHX, "image": image}

    @dsl.pipeline(name=settings.PIPELINE_NAME,
                  description="BLIP pre-training with CapFilt bootstrapping: ingest, pretrain, finetune captioner "
                              "and filter, capfilt, repretrain, VQA fine-tuning of both pre-trained models, evaluate, register (MLflow-tracked).")
    def blip_capfilt(
        web_source: str = "",
        human_source: str = "",
        test_source: str = "",
        calibration_source: str = "",
        vqa_train_source: str = "",
        vqa_test_source: str = "",
        params_file: str = settings.PARAMS_FILE,
        config_overrides: list = [],  # noqa: B006 - a KFP parameter default, never mutated
        output_root: str = settings.OUTPUT_ROOT,
        s3_endpoint: str = settings.S3_ENDPOINT,
        mlflow_tracking_uri: str = settings.MLFLOW_URI,
        mlflow_experiment: str = settings.EXPERIMENT,
        mlflow_run_name: str = "",
        launcher: str = launcher,
        torchx: dict = torchx_defaults,
        min_gain: float = 0.0,
        registered_model: str = settings.REGISTERED_MODEL,
        ingest_parts: int = 1,
    ):
        """Parameters: ``*_source`` ('' = the config's ``sources.*``; ``vqa_*``: the VQA data the pre-trained
        models are fine-tuned and scored on; the calibration sample is optional: with
        none, CapFilt filters with ``capfilt.threshold``), ``params_file`` (in the image, local or
        s3) and ``config_overrides`` ("key=value" strings), ``output_root`` (s3 prefix for stage outputs, ''
        = KFP artifacts), tracking and S3 endpoints, ``launcher`` (inline | torchx), ``torchx`` (job settings,
        see components.launch), ``min_gain`` (mean R@1 the bootstrapped model must gain over the noisy one to
        be registered: the register stage's gate), ``registered_model`` (MLflow registry name),
        ``ingest_parts`` (pods ingesting the web source in parallel, each one part, then merged)."""
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        end = C.end_run(job_id=job_id, mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment)
        conf(end, "end", "end MLflow run", secret=False)
        with dsl.ExitHandler(end, name="blip-capfilt-run"):
            start = conf(C.start_run(job_id=job_id, run_name=mlflow_run_name, output_root=output_root,
                                     mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
                                     s3_endpoint=s3_endpoint), "start", "start MLflow run", secret=False)
            ctx = start.outputs["ctx"]
            cfg = {"params_file": params_file, "config_overrides": config_overrides}
            sources = {"web": web_source, "human": human_source, "test": test_source,
                       "calibration": calibration_source, "vqa_train": vqa_train_source,
                       "vqa_test": vqa_test_source}
            data = _ingest_all(conf, sources, ingest_parts, output_root, s3_endpoint, cfg)
            tasks = _train_all(conf, data, {**cfg, "ctx": ctx, "launcher": launcher, "torchx": torchx})
            _evaluate_and_register(conf, data, tasks, ctx, cfg, min_gain, registered_model)

    return blip_capfilt


blip_capfilt = make_pipeline()
