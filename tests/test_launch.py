"""TorchX launching (components.launch): a real 1x2 local_cwd torchrun job, a failing job, the kubernetes spec."""

import json
from pathlib import Path

import pytest
import yaml
from toy_data import TINY

from blip_core.errors import UserError
from components import launch


def _sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.mark.slow  # a 2-process torchrun job
def test_local_cwd_1x2_pretrain_finishes_with_a_checkpoint(toy_data, tmp_path, no_tracking):
    out = tmp_path / "pre"
    lines: list[str] = []
    res = launch.launch("pretrain", ["--data", toy_data["web"], toy_data["human"], "--output", str(out),
                                     *_sets(TINY + ["pretrain.epochs=1", "pretrain.log_every=100"])],
                        scheduler="local_cwd", nodes=1, procs_per_node=2, log_dir=str(tmp_path / "logs"),
                        stream=lines.append, timeout_s=300)
    assert res.succeeded and res.handle.startswith("local_cwd://")
    result = json.loads((out / "result.json").read_text())
    # 2 gloo processes split the 64 web + 24x5 human pairs: half the steps of one process
    assert result["steps"] == (64 + 24 * 5) // 2 // 8
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints" / "latest.json").is_file()
    assert any(ln.startswith("[pretrain/0] [0]:") for ln in lines)
    assert any("pretrain:" in ln and "steps" in ln for ln in res.last_lines)
    assert (tmp_path / "logs").is_dir()


@pytest.mark.slow  # a 2-process torchrun job
def test_failing_job_surfaces_its_error(tmp_path, no_tracking):
    missing = tmp_path / "no-such-data"
    with pytest.raises(UserError) as e:
        launch.launch("pretrain", ["--data", str(missing), "--output", str(tmp_path / "out"), "--set",
                                   "model.preset=tiny"], procs_per_node=2, log_dir=str(tmp_path / "logs"),
                      stream=False, timeout_s=300)
    msg = str(e.value)
    head = msg.splitlines()[0]
    assert head.startswith("pretrain: TorchX job local_cwd://") and "FAILED" in head
    assert "no-such-data" in head and "no manifest.json" in head  # the stage's own error, in the first line
    assert "last log lines:" in msg and str(tmp_path / "out") in msg


def test_stage_args_need_output_and_known_stage():
    with pytest.raises(UserError, match="--output"):
        launch.build_app("pretrain", ["--data", "d"])
    with pytest.raises(UserError, match="unknown stage"):
        launch.build_app("evaluate", ["--output", "o"])
    with pytest.raises(UserError, match="s3:// output"):
        launch.build_app("pretrain", ["--data", "s3://b/d", "--output", "local/out"], scheduler="kubernetes")
    with pytest.raises(UserError, match="bad mount"):
        launch.mount_tokens(["type=volume,src=x,path=/x"])


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = launch.absolute_paths(["--data", "a", "s3://b/c", "--output=o", "--set", "x=1", "--init", "/abs"],
                                 stage="pretrain")
    assert args == ["--data", str(tmp_path / "a"), "s3://b/c", f"--output={tmp_path / 'o'}", "--set", "x=1",
                    "--init", "/abs"]


def _containers(job):
    return [t["template"]["spec"]["containers"][0] for t in job["spec"]["tasks"]]


@pytest.fixture
def policy(monkeypatch):
    """The operator's launch policy: a registry image and one volume, the rest the defaults."""
    for var in getattr(launch, "POLICY_ENV", {}).values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BLIP_LAUNCH_IMAGES", "registry.example.com/blip/blip-capfilt:0.1.0")
    monkeypatch.setenv("BLIP_LAUNCH_VOLUMES", "blip-cache")


