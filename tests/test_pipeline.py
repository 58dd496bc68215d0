"""The Kubeflow pipeline: compiled YAML settings, the committed copy, the CLI, and whole runs with kfp.local."""

import json
import socket
from pathlib import Path

import pytest
import yaml

from blip_core.errors import UserError
from components.cli import main as blip
from pipelines import cli, settings
from pipelines.pipeline import make_pipeline

INGEST_EXECUTORS = ("exec-ingest", "exec-ingest-2", "exec-ingest-3", "exec-ingest-4", "exec-ingest-5",
                    "exec-ingest-part", "exec-ingest-merge")
# finetune, -2: the captioner and the filter; -3, -4: VQA from the noisy and the CapFilt pre-trained model
FINETUNE_EXECUTORS = ("exec-finetune", "exec-finetune-2", "exec-finetune-3", "exec-finetune-4")
STAGE_EXECUTORS = (*INGEST_EXECUTORS, "exec-pretrain", *FINETUNE_EXECUTORS, "exec-capfilt",
                   "exec-repretrain", "exec-evaluate", "exec-register")
GPU_EXECUTORS = ("exec-pretrain", *FINETUNE_EXECUTORS, "exec-capfilt", "exec-repretrain", "exec-evaluate")
TRAIN_EXECUTORS = ("exec-pretrain", *FINETUNE_EXECUTORS, "exec-capfilt", "exec-repretrain")


def _compile(tmp_path, name="p.yaml", **kw):
    path = cli.compile_pipeline(tmp_path / name, make_pipeline(**kw) if kw else None)
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "pipeline spec + kubernetes platform spec"
    return docs


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root, exit handler, condition), by task name."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("compiled"))


