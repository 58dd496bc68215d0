"""MLflow tracking: parent and nested stage runs, params, metrics, images, models and the registry.

Everything is real: a sqlite store in ``tmp_path``, and one test against an ``mlflow server`` process on
127.0.0.1 whose artifacts go to moto's S3 server (the ``s3_server`` fixture of ``conftest.py``).
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from blip_core.errors import UserError
from components import tracking
from components.tracking import (
    NullStageRun,
    StageRun,
    StageRunLike,
    TrackingError,
    check_tracking,
    get_alias_version,
    pipeline_run,
    register_model,
    set_alias,
    stage_run,
)

CAPTIONS = [
    "a red cube on a wooden table", "two blue balls next to a green box", "a yellow cat sitting on a mat",
    "a small dog running on the grass", "a picture of a white cup", "three red apples in a basket",
]


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Each test: its own working directory and sqlite store, no inherited parent run, fast system metrics."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    for name in ("BLIP_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "BLIP_TRACKING", "RANK", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")
    mlflow.set_tracking_uri(None)


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny BLIP checkpoint directory (model + tokenizer) written by ``BlipModel.save``."""
    import torch

    from blip_core import build_model, model_preset, save_model_dir
    from blip_core.tokenizer import BlipTokenizer

    torch.manual_seed(0)
    tok = BlipTokenizer.from_corpus(CAPTIONS * 4, vocab_size=200)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    out = tmp_path_factory.mktemp("ckpt") / "captioner"
    save_model_dir(out, model, tok)
    return out


def _children(client: MlflowClient, exp_id: str, parent_id: str):
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def _check_pyfunc(model, image_path: Path) -> None:
    """The loaded pyfunc captions images (base64, with and without a data: prefix) and scores image-text pairs."""
    img = Image.open(image_path)
    captions = model.predict(pd.DataFrame({"image": [_png_b64(img), "data:image/png;base64," + _png_b64(img)]}))
    assert list(captions.columns) == ["caption"] and len(captions) == 2
    assert all(isinstance(c, str) for c in captions["caption"])
    assert captions["caption"][0] == captions["caption"][1]  # same image, deterministic beam search
    scores = model.predict(pd.DataFrame({"image": [_png_b64(img)] * 2, "text": ["a red cube", "a yellow cat"]}))
    assert list(scores.columns) == ["itm_prob", "itc_cosine"] and len(scores) == 2
    assert scores["itm_prob"].between(0, 1).all() and scores["itc_cosine"].between(-1 - 1e-5, 1 + 1e-5).all()


# --------------------------------------------------------------------------------------------------
# (a) sqlite store
# --------------------------------------------------------------------------------------------------