def test_kubernetes_dryrun_spec(monkeypatch, policy):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.blip.svc.cluster.local:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-to-be-copied")
    image = "registry.example.com/blip/blip-capfilt:0.1.0"
    res = launch.launch(
        "pretrain", ["--data", "s3://blip/data/web", "--output", "s3://blip/runs/r1/pretrain", "--stage-name", "pretrain"],
        scheduler="kubernetes", nodes=2, gpus_per_node=4, cpu=16, mem_mb=120_000, image=image, queue="blip",
        namespace="blip-jobs", service_account="blip-trainer", mounts=["type=volume,src=blip-cache,dst=/cache"],
        env={"MLFLOW_TRACKING_URI": "http://mlflow.blip.svc.cluster.local:5000", "BLIP_PARENT_RUN_ID": "abc123"},
        node_selector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, dryrun=True)
    job = res.request
    assert res.state == "DRYRUN" and job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert job["spec"]["queue"] == "blip" and job["spec"]["schedulerName"] == "volcano"
    assert res.scheduler_cfg["namespace"] == "blip-jobs" and res.scheduler_cfg["service_account"] == "blip-trainer"
    assert "not-to-be-copied" not in json.dumps(job)  # credentials come from secrets, never from this process
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)  # one Volcano task per node
    for task, c in zip(tasks, _containers(job)):
        pod = task["template"]["spec"]
        assert c["image"] == image
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and c["resources"]["limits"]["cpu"] == "16000m"
        assert pod["serviceAccountName"] == "blip-trainer"
        cmd = c["command"][-1]
        assert "--nnodes 2 --nproc_per_node 4" in cmd and "-m components.pretrain" in cmd
        assert "--output s3://blip/runs/r1/pretrain" in cmd
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"] == "blip-cache"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.") and env["BLIP_PARENT_RUN_ID"] == "abc123"
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.blip.svc.cluster.local:9000"
        assert "AWS_SECRET_ACCESS_KEY" not in env  # credentials come from the secret, never inline
        assert {"secretRef": {"name": "blip-s3-credentials"}} in c["envFrom"]
        assert {"secretRef": {"name": "blip-mlflow-credentials"}} in c["envFrom"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_launch_cli_dryrun_prints_the_job(capsys):
    rc = launch.main(["finetune", "--scheduler", "kubernetes", "--nodes", "1", "--gpus", "2", "--dryrun", "--",
                      "--task", "captioner", "--init", "s3://blip/r/pretrain", "--data", "s3://blip/d/human",
                      "--output", "s3://blip/r/finetune_captioner"])
    assert rc == 0
    job = yaml.safe_load(capsys.readouterr().out)
    (c,) = _containers(job)
    assert c["image"] == launch.IMAGE and c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "-m components.finetune --task captioner" in c["command"][-1]
    assert job["metadata"]["name"] == launch.job_name(None, "finetune-captioner", "s3://blip/r/finetune_captioner")


def test_package_root_holds_the_stage_modules():
    root = launch.package_root()
    for module in launch.STAGES.values():
        assert (root / Path(*module.split("."))).with_suffix(".py").is_file()


def test_training_pods_meet_the_restricted_pod_security_level(policy):
    """The namespace enforces "restricted": a pod without this security context would be refused."""
    from test_infra import restricted_violations

    job = launch.launch("pretrain", ["--data", "s3://blip/d", "--output", "s3://blip/o"], scheduler="kubernetes",
                        nodes=2, gpus_per_node=1, mounts=["type=volume,src=blip-cache,dst=/cache"], dryrun=True,
                        image="registry.example.com/blip/blip-capfilt:0.1.0").request
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        assert restricted_violations(pod, task["name"]) == []
        assert pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
        assert {"/tmp", "/dev/shm", "/home/blip", "/workspace"} <= writable


@pytest.mark.parametrize("setting, value, message", [
    ("image", "attacker/tools:latest", "image 'attacker/tools:latest' is not allowed"),
    ("secrets", ["blip-minio-root"], "secret 'blip-minio-root' is not allowed"),
    ("secrets", "blip-s3-credentials,blip-postgres", "secret 'blip-postgres' is not allowed"),
    ("service_account", "default", "service_account 'default' is not allowed"),
    ("service_account", None, "service_account 'default' is not allowed"),
    ("namespace", "blip", "namespace 'blip' is not allowed"),
    ("namespace", "kube-system", "namespace 'kube-system' is not allowed"),
    ("queue", "other", "queue 'other' is not allowed"),
    ("config_map", "blip-launch-policy", "config_map 'blip-launch-policy' is not allowed"),
    ("priority_class", "system-node-critical", "priority_class 'system-node-critical' is not allowed"),
    ("mounts", ["type=bind,src=/,dst=/host"], "bind mounts are not allowed"),
    ("mounts", ["type=device,src=/dev/mem"], "device mounts are not allowed"),
    ("mounts", ["type=volume,src=minio-data,dst=/d"], "volume 'minio-data' is not allowed"),
])
def test_launch_policy_refuses_settings_outside_it(policy, setting, value, message):
    """What a pipeline user puts in the `torchx` parameter cannot pick another image, secret, identity or
    namespace: one line, before anything is built or submitted (dryrun=False and no cluster here)."""
    with pytest.raises(UserError) as e:
        launch.launch("pretrain", ["--data", "s3://blip/d", "--output", "s3://blip/o"], scheduler="kubernetes",
                      stream=False, **{"image": "registry.example.com/blip/blip-capfilt:0.1.0", setting: value})
    msg = str(e.value)
    assert message in msg and "\n" not in msg and msg.startswith("launch policy:")


def test_launch_policy_comes_from_the_operator_environment(monkeypatch):
    for var in getattr(launch, "POLICY_ENV", {}).values():
        monkeypatch.delenv(var, raising=False)
    assert launch.launch_policy()["secret"] == {"blip-s3-credentials", "blip-mlflow-credentials"}
    monkeypatch.setenv("BLIP_LAUNCH_IMAGES", "reg/a@sha256:" + "1" * 64 + ", reg/b:2")
    monkeypatch.setenv("BLIP_LAUNCH_SECRETS", "")
    policy = launch.launch_policy()
    assert policy["image"] == {"reg/a@sha256:" + "1" * 64, "reg/b:2"} and policy["secret"] == frozenset()
    job = launch.launch("pretrain", ["--data", "s3://blip/d", "--output", "s3://blip/o"], scheduler="kubernetes",
                        image="reg/b:2", secrets=None, dryrun=True).request
    assert "envFrom" in job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]  # the settings ConfigMap only
    with pytest.raises(UserError, match="secret 'blip-s3-credentials' is not allowed"):
        launch.launch("pretrain", ["--data", "s3://blip/d", "--output", "s3://blip/o"], scheduler="kubernetes",
                      image="reg/b:2", dryrun=True)
    # local processes have no image, namespace or secret: the policy does not apply
    app = launch.build_app("pretrain", ["--data", "d", "--output", "o"], image="anything:1", secrets=["x"])
    assert app.roles[0].image == "anything:1"


@pytest.mark.slow  # a 2-process torchrun job
def test_sigterm_cancels_a_local_job(toy_data, tmp_path):
    """The launcher gets SIGTERM while a local_cwd job trains: the job's processes are stopped, and the launcher
    exits with one line (exit code 2), not a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "pre"
    root = launch.package_root()
    env = {**os.environ, "PYTHONPATH": str(root), "BLIP_TRACKING": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "components.launch", "pretrain", "--procs", "1", "--log-dir", str(tmp_path / "logs"),
         "--", "--data", toy_data["web"], "--output", str(out), *_sets(TINY + ["pretrain.epochs=10000"])],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def job_processes():
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if p.info["pid"] != proc.pid and str(out) in cmd and "components.launch" not in cmd:
                found.append(p)
        return found

    try:
        deadline = time.monotonic() + 180
        while len(job_processes()) < 2:  # torchrun and its worker
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)
        time.sleep(3)  # the launcher is following the job
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("launch: error:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "Traceback" not in err, err
    gone, alive = psutil.wait_procs(job_processes(), timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
