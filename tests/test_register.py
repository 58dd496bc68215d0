"""Register stage: a sqlite MLflow registry in tmp_path; the champion alias moves only for a better model."""

from __future__ import annotations

import json
import math
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from blip_core import build_model, model_preset, save_model_dir
from blip_core.config import load_config
from blip_core.errors import UserError
from blip_core.tokenizer import BlipTokenizer
from components import cli, register, tracking

CFG = load_config(None, ["model.preset=tiny"])
NAME = "blip-test"


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "0")


@pytest.fixture(scope="module")
def stage_output(tmp_path_factory) -> str:
    """A training stage output: ``model/`` holding a tiny checkpoint with its tokenizer."""
    torch.manual_seed(0)
    tok = BlipTokenizer.from_corpus(["a red circle", "two blue squares", "a green star"] * 3, vocab_size=100)
    root = tmp_path_factory.mktemp("register-stage")
    save_model_dir(root / "model", build_model(model_preset("tiny"), vocab_size=len(tok)), tok)
    return str(root)


def write_metrics(path, candidate: str = "capfilt", **values) -> str:
    metrics = {"models": {candidate: {"mean_r1": 30.0, "cider": 50.0, **values},
                          "noisy": {"mean_r1": 10.0, "cider": 20.0}}, "filter": {}, "capfilt": {}}
    path.write_text(json.dumps(metrics))
    return str(path)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An initialised, empty sqlite store, created once (its schema migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    for name in ("BLIP_PARENT_RUN_ID", "BLIP_TRACKING", "MLFLOW_EXPERIMENT_NAME", "RANK", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    yield MlflowClient(uri)
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")
    mlflow.set_tracking_uri(None)


def test_tracking_off_registers_nothing_and_succeeds(no_tracking, stage_output, tmp_path, capsys):
    metrics = write_metrics(tmp_path / "metrics.json")
    out = tmp_path / "reg"
    assert cli.main(["register", "--model", stage_output, "--metrics", metrics, "--candidate", "capfilt",
                     "--output", str(out)]) == 0
    assert "tracking disabled" in capsys.readouterr().out
    decision = json.loads((out / "register.json").read_text())
    assert decision["promoted"] is False and decision["version"] is None
    assert "tracking disabled" in decision["reason"] and decision["value"] == 30.0
    assert decision["metric"] == "mean_r1"


def test_bad_metrics_are_user_errors(no_tracking, stage_output, tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json")
    with pytest.raises(UserError, match="no model named 'other'"):
        register.run(CFG, stage_output, metrics, "other")
    with pytest.raises(UserError, match="no metric 'bleu4'"):
        register.run(CFG, stage_output, metrics, "capfilt", metric="bleu4")
    with pytest.raises(UserError, match="not found"):
        register.run(CFG, stage_output, str(tmp_path / "missing.json"), "capfilt")


def test_decide():
    assert register.decide(1.0, None, None, "m", "champion")[0]
    assert register.decide(2.0, "1", 1.0, "m", "champion")[0]
    promoted, reason = register.decide(1.0, "1", 1.0, "m", "champion")  # a tie keeps the champion
    assert not promoted and "does not beat" in reason
    promoted, reason = register.decide(5.0, "1", None, "m", "champion")
    assert not promoted and "no recorded m" in reason
    assert register.decide(0.0, "1", 1.0, "m", "champion", force=True)[0]


def test_champion_moves_only_for_a_better_model(mlflow_store, stage_output, tmp_path):
    client = mlflow_store
    # 1. first registration: nobody holds the alias yet
    first = register.run(CFG, stage_output, write_metrics(tmp_path / "m1.json", mean_r1=30.0), "capfilt", NAME,
                         output=str(tmp_path / "out1"))
    assert first.promoted and first.version == "1" and first.champion_version is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert float(tags["blip.metric.mean_r1"]) == 30.0 and tags["blip.candidate"] == "capfilt"
    assert tags["blip.promoted"] == "true"
    assert json.loads((tmp_path / "out1" / "register.json").read_text())["version"] == "1"
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["blip.stage"] == "register"
    assert run.data.metrics["capfilt/mean_r1"] == 30.0
    assert first.model_uri and client.get_model_version(NAME, "1").source

    # 2. a worse candidate is registered but the champion stays, with the reason
    worse = register.run(CFG, stage_output, write_metrics(tmp_path / "m2.json", mean_r1=25.0), "capfilt", NAME)
    assert not worse.promoted and worse.version == "2"
    assert worse.champion_version == "1" and worse.champion_value == 30.0
    assert "does not beat" in worse.reason and "version 1" in worse.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert client.get_model_version(NAME, "2").tags["blip.promoted"] == "false"

    # 3. a better one takes the alias
    better = register.run(CFG, stage_output, write_metrics(tmp_path / "m3.json", mean_r1=31.5), "capfilt", NAME)
    assert better.promoted and better.version == "3" and better.champion_value == 30.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"

    # 4. another metric is compared with the value recorded for that metric (cider: 50 on version 3)
    by_cider = register.run(CFG, stage_output, write_metrics(tmp_path / "m4.json", mean_r1=1.0, cider=60.0),
                            "capfilt", NAME, metric="cider")
    assert by_cider.promoted and by_cider.champion_value == 50.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"


def test_champion_without_a_recorded_metric_needs_force(mlflow_store, stage_output, tmp_path):
    client = mlflow_store
    first = register.run(CFG, stage_output, write_metrics(tmp_path / "m1.json"), "capfilt", NAME)
    # a version registered another way (no blip.metric tags) becomes champion by hand
    bare = tracking.register_model(first.model_uri, NAME)
    tracking.set_alias(NAME, "champion", bare)
    kept = register.run(CFG, stage_output, write_metrics(tmp_path / "m2.json", mean_r1=99.0), "capfilt", NAME)
    assert not kept.promoted and "no recorded mean_r1" in kept.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(bare)
    assert cli.main(["register", "--model", stage_output, "--metrics", str(tmp_path / "m2.json"), "--candidate",
                     "capfilt", "--name", NAME, "--force", "--output", str(tmp_path / "forced.json")]) == 0
    forced = json.loads((tmp_path / "forced.json").read_text())
    assert forced["promoted"] is True and "--force" in forced["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == forced["version"]


def test_pipeline_gate_does_not_promote_a_tie_a_loss_or_nan():
    """The register stage's gate: the candidate must beat the baseline by more than min_gain."""
    from components.register import promotion_gate

    def gate(capfilt, noisy, min_gain=0.0):
        return promotion_gate({"capfilt": {"mean_r1": capfilt}, "noisy": {"mean_r1": noisy}}, "capfilt", "noisy",
                              "mean_r1", min_gain)

    assert gate(31.0, 30.0) == (1.0, True)
    assert gate(31.0, 30.0, min_gain=1.0) == (1.0, False)  # exactly min_gain: not promoted
    assert gate(30.0, 30.0) == (0.0, False)
    assert gate(29.0, 30.0) == (-1.0, False)
    assert gate(29.0, 30.0, min_gain=-2.0) == (-1.0, True)
    gain, promote = gate(float("nan"), 30.0, min_gain=-100.0)  # a failed metric never promotes
    assert math.isnan(gain) and promote is False
    with pytest.raises(UserError, match="no mean_r1 for model 'capfilt'"):
        promotion_gate({"noisy": {"mean_r1": 1.0}}, "capfilt", "noisy", "mean_r1", 0.0)


def test_register_stage_gate_registers_nothing_below_min_gain(mlflow_store, stage_output, tmp_path, capsys):
    """The promotion gate is the register stage's (dvc repro and the pipeline decide alike): a candidate that does
    not beat the baseline by more than --min-gain is not registered, and the stage still succeeds."""
    client = mlflow_store
    metrics = write_metrics(tmp_path / "metrics.json", mean_r1=30.0)  # noisy: 10.0, a gain of 20
    out = tmp_path / "kept.json"
    args = ["register", "--model", stage_output, "--metrics", metrics, "--candidate", "capfilt", "--name", NAME,
            "--baseline", "noisy"]
    assert cli.main([*args, "--min-gain", "20", "--output", str(out)]) == 0  # exactly min_gain: not above
    assert "register: not registered; not promoted" in capsys.readouterr().out
    decision = json.loads(out.read_text())
    assert decision["promoted"] is False and decision["version"] is None and decision["gain"] == 20.0
    assert "not above min_gain 20" in decision["reason"]
    assert client.search_model_versions(f"name='{NAME}'") == []
    assert not [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.data.tags.get("blip.stage") == "register"]  # no MLflow run either
    assert cli.main([*args, "--min-gain", "19.5", "--output", str(out)]) == 0
    decision = json.loads(out.read_text())
    assert decision["promoted"] is True and decision["version"] == "1" and decision["baseline"] == "noisy"
    with pytest.raises(UserError, match="no model named 'other'"):
        register.run(CFG, stage_output, metrics, "capfilt", NAME, baseline="other")