def test_stage_runs_nested_params_metrics_images_and_failure(tmp_path):
    config = {"model": {"preset": "tiny", "vision": {"image_size": 32}}, "pretrain": {"lr": 1e-4, "epochs": 2},
              "data": {"sources": ["a", "b"], "note": "x" * 10_000},
              "many": {f"k{i}": i for i in range(150)}}
    with pipeline_run(name="test-pipeline", tags={"trigger": "pytest"}) as parent_id:
        assert os.environ["BLIP_PARENT_RUN_ID"] == parent_id
        with stage_run("pretrain", config, tags={"attempt": 1}) as run:
            assert run.parent_run_id == parent_id and mlflow.active_run().info.run_id == run.run_id
            for step in range(4):
                run.log_metrics(step, {"loss/itc": 2.0 - 0.25 * step, "lr": np.float32(1e-4), "skip": None})
            run.log_image_captions([_image(0), _image(1)], ["a red cube", "a blue ball"], step=3,
                                   references=["a red cube on a table", "two blue balls"])
            run.log_table([{"uid": "a", "score": 0.9, "kept": True}, {"uid": "b", "score": 0.1, "kept": False}],
                          "capfilt/decisions.json")
            run.log_dict({"recall@1": 0.5}, "eval/metrics.json")
            (tmp_path / "extra").mkdir()
            (tmp_path / "extra" / "notes.txt").write_text("hello")
            run.log_artifacts(tmp_path / "extra", "extra")
            time.sleep(1.3)  # at least one system-metrics sample (interval 0.5 s)
        with pytest.raises(RuntimeError, match="diverged"), stage_run("finetune") as failing:
            failing.log_metrics(0, {"loss": 1.0})
            raise RuntimeError("loss diverged")
    assert "BLIP_PARENT_RUN_ID" not in os.environ

    client = MlflowClient()
    exp = client.get_experiment_by_name("blip-capfilt")
    assert exp is not None and Path(exp.artifact_location.removeprefix("file://")).is_relative_to(tmp_path)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trigger"] == "pytest"
    assert parent.info.run_name == "test-pipeline"
    children = {r.info.run_name: r for r in _children(client, exp.experiment_id, parent_id)}
    assert set(children) == {"pretrain", "finetune"}

    pre = client.get_run(run.run_id)
    assert pre.info.status == "FINISHED"
    assert pre.data.tags["blip.stage"] == "pretrain" and pre.data.tags["attempt"] == "1"
    params = pre.data.params
    assert params["model.preset"] == "tiny" and params["model.vision.image_size"] == "32"
    assert params["pretrain.lr"] == "0.0001" and json.loads(params["data.sources"]) == ["a", "b"]
    assert len(params["data.note"]) == 6000 and params["data.note"].endswith("[truncated]")
    assert params["many.k149"] == "149"
    history = client.get_metric_history(run.run_id, "loss/itc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 2.0), (1, 1.75), (2, 1.5), (3, 1.25)]
    assert "skip" not in pre.data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in pre.data.metrics)

    files = _artifact_paths(client, run.run_id)
    assert {"config.json", "samples.json", "capfilt/decisions.json", "eval/metrics.json",
            "extra/notes.txt"} <= set(files)
    images = [f for f in files if f.startswith("images/")]
    assert len([f for f in images if f.endswith(".png")]) == 2
    assert {f.split("/")[1].split("+")[0] for f in images} == {"samples~0", "samples~1"}
    assert len([f for f in files if f.startswith("table_images/samples/") and f.endswith(".png")]) == 2
    table = json.loads(Path(client.download_artifacts(run.run_id, "samples.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [(r["step"], r["caption"], r["reference"]) for r in rows] == [
        (3, "a red cube", "a red cube on a table"), (3, "a blue ball", "two blue balls")]
    assert all(r["image"]["type"] == "image" for r in rows)
    config_back = json.loads(Path(client.download_artifacts(run.run_id, "config.json", str(tmp_path))).read_text())
    assert config_back["data"]["note"] == "x" * 10_000

    failed = client.get_run(failing.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["blip.error"] == "RuntimeError: loss diverged"
    assert failed.data.metrics["loss"] == 1.0


def test_parent_created_when_absent_and_shared_by_later_stages(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp-auto")
    with stage_run("ingest", log_system_metrics=False) as first:
        pass
    parent_id = first.parent_run_id
    assert os.environ["BLIP_PARENT_RUN_ID"] == parent_id
    client = MlflowClient()
    assert client.get_run(parent_id).info.status == "FINISHED"
    with stage_run("pretrain", log_system_metrics=False) as second:
        assert client.get_run(parent_id).info.status == "RUNNING"
    assert second.parent_run_id == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    exp = client.get_experiment_by_name("exp-auto")
    assert {r.info.run_name for r in _children(client, exp.experiment_id, parent_id)} == {"ingest", "pretrain"}

    # an explicit parent id wins over the environment; a missing one is a one-line user error
    other = tracking.start_pipeline_run(name="other", export=False)
    with stage_run("evaluate", parent_run_id=other, log_system_metrics=False) as third:
        pass
    assert client.get_run(third.run_id).data.tags["mlflow.parentRunId"] == other
    assert client.get_run(other).info.status == "RUNNING"  # owned by whoever started it
    tracking.end_pipeline_run(other)
    assert client.get_run(other).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="parent run 'deadbeef"):
        with stage_run("evaluate", parent_run_id="deadbeef" * 4):
            pass


def test_experiment_is_tagged_to_open_on_the_training_runs(capsys):
    """The experiment carries MLflow's kind tag for training ("Machine learning"), set when it is created and
    added to an existing experiment without a kind; a kind chosen by someone else is kept."""
    client = MlflowClient()
    exp_id = tracking.experiment_id("made-here")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before")  # e.g. by a run before this version
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    with stage_run("ingest", experiment="made-before", log_system_metrics=False):
        pass
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "finetuning"})
    assert tracking.experiment_id("chosen") == chosen
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "finetuning"

    # The UI link opens the training view whatever the browser chose last.
    assert tracking.experiment_url("http://127.0.0.1:5000/", exp_id) == (
        f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning")
    assert tracking.experiment_url("http://h:5000", "3", "abc") == (
        "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert tracking.main(["url", "--experiment", "made-here", "--ui", "http://127.0.0.1:5001"]) == 0
    assert capsys.readouterr().out.strip() == tracking.experiment_url("http://127.0.0.1:5001", exp_id)
    assert tracking.main(["url", "--experiment", "absent"]) == 2
    assert "no MLflow experiment 'absent'" in capsys.readouterr().err


def test_tracking_off_and_non_zero_rank_log_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "off")
    with stage_run("pretrain", {"a": 1}) as run:
        assert isinstance(run, NullStageRun) and run.run_id is None and not run.enabled
        run.log_metrics(0, {"loss": 1.0})
        run.log_image_captions([_image(0)], ["x"], step=0)
        assert run.log_blip_model(tmp_path) == ""
    monkeypatch.delenv("BLIP_TRACKING")
    monkeypatch.setenv("RANK", "1")
    with stage_run("pretrain") as run:
        assert run.run_id is None
    assert not (tmp_path / "mlflow.db").exists()


def _members(cls: type) -> dict[str, inspect.Signature | str]:
    """Public methods (with their signatures) and properties of ``cls``, without ``object``'s."""
    out: dict[str, inspect.Signature | str] = {}
    for name in dir(cls):
        attr = inspect.getattr_static(cls, name)
        if name.startswith("_") or hasattr(object, name):
            continue
        if isinstance(attr, property):
            out[name] = "property"
        elif inspect.isfunction(attr):
            out[name] = inspect.signature(attr)
    return out


def test_stage_run_and_null_stage_run_implement_the_protocol_alike():
    """What stage_run yields with and without tracking: the same public methods, with the same signatures, as
    StageRunLike, and the same attributes; the null object is no StageRun (nothing inherited can log)."""
    protocol = _members(StageRunLike)
    assert {"log_metrics", "log_blip_model", "parent", "enabled"} <= set(protocol)
    assert _members(StageRun) == protocol
    assert _members(NullStageRun) == protocol
    assert not issubclass(NullStageRun, StageRun)
    null = NullStageRun("pretrain")
    assert isinstance(null, StageRunLike)
    for name in typing.get_type_hints(StageRunLike):
        assert hasattr(null, name), name
    assert null.parent() is null and not null.enabled


def test_check_tracking_sqlite_creates_store_and_rejects_bad_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = check_tracking()  # default: sqlite:///mlflow.db in the working directory, made absolute
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    assert os.environ["MLFLOW_TRACKING_URI"] == uri == mlflow.get_tracking_uri()
    nested = check_tracking("sqlite:///sub/dir/store.db")
    assert nested == f"sqlite:///{tmp_path / 'sub/dir/store.db'}" and (tmp_path / "sub/dir/store.db").is_file()
    (tmp_path / "blocked").write_text("a file where a directory should be")
    with pytest.raises(TrackingError, match="cannot be opened"):
        check_tracking("sqlite:///blocked/store.db")


def test_cli_start_and_end_pipeline_run(capsys):
    assert tracking.main(["start", "--name", "dvc repro", "--tag", "git=abc"]) == 0
    run_id = capsys.readouterr().out.strip()
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["git"] == "abc" and run.info.run_name == "dvc repro"
    assert tracking.main(["end", run_id, "--status", "FAILED"]) == 0
    assert client.get_run(run_id).info.status == "FAILED"
    assert tracking.main(["--tracking-uri", "http://127.0.0.1:9", "check", "--timeout", "2"]) == 2
    assert "is not reachable" in capsys.readouterr().err


def test_logged_model_registry_alias_and_pyfunc_sqlite(tiny_checkpoint, tmp_path):
    image_path = tmp_path / "img.png"
    _image(7, (64, 52)).save(image_path)
    with pipeline_run():
        with stage_run("finetune", {"task": "captioner"}, log_system_metrics=False) as run:
            run.log_metrics(0, {"val/cider": 0.25})
            model_uri = run.log_blip_model(tiny_checkpoint, registered_name="blip-captioner")
    assert model_uri.startswith("models:/m-")
    assert int(run.model_info.registered_model_version) == 1
    client = MlflowClient()
    assert client.get_run(run.run_id).data.tags["blip.model_uri.model"] == model_uri
    assert get_alias_version("blip-captioner", "champion") is None
    assert get_alias_version("no-such-model", "champion") is None
    set_alias("blip-captioner", "champion", 1)
    version, metrics = get_alias_version("blip-captioner", "champion")
    assert version == 1 and metrics["val/cider"] == 0.25
    assert register_model(model_uri, "blip-captioner", alias="candidate", tags={"stage": "finetune"}) == 2
    assert get_alias_version("blip-captioner", "candidate")[0] == 2
    assert client.get_model_version("blip-captioner", "2").tags["stage"] == "finetune"

    model = mlflow.pyfunc.load_model("models:/blip-captioner@champion")
    _check_pyfunc(model, image_path)
    with pytest.raises(Exception, match="row 0: image is not base64"):
        model.predict(pd.DataFrame({"image": ["not-a-file-and-not-base64!"]}))


# --------------------------------------------------------------------------------------------------
# (c) a tracking server that is down
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_fails_fast_with_user_error():
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"MLflow tracking server at {uri} is not reachable"):
        check_tracking(uri, timeout=10)
    with pytest.raises(UserError, match="is not reachable"):
        with stage_run("pretrain", {"a": 1}, uri=uri):
            pytest.fail("the stage body must not run when tracking is down")
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------------------------------
# (b) a real mlflow server with S3 (moto) artifacts
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _mlflow_server_process(tmp_path: Path, artifacts: str, env_extra: dict[str, str] | None = None):
    """``mlflow server`` on 127.0.0.1 (sqlite backend ``tmp_path/server.db``, proxied artifacts in
    ``artifacts``); yields ``(url, process)``. The process leads its own process group."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BLIP_"))}
    env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", **(env_extra or {})})
    log_path = tmp_path / "mlflow-server.log"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", artifacts,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def mlflow_server(tmp_path, s3_server, s3_bucket):
    """``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts in the moto bucket); yields its URL."""
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with _mlflow_server_process(tmp_path, f"s3://{s3_bucket}/mlruns", env) as (url, _):
        yield url


@pytest.mark.slow
def test_mlflow_server_with_s3_artifacts(mlflow_server, s3_server, s3_bucket, tiny_checkpoint, tmp_path,
                                         monkeypatch):
    import boto3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)  # proxied artifacts: the client needs no S3 access
    image_path = tmp_path / "img.png"
    _image(3, (40, 40)).save(image_path)

    assert check_tracking() == mlflow_server
    with pipeline_run(name="server-pipeline", experiment="blip-server") as parent_id:
        with stage_run("pretrain", {"model": {"preset": "tiny"}, "pretrain": {"lr": 3e-4}}) as pre:
            for step in range(3):
                pre.log_metrics(step, {"loss/total": 3.0 - step, "pairs_per_s": 10.0 + step})
            pre.log_image_captions([_image(0), _image(1)], ["a red cube", "a blue ball"], step=2)
            time.sleep(1.2)
        with stage_run("finetune", {"task": "captioner"}) as fin:
            fin.log_metrics(0, {"val/loss": 0.5})
            model_uri = fin.log_blip_model(tiny_checkpoint, registered_name="blip-server-captioner")
        version = fin.model_info.registered_model_version
        set_alias("blip-server-captioner", "champion", version)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("blip-server")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = {r.info.run_name: r for r in _children(client, exp.experiment_id, parent_id)}
    assert set(children) == {"pretrain", "finetune"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["pretrain"].data.params["pretrain.lr"] == "0.0003"
    history = sorted(client.get_metric_history(pre.run_id, "loss/total"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert any(k.startswith("system/") for k in children["pretrain"].data.metrics)
    files = _artifact_paths(client, pre.run_id)
    assert len([f for f in files if f.startswith("images/samples~") and f.endswith(".png")]) == 2
    assert "samples.json" in files and "config.json" in files

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="mlruns/")["Contents"]]
    assert any(k.endswith("/samples.json") and pre.run_id in k for k in keys)
    assert any(k.endswith("model.safetensors") for k in keys)  # the checkpoint inside the logged model

    assert int(version) == 1 and model_uri.startswith("models:/m-")
    assert int(client.get_model_version_by_alias("blip-server-captioner", "champion").version) == 1
    alias_version, metrics = get_alias_version("blip-server-captioner", "champion")
    assert alias_version == 1 and metrics["val/loss"] == 0.5
    model = mlflow.pyfunc.load_model("models:/blip-server-captioner@champion")
    _check_pyfunc(model, image_path)


# --------------------------------------------------------------------------------------------------
# (d) a tracking server that goes down in the middle of a stage
# --------------------------------------------------------------------------------------------------


def test_server_lost_mid_stage_the_stage_completes_and_says_so(toy_data, tmp_path, monkeypatch):
    """The server is killed after the first checkpoint of a pre-training run that logs to it: the run goes
    on, warns once, writes the same model as a run without tracking, and its result says tracking was lost."""
    import torch
    from safetensors.torch import load_file
    from toy_data import TINY

    from blip_core.config import load_config
    from components import pretrain

    root = Path(__file__).resolve().parents[1]
    extra = TINY + ["pretrain.epochs=2", "pretrain.checkpoint_every=3"]
    with _mlflow_server_process(tmp_path, str(tmp_path / "artifacts")) as (url, server):
        out = tmp_path / "tracked"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BLIP_"))}
        env.update({"MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
                    # fail fast once the server is gone (by default MLflow retries a request for minutes)
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
        cmd = [sys.executable, "-m", "components.pretrain", "--data", toy_data["web"], "--output", str(out),
               *sum((["--set", s] for s in extra), [])]
        with open(tmp_path / "stage.err", "wb") as err:
            stage = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=err)
        pointer = out / "checkpoints" / "latest.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and stage.poll() is None:
            if pointer.exists() and json.loads(pointer.read_text())["step"] >= 3:
                break
            time.sleep(0.05)
        assert stage.poll() is None, "the stage finished before the server could be stopped"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert stage.wait(timeout=300) == 0, (tmp_path / "stage.err").read_text()[-3000:]
    stderr = (tmp_path / "stage.err").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("was lost during stage pretrain") == 1, stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 16 and result["run_id"] and result["tracking_lost"]
    train_log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in train_log] == list(range(1, 17))  # every step's metrics, in the output
    key = next(k for k in train_log[0] if k.startswith("loss"))

    # The server saw the run's first steps; the rest of the stage is its output only.
    store = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    history = store.get_metric_history(result["run_id"], key)
    assert 3 <= len(history) < 16 and store.get_run(result["run_id"]).info.status == "RUNNING"

    # The work itself is what a run without tracking gives.
    monkeypatch.setenv("BLIP_TRACKING", "0")
    pretrain.run(load_config(None, extra), [toy_data["web"]], str(tmp_path / "untracked"))
    for name in ("model.safetensors", "momentum.safetensors"):
        a = load_file(tmp_path / "untracked" / "model" / name)
        b = load_file(out / "model" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lost_server_warns_once_and_later_calls_are_skipped(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    """In process: a mistake in what is logged raises; after the server dies, the first failing call warns and
    marks the run lost, later calls return at once, and leaving the block raises nothing."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with _mlflow_server_process(tmp_path, str(tmp_path / "artifacts")) as (url, server):
        with caplog.at_level("WARNING", logger="components.tracking"), \
                stage_run("finetune_filter", {"a": 1}, uri=url, log_system_metrics=False) as run:
            run.log_metrics(0, {"loss": 1.0})
            with pytest.raises(ValueError, match="must end in .json"):  # a mistake is not a lost server
                run.log_table([{"a": 1}], "table.csv")
            assert run.lost is None
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            run.log_metrics(1, {"loss": 0.5})
            assert run.lost and "API request to" in run.lost
            start = time.monotonic()
            for step in range(2, 50):
                run.log_metrics(step, {"loss": 0.1})
            run.set_tags({"x": "y"})
            assert run.log_blip_model(tiny_checkpoint) == ""
            assert time.monotonic() - start < 1.0
    assert mlflow.active_run() is None
    warnings_ = [r for r in caplog.records if r.name == "components.tracking" and r.levelname == "WARNING"]
    assert len(warnings_) == 1 and "was lost during stage finetune_filter" in warnings_[0].getMessage()
    store = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    assert [m.step for m in store.get_metric_history(run.run_id, "loss")] == [0]