def test_resources_per_step(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    for ex in executors.values():
        c = ex["container"]
        assert c["image"] == settings.DEFAULT_IMAGE
        assert "pip install" not in " ".join(c["command"])  # install_kfp_package=False: kfp comes with the image
        assert c["resources"]["resourceCpuLimit"] and c["resources"]["resourceMemoryLimit"]
    for name in GPU_EXECUTORS:
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert res["resourceCpuLimit"] == "8" and res["resourceMemoryLimit"] == "32Gi"
    for name in ("exec-ingest", "exec-register", "exec-start-run", "exec-end-run"):
        assert "accelerator" not in executors[name]["container"]["resources"]


def test_retries_caching_gate_and_exit_handler(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    retried = {n for n, t in tasks.items() if "retryPolicy" in t}
    assert retried == {"ingest", "ingest-2", "ingest-3", "ingest-4", "ingest-5", "ingest-part", "ingest-merge",
                       "pretrain", "finetune", "finetune-2", "finetune-3", "finetune-4", "capfilt", "repretrain",
                       "evaluate"}
    assert tasks["evaluate"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["pretrain"]["retryPolicy"]["backoffDuration"] == "60s"
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == set()  # KFP's cache key cannot see new data under an unchanged URI; ingest keys its own
    # the promotion gate is the register stage's own (as with dvc repro): no KFP condition, min_gain goes to it
    assert not any(t.get("triggerPolicy", {}).get("condition") for t in tasks.values())
    assert tasks["register"]["inputs"]["parameters"]["min_gain"]["componentInputParameter"] == "pipelinechannel--min_gain"
    assert "evaluate" in tasks["register"]["dependentTasks"]
    assert tasks["end-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert {t["taskInfo"]["name"] for t in tasks.values()} >= {"ingest human", "ingest web part", "ingest web merge",
                                                               "finetune captioner", "repretrain",
                                                               "finetune vqa noisy", "finetune vqa capfilt"}
    # the web source is ingested in `ingest_parts` parts: a ParallelFor over the planned indices, then the merge
    loop = next(t for t in tasks.values() if "iteratorPolicy" in t or "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("ingest-plan-Output")
    assert loop["taskInfo"]["name"] == "ingest-web-parts" and len(tasks["ingest-merge"]["dependentTasks"]) == 1
    assert spec["root"]["inputDefinitions"]["parameters"]["ingest_parts"]["defaultValue"] == 1
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["mlflow_tracking_uri"]["defaultValue"] == settings.MLFLOW_URI
    assert params["s3_endpoint"]["defaultValue"] == settings.S3_ENDPOINT
    assert params["torchx"]["defaultValue"]["queue"] == "blip"
    assert params["torchx"]["defaultValue"]["service_account"] == "blip-trainer"
    assert params["torchx"]["defaultValue"]["namespace"] == "blip-jobs"
    assert params["torchx"]["defaultValue"]["secrets"] == ["blip-s3-credentials", "blip-mlflow-credentials"]
    # the parent MLflow run id reaches every stage through the start step's context
    for name in ("pretrain", "finetune", "capfilt", "repretrain", "evaluate"):
        ctx = tasks[name]["inputs"]["parameters"]["ctx"]["taskOutputParameter"]
        assert ctx == {"outputParameterKey": "ctx", "producerTask": "start-run"}


def test_secret_and_volumes(compiled):
    _, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in STAGE_EXECUTORS:
        secrets = {s["secretName"]: s for s in k8s[name]["secretAsEnv"]}
        secret = secrets["blip-s3-credentials"]
        assert {(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}
    # MLflow requires a user: every step that talks to it gets the pipeline's account, and only from a secret
    for name in set(k8s) - {*INGEST_EXECUTORS, "exec-ingest-plan"}:
        secrets = {s["secretName"]: s for s in k8s[name]["secretAsEnv"]}
        assert {(k["secretKey"], k["envVar"]) for k in secrets["blip-mlflow-credentials"]["keyToEnv"]} == {
            ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
            ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD")}
    for name in INGEST_EXECUTORS:
        assert {s["secretName"] for s in k8s[name]["secretAsEnv"]} == {"blip-s3-credentials"}
    assert "secretAsEnv" not in k8s["exec-ingest-plan"]  # it only counts
    for name in GPU_EXECUTORS:
        (shm,) = k8s[name]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory" and shm["sizeLimit"] == "8Gi"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[name]["tolerations"]
    assert "emptyDirMounts" not in k8s["exec-ingest"]


def test_torchx_variant_moves_gpus_to_the_jobs(tmp_path):
    spec, platform = _compile(tmp_path, launcher="torchx", image="reg.example.com/blip-capfilt:0.1.0",
                              gpu_product="NVIDIA-H100-80GB-HBM3")
    executors = spec["deploymentSpec"]["executors"]
    for name in TRAIN_EXECUTORS:
        assert "accelerator" not in executors[name]["container"]["resources"]
    assert executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert {e["container"]["image"] for e in executors.values()} == {"reg.example.com/blip-capfilt:0.1.0"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["launcher"]["defaultValue"] == "torchx"
    assert params["torchx"]["defaultValue"]["image"] == "reg.example.com/blip-capfilt:0.1.0"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-evaluate"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_committed_yaml_is_not_stale(tmp_path):
    fresh = cli.compile_pipeline(tmp_path / "fresh.yaml", make_pipeline(
        image=settings.DEFAULT_IMAGE, launcher="inline", gpu_type="nvidia.com/gpu", gpus=1, gpu_product=""))
    assert cli.COMMITTED_YAML.read_text() == fresh.read_text(), (
        "pipelines/blip_capfilt.yaml is stale: run `blip pipeline compile` and commit it")


def test_params_are_typed():
    p = cli.parse_params(["min_gain=0.5", "config_overrides=[\"pretrain.epochs=2\"]", "torchx.nodes=4",
                          "web_source=toyweb://?split=web&n=10"], ["pretrain.lr=1e-4"])
    assert p["min_gain"] == 0.5 and p["torchx"]["nodes"] == 4 and p["torchx"]["queue"] == "blip"
    assert p["config_overrides"] == ["pretrain.epochs=2", "pretrain.lr=1e-4"]
    assert p["web_source"] == "toyweb://?split=web&n=10"
    with pytest.raises(UserError, match="unknown pipeline parameter 'nope'"):
        cli.parse_params(["nope=1"])
    with pytest.raises(UserError, match="min_gain"):
        cli.parse_params(["min_gain=lots"])


def test_compile_cli_writes_yaml(tmp_path, capsys):
    assert blip(["pipeline", "compile", "--output", str(tmp_path / "x.yaml"), "--gpus", "2"]) == 0
    spec = next(yaml.safe_load_all((tmp_path / "x.yaml").read_text()))
    assert spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "2"


def test_submit_to_a_closed_port_is_one_clear_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = blip(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}", "--param", "min_gain=0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("blip pipeline: error: cannot reach the Kubeflow Pipelines API at http://127.0.0.1:")
    assert "refused" in err[0].lower()


# --------------------------------------------------------------------------------------------------
# whole runs with kfp.local (SubprocessRunner, use_venv=False)
# --------------------------------------------------------------------------------------------------


def _run_dir(root: Path) -> Path:
    (run,) = root.glob("blip-capfilt-*")
    return run


@pytest.mark.slow
def test_run_local_runs_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BLIP_TRACKING", raising=False)
    monkeypatch.delenv("BLIP_PARENT_RUN_ID", raising=False)
    root = tmp_path / "kfp"
    # min_gain=-100: the tiny models are near chance, so force the promotion branch to run register
    assert blip(["pipeline", "run-local", "--pipeline-root", str(root), "--param", "min_gain=-100",
                 "--param", "mlflow_run_name=local-test", "--param", "ingest_parts=2"]) == 0
    run = _run_dir(root)
    assert len(list(run.glob("for-loop-*/ingest-part/dataset/manifest.json"))) == 2  # the web source in 2 parts
    web = json.loads((run / "ingest-merge" / "dataset" / "manifest.json").read_text())
    assert web["samples_in"] == 64 and "part" not in web
    for task, output in (("ingest", "dataset"), ("ingest-merge", "dataset"), ("pretrain", "model"), ("finetune", "model"), ("finetune-2", "model"),
                         ("capfilt", "dataset"), ("repretrain", "model"), ("evaluate", "results")):
        assert (run / task / output).is_dir(), f"{task}/{output}"
    assert (run / "pretrain" / "model" / "model" / "model.safetensors").is_file()
    assert (run / "capfilt" / "dataset" / "manifest.json").is_file()
    summary = (run / "capfilt" / "summary").read_text()
    assert "| source |" in summary and "chosen on 24 labelled calibration captions" in summary
    assert json.loads((run / "capfilt" / "executor_output.json").read_text())["artifacts"]["dataset"]["artifacts"][0][
        "metadata"]["threshold_source"] == "calibration"
    metrics = json.loads((run / "evaluate" / "results" / "metrics.json").read_text())
    assert set(metrics["models"]) == {settings.BASELINE, settings.CANDIDATE}
    assert "<table" in (run / "evaluate" / "report_html").read_text()
    ev = json.loads((run / "evaluate" / "executor_output.json").read_text())
    assert ev["artifacts"]["results"]["artifacts"][0]["metadata"]["metric"] == "mean_r1"
    reg = json.loads((run / "register" / "executor_output.json").read_text())["parameterValues"]["Output"]
    assert reg["promoted"] is True and reg["version"] == "1"
    assert reg["baseline"] == settings.BASELINE and reg["min_gain"] == -100 and reg["gain"] > -100

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(settings.EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("blip.kind") == "pipeline"]
    assert parent.info.run_name == "local-test" and parent.info.status == "FINISHED"
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {"pretrain", "finetune_captioner", "finetune_filter", "capfilt", "repretrain",
                           "finetune_vqa_noisy", "finetune_vqa_capfilt", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert str(client.get_model_version_by_alias("blip-capfilt", "champion").version) == "1"
    assert "pipeline finished" in capsys.readouterr().out


@pytest.mark.slow
def test_run_local_failing_stage_is_named(tmp_path, capsys):
    root = tmp_path / "kfp"
    rc = blip(["pipeline", "run-local", "--pipeline-root", str(root), "--param", "mlflow_tracking_uri=off",
               "--param", "human_source=toyweb://?split=bogus&n=4"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("blip pipeline:")]
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("blip pipeline: error: stage 'ingest human' failed:")
    assert "bogus" in err[0] and "(KFP task 'ingest')" in err[0]
    assert not (_run_dir(root) / "pretrain").exists()  # nothing downstream of the failed stage ran


def test_ingest_without_a_calibration_source_marks_the_dataset_empty(tmp_path):
    from types import SimpleNamespace

    from pipelines import ingest_steps

    dataset = SimpleNamespace(path=str(tmp_path / "dataset"), metadata={})
    report = SimpleNamespace(path=str(tmp_path / "report.md"))
    ingest_steps.ingest("calibration", "", "", "", "", ["capfilt.threshold=0.7"], dataset, report)
    assert dataset.metadata == {"split": "calibration", "empty": True}
    assert "`capfilt.threshold` = 0.7" in Path(report.path).read_text()
    assert not Path(dataset.path).exists()
    # Any other split needs its source: the default config has one for web, none is made up for calibration.
    with pytest.raises(UserError):
        ingest_steps.ingest("web", "toyweb://?split=bogus&n=2", "", "", "", [], dataset, report)


def test_every_step_runs_as_non_root(compiled):
    spec, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])
    for name, executor in k8s.items():
        ctx = executor["securityContext"]
        assert ctx["runAsNonRoot"] is True and int(ctx["runAsUser"]) == settings.RUN_AS_USER > 0, name


def test_launching_steps_read_the_operator_launch_policy(compiled):
    from components.launch import POLICY_ENV

    _, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    from pipelines.steps import TRACKING_URIS_ENV

    for name, executor in k8s.items():
        if name.startswith("exec-ingest"):
            assert "configMapAsEnv" not in executor  # no MLflow credentials there
            continue
        (policy,) = executor["configMapAsEnv"]
        assert policy["configMapName"] == "blip-launch-policy" and policy["optional"] is True
        expected = {*POLICY_ENV.values(), TRACKING_URIS_ENV} if name in TRAIN_EXECUTORS else {TRACKING_URIS_ENV}
        assert {k["envVar"] for k in policy["keyToEnv"]} == expected, name


def test_mlflow_credentials_go_only_to_allowed_servers(monkeypatch, tmp_path):
    """mlflow_tracking_uri is a run parameter: a run pointing it at its own server would receive the pipeline's
    MLflow password. With credentials in the environment only the operator's servers are accepted."""
    from pipelines import steps

    monkeypatch.delenv(steps.TRACKING_URIS_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    with pytest.raises(UserError, match="mlflow_tracking_uri 'http://collector.example:5000' is not allowed"):
        steps.start_run("job-1", "", "", "http://collector.example:5000", "exp", settings.S3_ENDPOINT)
    with pytest.raises(UserError, match="is not allowed"):
        steps.end_run("job-1", "http://collector.example:5000", "exp", "SUCCEEDED")
    steps.check_tracking_uri(settings.MLFLOW_URI)  # the in-cluster default
    monkeypatch.setenv(steps.TRACKING_URIS_ENV, "http://mlflow.other:5000, http://m2:80/")
    steps.check_tracking_uri("http://m2:80")
    with pytest.raises(UserError, match="not allowed"):
        steps.check_tracking_uri(settings.MLFLOW_URI)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")  # no credentials: nothing to leak, any server (local runs)
    steps.check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("torchx, message", [
    ({"secret": "blip-minio-root", "image": "attacker/tools:1"}, "image 'attacker/tools:1' is not allowed"),
    ({"secret": "blip-minio-root"}, "secret 'blip-minio-root' is not allowed"),
    ({"secrets": ["blip-postgres"]}, "secret 'blip-postgres' is not allowed"),
    ({"namespace": "blip"}, "namespace 'blip' is not allowed"),
    ({"service_account": "default"}, "service_account 'default' is not allowed"),
])
def test_torchx_parameter_cannot_escalate(monkeypatch, torchx, message):
    """The `torchx` pipeline parameter as a pipeline user could set it: refused in one line, before anything is
    launched (no cluster exists here, so getting past the check would fail differently)."""
    from components import launch
    from pipelines import steps

    for var in getattr(launch, "POLICY_ENV", {}).values():
        monkeypatch.delenv(var, raising=False)
    args = ["--data", "s3://blip/d", "--output", "s3://blip/pipeline/runs/r/pretrain"]
    with pytest.raises(UserError) as e:
        steps._launch("pretrain", args, {"env": {}, "run_id": "r"}, {**settings.TORCHX, "image": launch.IMAGE, **torchx})
    assert message in str(e.value) and str(e.value).startswith("launch policy:")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*non-Python base image")
def test_parallel_ingest_parts_and_merge_run_with_kfp_local(tmp_path):
    """The pipeline's parallel ingest (plan -> ParallelFor parts -> merge) with 2 parts gives the dataset of a
    single ingest of the same source."""
    from kfp import dsl, local

    from blip_core.config import load_config
    from blip_core.data.webdataset_io import iter_shard, read_manifest
    from components import ingest, storage
    from pipelines.pipeline import _parallel_ingest

    source = "toyweb://?split=web&n=40&noise=0.5&seed=3&size=32"
    overrides = ["ingest.resolution=32", "ingest.shard_size=8"]

    @dsl.pipeline(name="parallel-ingest")
    def parallel_ingest(parts: int = 2):
        _parallel_ingest(lambda task, *a, **kw: task, "web", source, parts, "", "",
                         {"params_file": "", "config_overrides": overrides})

    local.init(local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    parallel_ingest(parts=2)
    (run,) = (tmp_path / "kfp").glob("parallel-ingest-*")
    parts = sorted(p.name for p in run.glob("for-loop-*"))
    assert len(parts) == 2
    for it in parts:  # each part is its own dataset directory, one half of the source
        m = read_manifest(str(run / it / "ingest-part" / "dataset"))
        assert m.extra["part"]["parts"] == 2 and 0 < m.samples_in < 40
    merged = str(run / "ingest-merge" / "dataset")
    single = ingest.run(load_config(None, overrides), source, str(tmp_path / "single"), progress=False).manifest
    m = read_manifest(merged)
    assert (m.samples_in, m.samples_out, m.rejected, m.config) == (40, single.samples_out, single.rejected, single.config)

    def content(out):
        return {s["__key__"]: (s["jpg"], s["json"]) for u in storage.list_uris(out, ".tar") for s in iter_shard(u)}

    assert content(merged) == content(str(tmp_path / "single"))
    assert "| 40 |" in (run / "ingest-merge" / "report").read_text()
