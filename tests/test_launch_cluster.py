"""The launcher against a Kubernetes API: one job per (run, stage, output), earlier jobs replaced, SIGTERM cancels.

There is no cluster here, so the API server is a small HTTP stand-in on 127.0.0.1 that keeps Volcano jobs in
memory (create, read, status, abort through the status subresource, delete) and answers 404 for anything else.
The code under test is real end to end: components.launch, TorchX's kubernetes scheduler and the Kubernetes
Python client, talking HTTP through a kubeconfig.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from blip_core.errors import UserError
from components import launch

ROOT = Path(__file__).resolve().parents[1]
JOBS = re.compile(r"^/apis/batch\.volcano\.sh/v1alpha1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?$")


class FakeVolcano:
    """Volcano jobs in memory behind a Kubernetes-style REST API. ``phase`` is the phase new jobs get."""

    def __init__(self, phase: str = "Running") -> None:
        self.jobs: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str]] = []  # (method, "namespace/name" or path)
        self.phase = phase
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                m = JOBS.match(url.path)
                with fake.lock:
                    if not m:
                        fake.calls.append((method, url.path))
                        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    namespace, name, status = m.groups()
                    dry = "dryRun=All" in (url.query or "")
                    fake.calls.append((method + (" dry" if dry else "") + (" status" if status else ""),
                                       f"{namespace}/{name or ''}"))
                    if method == "POST" and name is None:
                        job = self._body()
                        key = (namespace, job["metadata"]["name"])
                        if dry:
                            return self._send(201, job)
                        if key in fake.jobs:
                            return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                                    "message": f'jobs "{key[1]}" already exists'})
                        job["status"] = {"state": {"phase": fake.phase}}
                        fake.jobs[key] = job
                        return self._send(201, job)
                    key = (namespace, name)
                    if key not in fake.jobs:
                        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    if method == "GET":
                        return self._send(200, fake.jobs[key])
                    if method == "PUT" and status:  # TorchX cancel: phase Aborted through the status subresource
                        fake.jobs[key]["status"] = self._body().get("status", {})
                        return self._send(200, fake.jobs[key])
                    if method == "DELETE":
                        del fake.jobs[key]
                        return self._send(200, {"kind": "Status", "status": "Success"})
                    return self._send(405, {"kind": "Status", "code": 405})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def phase_of(self, namespace: str, name: str) -> str | None:
        with self.lock:
            job = self.jobs.get((namespace, name))
            return job["status"]["state"]["phase"] if job else None

    def add(self, namespace: str, name: str, phase: str) -> None:
        with self.lock:
            self.jobs[(namespace, name)] = {"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job",
                                            "metadata": {"name": name, "namespace": namespace},
                                            "spec": {"tasks": []}, "status": {"state": {"phase": phase}}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def volcano(tmp_path, monkeypatch):
    fake = FakeVolcano()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "blip-jobs"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # the client reads $KUBECONFIG once, when first imported: point an already imported one at this file too
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster config
    for var in getattr(launch, "POLICY_ENV", {}).values():
        monkeypatch.delenv(var, raising=False)
    yield fake
    fake.close()


ARGS = ["--data", "s3://blip/datasets/web", "--output", "s3://blip/pipeline/runs/run-7/pretrain"]


def test_job_names_are_deterministic_and_valid():
    a = launch.job_name("run-7", "pretrain", "s3://blip/pipeline/runs/run-7/pretrain")
    assert a == launch.job_name("run-7", "pretrain", "s3://blip/pipeline/runs/run-7/pretrain")
    others = {launch.job_name("run-8", "pretrain", "s3://blip/pipeline/runs/run-7/pretrain"),
              launch.job_name("run-7", "repretrain", "s3://blip/pipeline/runs/run-7/pretrain"),
              launch.job_name("run-7", "pretrain", "s3://blip/pipeline/runs/run-7/pretrain2"),
              launch.job_name(None, "pretrain", "s3://blip/pipeline/runs/run-7/pretrain")}
    assert a not in others and len(others) == 4
    for stage in ("pretrain", "finetune-captioner", "Weird_Stage.Name" * 5, "-"):
        name = launch.job_name("r", stage, "o")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 36, name


def test_dry_run_names_the_job_after_run_stage_and_output():
    res = launch.launch("finetune", ["--task", "filter", "--init", "s3://blip/r/pre", *ARGS], scheduler="kubernetes",
                        run_id="run-7", dryrun=True)
    job = res.request
    expected = launch.job_name("run-7", "finetune-filter", ARGS[-1])
    assert job["metadata"]["name"] == expected and res.handle.endswith(f"blip-jobs:{expected}")
    again = launch.launch("finetune", ["--task", "filter", "--init", "s3://blip/r/pre", *ARGS],
                          scheduler="kubernetes", run_id="run-7", dryrun=True).request
    assert json.dumps(again["spec"]["tasks"][0]["template"]["metadata"]) == json.dumps(
        job["spec"]["tasks"][0]["template"]["metadata"])  # no random id left anywhere in the pods' labels
    for task in job["spec"]["tasks"]:
        assert len(f"{expected}-{task['name']}-0") <= 63  # the pod name Volcano derives


def test_a_relaunch_replaces_the_running_job_of_an_earlier_attempt(volcano):
    name = launch.job_name("run-7", "pretrain", ARGS[-1])
    volcano.add("blip-jobs", name, "Running")  # left behind by an attempt whose launcher was killed
    volcano.phase = "Completed"  # the new job finishes at once
    res = launch.launch("pretrain", ARGS, scheduler="kubernetes", run_id="run-7", stream=False, poll_s=0.05)
    assert res.succeeded and res.handle.endswith(f"blip-jobs:{name}")
    calls = [c for c in volcano.calls if c[1] == f"blip-jobs/{name}" or c[0].startswith("POST")]
    ops = [c[0] for c in calls]
    aborted = ops.index("PUT status")  # the old job is aborted ...
    deleted = ops.index("DELETE")  # ... deleted ...
    created = ops.index("POST")  # ... and only then is the new one created under the same name
    assert aborted < deleted < created
    assert volcano.phase_of("blip-jobs", name) == "Completed"


def test_a_finished_job_of_an_earlier_attempt_is_deleted_not_aborted(volcano):
    name = launch.job_name("run-7", "pretrain", ARGS[-1])
    volcano.add("blip-jobs", name, "Failed")
    volcano.phase = "Completed"
    launch.launch("pretrain", ARGS, scheduler="kubernetes", run_id="run-7", stream=False, poll_s=0.05)
    ops = [c[0] for c in volcano.calls if c[1] == f"blip-jobs/{name}"]
    assert "PUT status" not in ops and "DELETE" in ops


def test_sigterm_cancels_the_job(volcano, tmp_path):
    """Kubernetes deletes or evicts the pipeline step: the launcher gets SIGTERM and aborts its job."""
    volcano.phase = "Running"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KUBECONFIG": os.environ["KUBECONFIG"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "components.launch", "pretrain", "--scheduler", "kubernetes", "--run-id", "run-7",
         "--", *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = launch.job_name("run-7", "pretrain", ARGS[-1])
    try:
        deadline = time.monotonic() + 120
        while volcano.phase_of("blip-jobs", name) != "Running":
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job was never created"
            time.sleep(0.1)
        time.sleep(1.0)  # the launcher is now following the job
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert volcano.phase_of("blip-jobs", name) == "Aborted", err
    assert proc.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("launch: error:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err, err


def test_policy_is_checked_before_anything_reaches_the_cluster(volcano):
    with pytest.raises(UserError, match="secret 'blip-minio-root' is not allowed"):
        launch.launch("pretrain", ARGS, scheduler="kubernetes", secrets=["blip-s3-credentials", "blip-minio-root"],
                      stream=False)
    assert volcano.calls == []
