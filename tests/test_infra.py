"""Infra checks: every kustomize tree under infra/k8s renders with `kubectl kustomize`, and the rendered objects
carry the essentials (images pinned by digest, ports, probes, resources, the restricted Pod Security level,
services that reach their pods, generated secrets kept out of the job namespace, default-deny network policies,
MLflow authentication, one least-privilege S3 key per role, the Volcano queue, RBAC for the TorchX launcher).
The trees render from a copy of infra/k8s in which every secret template is filled with random values, as an
operator would. The Dockerfiles are checked structurally, since no image can be built here."""

from __future__ import annotations

import atexit
import configparser
import fnmatch
import functools
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SECRETS_DIR = K8S / "secrets"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
NAMESPACE = "blip"  # the platform: MinIO, PostgreSQL, MLflow
JOBS_NAMESPACE = "blip-jobs"  # the TorchX training jobs
STEP_NAMESPACES = {"overlays/local": "kubeflow", "overlays/prod": "blip-team"}  # where the Kubeflow steps run
PLATFORM_SECRETS = {"blip-minio-root", "blip-postgres", "blip-mlflow-admin", "blip-s3-mlflow", "blip-s3-dvc"}
JOB_SECRETS = {"blip-s3-credentials", "blip-mlflow-credentials"}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
CLUSTER_SCOPED_KINDS = {"Namespace", "Queue", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}

# Default credentials of the images we run, and other values that must never be committed.
KNOWN_SECRET_LITERALS = ["minio123", "minioadmin", "miniostorage", "password123", "changeme", "hunter2"]
SECRET_ASSIGNMENT = re.compile(
    r"""(?imx) ^ \s* [\w.-]* (password|passwd|secret_access_key|secret[_-]key|access_key_id|token|root_user)
        \s* [:=] [ \t]* (?P<value>[^\s#]*)"""
)
URI_WITH_CREDENTIALS = re.compile(r"[a-z][\w+.-]*://(?P<user>[^\s/:@]+):(?P<password>[^\s/@]+)@")
REFERENCE = re.compile(r"""^['"]?(\$\(\w+\)|\$\{\w+\}|\$\w+)['"]?$""")


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _kubectl() -> str | None:
    return shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)


def _kustomizations() -> list[str]:
    """Every kustomization under infra/k8s that deploys the stack (Components only render inside one; the
    secrets kustomization is part of base)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization")
        if kind == "Kustomization" and path.parent != SECRETS_DIR:
            found.append(path.parent.relative_to(K8S).as_posix())
    return found


KUSTOMIZATIONS = _kustomizations()


@functools.cache
def _filled_tree() -> Path:
    """A copy of infra/k8s with every secret template filled in (random values), as docs/deploy.md has the
    operator do; the secret generators read those files."""
    root = Path(tempfile.mkdtemp(prefix="blip-k8s-"))
    atexit.register(shutil.rmtree, root, True)
    tree = root / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    for template in (tree / "secrets").glob("*.env.example"):
        lines = [
            f"{line.strip()}{secrets.token_hex(12)}" if line.strip().endswith("=") else line
            for line in template.read_text().splitlines()
        ]
        template.with_suffix("").write_text("\n".join(lines) + "\n")
    return tree


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize trees cannot be rendered")
    proc = subprocess.run(
        [kubectl, "kustomize", str(_filled_tree() / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize infra/k8s/{target} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"infra/k8s/{target} rendered no objects"
    return docs


def _by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _containers(obj: dict, init: bool = True) -> list[dict]:
    spec = _pod_spec(obj)
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def _where(obj: dict, container: dict | None = None) -> str:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    return f"{name} container {container['name']}" if container else name


def _cpu(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _memory(quantity) -> float:
    q = str(quantity)
    for unit, factor in _MEMORY_UNITS.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _service_for_url(docs, url: str) -> tuple[dict, int]:
    """The Service an in-cluster URL (name, name.ns, name.ns.svc[.cluster.local]) points at, and its port."""
    parts = urlsplit(url)
    labels = parts.hostname.split(".")
    name = labels[0]
    namespace = labels[1] if len(labels) > 1 else NAMESPACE
    assert labels[2:] in ([], ["svc"], ["svc", "cluster", "local"]), f"{url} is not an in-cluster service URL"
    service = [
        s
        for s in _by_kind(docs, "Service")
        if s["metadata"]["name"] == name and s["metadata"].get("namespace") == namespace
    ]
    assert service, f"{url}: no Service {namespace}/{name} in the rendered objects"
    ports = [p["port"] for p in service[0]["spec"]["ports"]]
    assert parts.port in ports, f"{url}: Service {name} exposes ports {ports}, not {parts.port}"
    return service[0], parts.port


# ---------------------------------------------------------------------------------------------------------------
# rendered objects


def test_expected_kustomizations_exist():
    assert {"base", "overlays/local", "overlays/prod"} <= set(KUSTOMIZATIONS), KUSTOMIZATIONS


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_renders_unique_named_objects(target):
    docs = _render(target)
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {target}"
    kinds = {d["kind"] for d in docs}
    expected = set("Namespace Deployment StatefulSet Service Queue ServiceAccount Role RoleBinding".split())
    assert expected <= kinds, f"{target} lacks {expected - kinds}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_objects_live_in_the_platform_or_the_job_namespace(target):
    """The platform (MinIO, PostgreSQL, MLflow) runs in blip, the training jobs' accounts and settings live in
    blip-jobs; the only object in the Kubeflow steps' namespace is the launch policy."""
    docs = _render(target)
    _one(docs, "Namespace", NAMESPACE)
    _one(docs, "Namespace", JOBS_NAMESPACE)
    step_namespace = STEP_NAMESPACES.get(target)
    for d in docs:
        namespace = d["metadata"].get("namespace")
        if d["kind"] in CLUSTER_SCOPED_KINDS:
            assert namespace is None, f"cluster-scoped {d['kind']}/{d['metadata']['name']} has a namespace"
        elif namespace == step_namespace:
            assert (d["kind"], d["metadata"]["name"]) == ("ConfigMap", "blip-launch-policy"), _where(d)
        else:
            assert namespace in (NAMESPACE, JOBS_NAMESPACE), f"{_where(d)} is in namespace {namespace!r}"
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        assert obj["metadata"]["namespace"] == NAMESPACE, f"{_where(obj)} runs outside the platform namespace"
    for kind, name in (("ServiceAccount", "blip-trainer"), ("Role", "blip-torchx-launcher"),
                       ("ConfigMap", "blip-settings")):
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert [d["metadata"]["namespace"] for d in found] == [JOBS_NAMESPACE], f"{kind}/{name}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_images_are_pinned_by_digest(target):
    """A tag can be moved to other content; a digest cannot. Every image is name[:tag]@sha256:<64 hex>."""
    docs = _render(target)
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert workloads
    for obj in workloads:
        for c in _containers(obj):
            assert DIGEST.search(c["image"]), f"{_where(obj, c)}: image {c['image']} is not pinned by digest"


def test_image_digests_come_from_kustomize_images():
    """The digests are set in one place per tree (kustomize `images:`), which the operator edits: every image a
    workload names has an entry with a digest in base, and prod re-points its own registry with a digest too."""
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    entries = {e["name"]: e for e in base["images"]}
    for obj in (d for d in _render("base") if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            name = c["image"].split("@")[0].rsplit(":", 1)[0] if "@" in c["image"] else c["image"]
            assert name in entries and re.fullmatch(r"sha256:[0-9a-f]{64}", entries[name]["digest"]), name
    prod = yaml.safe_load((K8S / "overlays" / "prod" / "kustomization.yaml").read_text())
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"]) for e in prod["images"])


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_long_running_containers_have_ports_and_probes(target):
    docs = _render(target)
    workloads = [d for d in docs if d["kind"] in LONG_RUNNING_KINDS]
    assert {w["metadata"]["name"] for w in workloads} >= {"minio", "postgres", "mlflow"}
    for obj in workloads:
        for c in _containers(obj, init=False):
            where = _where(obj, c)
            ports = c.get("ports", [])
            assert ports and all(p.get("containerPort") for p in ports), f"{where}: no container ports"
            names = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
            for probe_name in ("readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                assert probe, f"{where}: no {probe_name}"
                handler = (
                    probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc") or probe.get("exec")
                )
                assert handler, f"{where}: {probe_name} has no handler"
                if "port" in handler:
                    assert handler["port"] in names, (
                        f"{where}: {probe_name} port {handler['port']} not exposed"
                    )


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(target):
    docs = _render(target)
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            where = _where(obj, c)
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(section, {}), f"{where}: no {section}.{resource}"
            assert _cpu(resources["requests"]["cpu"]) <= _cpu(resources["limits"]["cpu"]), where
            assert _memory(resources["requests"]["memory"]) <= _memory(resources["limits"]["memory"]), where


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_pods_run_as_non_root_without_privilege_escalation(target):
    docs = _render(target)
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        pod = _pod_spec(obj)
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, f"{_where(obj)} mounts an API token"
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), _where(obj)
        for c in _containers(obj):
            where = _where(obj, c)
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, (
                f"{where}: runAsNonRoot not true"
            )
            user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
            assert user is None or user > 0, f"{where}: runs as uid {user}"
            assert ctx.get("allowPrivilegeEscalation") is False, (
                f"{where}: allowPrivilegeEscalation not false"
            )
            assert not ctx.get("privileged"), f"{where}: privileged"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"


# Volume types the "restricted" Pod Security level admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict, where: str) -> list[str]:
    """What keeps a pod spec from the "restricted" Pod Security Standard (the checks of Kubernetes 1.27+)."""
    found = []
    ctx = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        found.append(f"{where}: host namespaces")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"{where}: volume {volume['name']} of type {kinds - RESTRICTED_VOLUMES}")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        cctx = c.get("securityContext", {})
        name = f"{where} container {c['name']}"
        if cctx.get("runAsNonRoot", ctx.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if 0 in (cctx.get("runAsUser"), ctx.get("runAsUser")):
            found.append(f"{name}: runs as uid 0")
        if cctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if cctx.get("privileged"):
            found.append(f"{name}: privileged")
        caps = cctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities are not all dropped")
        seccomp = cctx.get("seccompProfile", ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccomp profile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: host port")
    return found


def test_restricted_checker_flags_what_the_level_forbids():
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(good, "pod") == []
    assert restricted_violations({**good, "securityContext": {"runAsNonRoot": True}}, "pod")
    assert restricted_violations({**good, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "pod")
    bad = {**good, "containers": [{"name": "c", "securityContext": {"capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(bad, "pod")


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_namespaces_enforce_the_restricted_pod_security_level(target):
    docs = _render(target)
    for name in (NAMESPACE, JOBS_NAMESPACE):
        labels = _one(docs, "Namespace", name)["metadata"]["labels"]
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", f"namespace {name}: {labels}"
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        assert not restricted_violations(_pod_spec(obj), _where(obj))


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_services_select_existing_pods_and_ports(target):
    docs = _render(target)
    pods = [d for d in docs if d["kind"] in LONG_RUNNING_KINDS]
    for svc in _by_kind(docs, "Service"):
        selector = svc["spec"].get("selector")
        assert selector, f"Service/{svc['metadata']['name']} selects nothing"
        matching = [
            p
            for p in pods
            if p["metadata"].get("namespace") == svc["metadata"].get("namespace")
            and selector.items() <= p["spec"]["template"]["metadata"].get("labels", {}).items()
        ]
        assert matching, f"Service/{svc['metadata']['name']} selector {selector} matches no pod template"
        for p in matching:
            assert (
                p["spec"]["selector"]["matchLabels"].items()
                <= p["spec"]["template"]["metadata"]["labels"].items()
            )
        exposed = {
            key
            for p in matching
            for c in _containers(p, init=False)
            for port in c.get("ports", [])
            for key in (port.get("name"), port["containerPort"])
        }
        for port in svc["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            assert target_port in exposed, (
                f"Service/{svc['metadata']['name']} targets unknown port {target_port}"
            )


# Built-in kinds rendered here; each has a typed model V1<Kind> in the Kubernetes Python client.
API_KINDS = set("Namespace ConfigMap ServiceAccount Role RoleBinding PersistentVolumeClaim Service".split())
API_KINDS |= {"Deployment", "StatefulSet", "Job", "PodDisruptionBudget", "NetworkPolicy", "Secret"}


def _unknown_fields(raw, known, path="") -> list[str]:
    """Paths present in raw but absent from known (raw re-serialised through a typed model)."""
    if isinstance(raw, list) and isinstance(known, list):
        return [m for i, (r, k) in enumerate(zip(raw, known)) for m in _unknown_fields(r, k, f"{path}/{i}")]
    if not isinstance(raw, dict):
        return []
    missing = []
    for key, value in raw.items():
        inner = known.get(key) if isinstance(known, dict) else None
        missing += [f"{path}/{key}"] if inner is None else _unknown_fields(value, inner, f"{path}/{key}")
    return missing


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_built_in_objects_use_only_known_api_fields(target):
    """A misspelt field (readinesProbe, allowPrivilegeEscalatoin) renders fine and is silently dropped by
    the API server; a round trip through the Kubernetes client's typed models finds it."""
    client = pytest.importorskip("kubernetes.client", reason="the kubernetes Python client is not installed")
    api = client.ApiClient()
    checked = 0
    for obj in _render(target):
        if obj["kind"] not in API_KINDS:
            continue
        response = type("Response", (), {"data": json.dumps(obj)})()
        typed = api.sanitize_for_serialization(api.deserialize(response, "V1" + obj["kind"]))
        assert not _unknown_fields(obj, typed), f"{_where(obj)}: unknown fields {_unknown_fields(obj, typed)}"
        checked += 1
    assert checked >= 10


def _secret_examples() -> dict[str, dict[str, str]]:
    """Secret name -> {key: value} from infra/k8s/secrets/<name>.env.example (secret blip-<name>)."""
    examples = {}
    for path in sorted(SECRETS_DIR.glob("*.env.example")):
        pairs = {}
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                pairs[key.strip()] = value.strip()
        examples["blip-" + path.name.removesuffix(".env.example")] = pairs
    return examples


def test_secret_templates_hold_no_values():
    examples = _secret_examples()
    assert PLATFORM_SECRETS | JOB_SECRETS == set(examples)
    for role in ("blip-s3-credentials", "blip-s3-mlflow", "blip-s3-dvc"):
        assert set(examples[role]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(examples["blip-mlflow-credentials"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    for name, pairs in examples.items():
        assert pairs, f"{name} template declares no keys"
        assert all(v == "" for v in pairs.values()), f"{name} template carries values: {pairs}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_secrets_are_generated_and_referenced_by_name(target):
    """Every Secret is generated from its template's env file (same keys), and every reference names one."""
    docs = _render(target)
    examples = _secret_examples()
    generated = _by_kind(docs, "Secret")
    assert {s["metadata"]["name"] for s in generated} == set(examples)
    for secret in generated:
        assert set(secret["data"]) == set(examples[secret["metadata"]["name"]]), _where(secret)
    refs = set()
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            for e in c.get("env", []):
                literal = f"{e['name']}={e.get('value', '')}"
                assert not _secret_literals(literal), (
                    f"{_where(obj, c)}: literal credential in env {e['name']}"
                )
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    name = source["secretRef"]["name"]
                    refs.update((name, key) for key in examples.get(name, {"?": ""}))
    assert refs, "no workload reads a secret"
    present = {(s["metadata"]["name"], s["metadata"]["namespace"]) for s in generated}
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            names = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})}
            for name in names:
                assert (name, obj["metadata"]["namespace"]) in present, f"{_where(obj, c)}: no secret {name}"
    for name, key in sorted(refs):
        assert name in examples, f"secret {name} has no template infra/k8s/secrets/*.env.example"
        assert key in examples[name], f"secret {name} key {key} is missing from its template"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_volcano_queue_matches_settings(target):
    docs = _render(target)
    queues = _by_kind(docs, "Queue")
    assert len(queues) == 1
    queue = queues[0]
    assert queue["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    settings = _one(docs, "ConfigMap", "blip-settings")["data"]
    assert queue["metadata"]["name"] == settings["BLIP_VOLCANO_QUEUE"]
    assert settings["BLIP_K8S_NAMESPACE"] == JOBS_NAMESPACE
    capability = queue["spec"]["capability"]
    assert _cpu(capability["cpu"]) > 0 and _memory(capability["memory"]) > 0


def _granted(role: dict, group: str, resource: str) -> set[str]:
    verbs = set()
    for rule in role["rules"]:
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs |= set(rule["verbs"])
    return verbs


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_pipeline_service_account_may_launch_volcano_jobs(target):
    docs = _render(target)
    settings = _one(docs, "ConfigMap", "blip-settings")["data"]
    pipeline_sa = _one(docs, "ServiceAccount", settings["BLIP_PIPELINE_SERVICE_ACCOUNT"])
    trainer_sa = _one(docs, "ServiceAccount", settings["BLIP_TRAINER_SERVICE_ACCOUNT"])
    assert trainer_sa.get("automountServiceAccountToken") is False

    launchers = []
    for binding in _by_kind(docs, "RoleBinding"):
        role = _one(docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        if {"create", "get", "list", "watch", "delete"} <= _granted(role, "batch.volcano.sh", "jobs"):
            launchers.append((binding, role))
    assert launchers, "no RoleBinding grants create/get/list/watch/delete on jobs.batch.volcano.sh"
    for _, role in launchers:
        assert {"get", "list", "watch"} <= _granted(role, "", "pods")
        assert "get" in _granted(role, "", "pods/log")
        assert {"get", "update"} <= _granted(role, "batch.volcano.sh", "jobs/status")  # TorchX cancel
        assert not any("*" in r["verbs"] or "*" in r.get("resources", []) for r in role["rules"])
    subjects = {(s["kind"], s.get("namespace"), s["name"]) for b, _ in launchers for s in b["subjects"]}
    assert ("ServiceAccount", JOBS_NAMESPACE, pipeline_sa["metadata"]["name"]) in subjects
    if target == "overlays/local":
        assert ("ServiceAccount", "kubeflow", "pipeline-runner") in subjects


def _args(container: dict) -> dict[str, str]:
    args = container.get("command", [])[2:] + container.get("args", [])
    flags = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            flags[key] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return flags


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_mlflow_server_wiring(target):
    docs = _render(target)
    deployment = _one(docs, "Deployment", "mlflow")
    (server,) = [c for c in _containers(deployment, init=False) if c["name"] == "mlflow"]
    assert server["command"][:2] == ["mlflow", "server"]
    flags = _args(server)
    env = _env(server)

    backend = flags["--backend-store-uri"]
    assert backend.startswith("postgresql://")
    assert "@" not in backend and "$(" not in backend, f"credentials in the database URI: {backend}"
    for var, key in (("PGUSER", "POSTGRES_USER"), ("PGPASSWORD", "POSTGRES_PASSWORD")):  # read by libpq
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "blip-postgres", "key": key}
    _service_for_url(docs, backend)

    destination = flags["--artifacts-destination"]
    assert destination.startswith("s3://")
    buckets = _env(_one(docs, "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0])["BUCKETS"]
    assert urlsplit(destination).netloc in buckets["value"].split(), "the artifact bucket is never created"
    assert _policy_buckets(docs, "blip-mlflow")["rw"] == {urlsplit(destination).netloc}
    assert flags["--host"] == "0.0.0.0"
    assert int(flags["--port"]) in {p["containerPort"] for p in server["ports"]}

    s3_endpoint = env["MLFLOW_S3_ENDPOINT_URL"]["value"]
    minio, _ = _service_for_url(docs, s3_endpoint)
    assert minio["metadata"]["name"] == "minio"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "blip-s3-mlflow"  # its own key, not the steps'

    allowed = [h.strip() for h in flags["--allowed-hosts"].split(",")]
    assert "*" not in allowed, "host-header protection is switched off"
    tracking = urlsplit(_one(docs, "ConfigMap", "blip-settings")["data"]["MLFLOW_TRACKING_URI"])
    service, _ = _service_for_url(docs, tracking.geturl())
    assert service["metadata"]["name"] == "mlflow"
    for host in (tracking.netloc, "mlflow.blip.svc.cluster.local:5000", "localhost:5000", "127.0.0.1:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), f"MLflow would reject Host: {host}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_settings_urls_point_at_rendered_services(target):
    docs = _render(target)
    settings = _one(docs, "ConfigMap", "blip-settings")["data"]
    urls = [v for v in settings.values() if v.startswith("http://")]
    assert len(urls) >= 2
    for url in urls:
        _service_for_url(docs, url)
    minio_setup = _env(_one(docs, "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0])
    _service_for_url(docs, "http://" + minio_setup["S3_HOST"]["value"])
    _service_for_url(docs, _env(_containers(_one(docs, "Job", "mlflow-setup"))[0])["MLFLOW_URL"]["value"])
    buckets = minio_setup["BUCKETS"]["value"].split()
    for key in ("BLIP_DATA_ROOT", "BLIP_DVC_REMOTE"):
        assert urlsplit(settings[key]).netloc in buckets, f"{key} names a bucket the setup job never creates"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_mlflow_requires_authentication(target):
    """The server runs the basic-auth app; its users live in PostgreSQL (shared by every replica); the
    administrator comes from blip-mlflow-admin; mlflow-setup creates the pipeline's user from
    blip-mlflow-credentials; pipeline steps and training pods get that account, never the administrator."""
    docs = _render(target)
    (server,) = [c for c in _containers(_one(docs, "Deployment", "mlflow"), init=False) if c["name"] == "mlflow"]
    flags, env = _args(server), _env(server)
    assert flags.get("--app-name") == "basic-auth"
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "blip-mlflow-admin", "key": var}
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = [m for m in server["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in _pod_spec(_one(docs, "Deployment", "mlflow"))["volumes"] if v["name"] == mount[0]["name"]]
    config_map = _one(docs, "ConfigMap", volume["configMap"]["name"])
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][config_path.name])
    auth = ini["mlflow"]
    assert auth["default_permission"] in ("READ", "NO_PERMISSIONS"), "signed-in users could write everything"
    assert auth["database_uri"] == flags["--backend-store-uri"], "users must live in the shared database"
    assert "admin_password" not in auth and "admin_username" not in auth

    setup = _env(_containers(_one(docs, "Job", "mlflow-setup"))[0])
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert setup[var]["valueFrom"]["secretKeyRef"]["name"] == "blip-mlflow-credentials"
    jobs_secrets = {s["metadata"]["name"] for s in _by_kind(docs, "Secret")
                    if s["metadata"]["namespace"] == JOBS_NAMESPACE}
    assert "blip-mlflow-credentials" in jobs_secrets and "blip-mlflow-admin" not in jobs_secrets


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_platform_secrets_stay_out_of_the_job_namespace(target):
    """A training job can only read secrets of its own namespace: only the job keys may be there, and the launch
    policy allows no others."""
    docs = _render(target)
    by_namespace: dict[str, set[str]] = {}
    for secret in _by_kind(docs, "Secret"):
        by_namespace.setdefault(secret["metadata"]["namespace"], set()).add(secret["metadata"]["name"])
    assert by_namespace[JOBS_NAMESPACE] == JOB_SECRETS
    assert PLATFORM_SECRETS <= by_namespace[NAMESPACE]
    if target in STEP_NAMESPACES:
        policy = _one(docs, "ConfigMap", "blip-launch-policy")["data"]
        allowed = set(filter(None, re.split(r"[,\s]+", policy["BLIP_LAUNCH_SECRETS"])))
        assert allowed == JOB_SECRETS
        assert set(re.split(r"[,\s]+", policy["BLIP_LAUNCH_NAMESPACES"])) == {JOBS_NAMESPACE}


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_no_secret_on_a_command_line(target):
    """Arguments are world-readable in /proc/<pid>/cmdline (and kubelet expands $(VAR) into them): no container
    passes a secret-backed variable, or a URI with a password, as an argument."""
    docs = _render(target)
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            text = " ".join(c.get("command", []) + c.get("args", []))
            used = set(re.findall(r"\$\((\w+)\)", text))
            assert not used & secret_vars, f"{_where(obj, c)} puts {used & secret_vars} on its command line"
            for m in URI_WITH_CREDENTIALS.finditer(text):  # ${VAR} is the shell's, inside the process
                password = m.group("password")
                assert REFERENCE.match(password) and not password.startswith("$("), f"{_where(obj, c)}: {m[0]}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_minio_console_is_not_published(target):
    docs = _render(target)
    minio = _one(docs, "Deployment", "minio")
    (server,) = _containers(minio, init=False)
    assert [p["containerPort"] for p in server["ports"]] == [9000]
    assert [p["port"] for p in _one(docs, "Service", "minio")["spec"]["ports"]] == [9000]
    assert "--console-address" not in server["args"]
    assert _env(server)["MINIO_BROWSER"]["value"] == "off"


def _policy_buckets(docs, policy: str) -> dict[str, set[str]]:
    """Buckets a MinIO policy (ConfigMap minio-policies) grants: {"rw": ..., "ro": ...}; asserts least privilege."""
    document = json.loads(_one(docs, "ConfigMap", "minio-policies")["data"][f"{policy}.json"])
    allowed_actions = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                       "s3:ListMultipartUploadParts", "s3:ListBucket", "s3:GetBucketLocation",
                       "s3:ListBucketMultipartUploads"}
    writes: set[str] = set()
    reads: set[str] = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = set(statement["Action"])
        assert actions <= allowed_actions, f"{policy}: {actions - allowed_actions}"
        for resource in statement["Resource"]:
            assert resource.startswith("arn:aws:s3:::") and "*" not in resource.split("/")[0], resource
            bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
            (writes if "s3:PutObject" in actions else reads).add(bucket)
    return {"rw": writes, "ro": reads - writes}


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_one_least_privilege_s3_key_per_role(target):
    """Pipeline steps and training pods, the MLflow server and DVC/readers each have their own MinIO user, created
    by minio-setup from their own secret, with a policy limited to their buckets."""
    docs = _render(target)
    setup = _containers(_one(docs, "Job", "minio-setup"))[0]
    env = _env(setup)
    roles = env["ROLES"]["value"].split()
    keys = {}
    for role in roles:
        ref = env[f"{role}_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
        assert env[f"{role}_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == ref["name"]
        keys[role] = ref["name"]
    assert keys == {"PIPELINE": "blip-s3-credentials", "MLFLOW": "blip-s3-mlflow", "DVC": "blip-s3-dvc"}
    script = setup["args"][0]
    assert "s3:*" not in script and "/policies/$policy.json" in script
    settings = _one(docs, "ConfigMap", "blip-settings")["data"]
    data_bucket = urlsplit(settings["BLIP_DATA_ROOT"]).netloc
    dvc_bucket = urlsplit(settings["BLIP_DVC_REMOTE"]).netloc
    assert _policy_buckets(docs, "blip-pipeline") == {"rw": {data_bucket}, "ro": set()}
    assert _policy_buckets(docs, "blip-dvc") == {"rw": {dvc_bucket}, "ro": {data_bucket}}
    assert len(_policy_buckets(docs, "blip-mlflow")["rw"]) == 1
    # the S3 keys each workload holds
    for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(obj):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("key") == "AWS_SECRET_ACCESS_KEY":
                    expected = {"mlflow": "blip-s3-mlflow", "minio-setup": ref["name"]}[obj["metadata"]["name"]]
                    assert ref["name"] == expected, f"{_where(obj, c)} holds {ref['name']}"


# ---------------------------------------------------------------------------------------------------------------
# network policies: a small evaluator of NetworkPolicy semantics over the rendered objects

Endpoint = tuple  # (namespace, pod labels); None = outside the cluster


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, present = labels.get(expr["key"]), expr["key"] in labels
        op = expr["operator"]
        if (
            (op == "In" and (not present or value not in expr["values"]))
            or (op == "NotIn" and present and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def _peer_matches(peer: dict, policy_namespace: str, other: Endpoint | None) -> bool:
    if other is None:
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False
    namespace, labels = other
    ns_selector = peer.get("namespaceSelector")
    in_namespace = (
        namespace == policy_namespace
        if ns_selector is None
        else _selects(ns_selector, {"kubernetes.io/metadata.name": namespace})
    )
    return in_namespace and _selects(peer.get("podSelector", {}), labels)


def _side_allows(docs, direction: str, pod: Endpoint, other: Endpoint | None, port: int, protocol: str) -> bool:
    namespace, labels = pod
    policies = [
        p
        for p in _by_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True  # not isolated in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in policy["spec"].get(rules_key, []):
            peers = rule.get(peers_key)
            ports = rule.get("ports")
            port_ok = not ports or any(
                p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
            )
            if port_ok and (not peers or any(_peer_matches(peer, namespace, other) for peer in peers)):
                return True
    return False


def can_connect(docs, source: Endpoint | None, target: Endpoint | None, port: int, protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let source open a connection to target:port."""
    egress = source is None or _side_allows(docs, "Egress", source, target, port, protocol)
    ingress = target is None or _side_allows(docs, "Ingress", target, source, port, protocol)
    return egress and ingress


def _pod_labels(docs, kind: str, name: str) -> Endpoint:
    obj = _one(docs, kind, name)
    return obj["metadata"]["namespace"], obj["spec"]["template"]["metadata"]["labels"]


def _training_pod() -> Endpoint:
    """The labels TorchX puts on a training pod, from a real dry run of the launcher."""
    launch = pytest.importorskip("components.launch", reason="torchx is not installed (the workflow extra)")
    job = launch.launch("pretrain", ["--data", "s3://blip/d", "--output", "s3://blip/o"], scheduler="kubernetes",
                        dryrun=True).request
    return JOBS_NAMESPACE, job["spec"]["tasks"][0]["template"]["metadata"]["labels"]


def test_network_policy_evaluator():
    docs = (
        {"kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "a"},
         "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}},
        {"kind": "NetworkPolicy", "metadata": {"name": "web", "namespace": "a"},
         "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}],
                               "ports": [{"port": 80}]}]}},
    )
    assert can_connect(docs, ("b", {}), ("a", {"app": "web"}), 80)
    assert not can_connect(docs, ("b", {}), ("a", {"app": "web"}), 81)
    assert not can_connect(docs, ("c", {}), ("a", {"app": "web"}), 80)
    assert not can_connect(docs, ("a", {"app": "web"}), ("b", {}), 80)  # egress of a is denied
    assert can_connect(docs, ("b", {}), ("c", {}), 80) and can_connect(docs, ("b", {}), None, 443)


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_network_policies_deny_by_default_in_both_namespaces(target):
    docs = _render(target)
    for namespace in (NAMESPACE, JOBS_NAMESPACE):
        deny = [
            p for p in _by_kind(docs, "NetworkPolicy")
            if p["metadata"]["namespace"] == namespace and p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")
        ]
        assert deny, f"no default-deny NetworkPolicy in {namespace}"
        stray = (namespace, {"app": "anything"})
        assert not can_connect(docs, ("default", {}), stray, 8080)
        assert not can_connect(docs, stray, None, 443), f"{namespace}: a pod may reach the internet"
        dns = ("kube-system", {"k8s-app": "kube-dns"})
        assert can_connect(docs, stray, dns, 53, "UDP") and can_connect(docs, stray, dns, 53, "TCP")
        assert not can_connect(docs, stray, dns, 54, "UDP")
        assert not can_connect(docs, stray, ("kube-system", {"k8s-app": "other"}), 53, "UDP")
    # the DNS rules open port 53 and nothing else
    for policy in _by_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}:
                    assert {p["port"] for p in rule["ports"]} == {53}, _where(policy)


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_network_policies_admit_only_the_pipeline(target):
    """MLflow: only the pipeline namespaces (the training jobs' and the Kubeflow steps') and mlflow-setup.
    MinIO: MLflow, minio-setup and the pipeline namespaces. PostgreSQL: MLflow only."""
    docs = _render(target)
    mlflow, minio, postgres = (_pod_labels(docs, kind, name) for kind, name in
                               (("Deployment", "mlflow"), ("Deployment", "minio"), ("StatefulSet", "postgres")))
    minio_setup, mlflow_setup = _pod_labels(docs, "Job", "minio-setup"), _pod_labels(docs, "Job", "mlflow-setup")
    trainer = _training_pod()
    pipeline = [trainer]
    if target in STEP_NAMESPACES:
        pipeline.append((STEP_NAMESPACES[target], {"workflows.argoproj.io/workflow": "blip-capfilt-x"}))
    outsiders = [("default", {}), ("other-team", {"app.kubernetes.io/name": "mlflow"}),
                 (JOBS_NAMESPACE, {"app": "not-a-training-pod"})]
    if target == "overlays/local":
        outsiders.append(("blip-team", {}))
    for pod in pipeline:
        assert can_connect(docs, pod, mlflow, 5000), f"{pod} cannot reach MLflow"
        assert can_connect(docs, pod, minio, 9000), f"{pod} cannot reach MinIO"
        assert not can_connect(docs, pod, postgres, 5432), f"{pod} reaches PostgreSQL"
        assert not can_connect(docs, pod, mlflow, 5432) and not can_connect(docs, pod, minio, 9001)
    for pod in outsiders:
        for target_pod, port in ((mlflow, 5000), (minio, 9000), (postgres, 5432)):
            assert not can_connect(docs, pod, target_pod, port), f"{pod} reaches {target_pod[1]}:{port}"
    assert can_connect(docs, mlflow, postgres, 5432) and can_connect(docs, mlflow, minio, 9000)
    assert not can_connect(docs, mlflow, None, 443), "MLflow may reach the internet"
    assert can_connect(docs, minio_setup, minio, 9000) and not can_connect(docs, minio_setup, postgres, 5432)
    assert can_connect(docs, mlflow_setup, mlflow, 5000) and not can_connect(docs, mlflow_setup, minio, 9000)
    for pod in (minio_setup, mlflow_setup, minio):
        assert not can_connect(docs, pod, postgres, 5432)
    # the training pods of a job reach each other (rendezvous, NCCL) and nothing else but MLflow, MinIO, DNS
    assert can_connect(docs, trainer, trainer, 29500) and not can_connect(docs, trainer, None, 443)
    # policies name namespaces by kubernetes.io/metadata.name, which nobody can relabel
    for policy in _by_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                selector = peer.get("namespaceSelector")
                if selector is not None:
                    keys = set(selector.get("matchLabels", {})) | {e["key"] for e in selector.get("matchExpressions", [])}
                    assert keys == {"kubernetes.io/metadata.name"}, _where(policy)


def test_overlays_size_the_stack():
    base, local, prod = (_render(t) for t in ("base", "overlays/local", "overlays/prod"))

    def limit(docs, kind, name):
        return _memory(_containers(_one(docs, kind, name), init=False)[0]["resources"]["limits"]["memory"])

    for kind, name in (("Deployment", "minio"), ("StatefulSet", "postgres"), ("Deployment", "mlflow")):
        assert limit(local, kind, name) <= limit(base, kind, name) < limit(prod, kind, name), name
    assert _one(prod, "Deployment", "mlflow")["spec"]["replicas"] >= 2
    assert _one(prod, "PodDisruptionBudget", "mlflow")
    assert _one(prod, "PersistentVolumeClaim", "minio-data")["spec"].get("storageClassName")
    assert _one(prod, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"][0]["spec"].get(
        "storageClassName"
    )
    for kind, name in (("Deployment", "minio"), ("StatefulSet", "postgres")):
        assert _one(prod, kind, name)["spec"]["replicas"] == 1, f"{name} is single-writer"


# ---------------------------------------------------------------------------------------------------------------
# committed files


def _committable_files(folder: Path) -> list[Path]:
    """Files under folder that git would commit: tracked, plus untracked ones that are not ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", str(folder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".env"]
    return [f for f in files if f.is_file()]


def _secret_literals(text: str) -> list[str]:
    """Plausible secret values in a text: known default credentials, KEY=value / key: value assignments to
    credential-like names with a literal value, and URIs with an embedded password that is not a variable."""
    found = [lit for lit in KNOWN_SECRET_LITERALS if lit in text.lower()]
    for m in SECRET_ASSIGNMENT.finditer(text):
        value = m.group("value").strip("'\"")
        if (
            value
            and not REFERENCE.match(value)
            and value.lower() not in {"true", "false", "null", "|", ">", "|-"}
        ):
            found.append(m.group(0).strip())
    for m in URI_WITH_CREDENTIALS.finditer(text):
        if not REFERENCE.match(m.group("password")):
            found.append(m.group(0))
    return found


def test_secret_detector_flags_plausible_secrets():
    assert _secret_literals("MINIO_ROOT_PASSWORD=minio123")
    assert _secret_literals("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG")
    assert _secret_literals("  password: s3cr3t-value\n")
    assert _secret_literals("--backend-store-uri postgresql://mlflow:hunter22@postgres:5432/mlflow")
    assert not _secret_literals("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/mlflow")
    assert not _secret_literals(
        "MINIO_ROOT_PASSWORD=\n- name: POSTGRES_PASSWORD\n  key: AWS_SECRET_ACCESS_KEY\n"
    )


def test_no_secret_values_in_committed_infra_files():
    files = _committable_files(INFRA) + [ROOT / ".dockerignore"]
    assert any(f.name == "kustomization.yaml" for f in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert not _secret_literals(text), f"{path.relative_to(ROOT)}: {_secret_literals(text)}"
        if path.suffix in {".yaml", ".yml"}:
            for doc in yaml.safe_load_all(text):
                if not isinstance(doc, dict):
                    continue
                assert doc.get("kind") != "Secret", f"{path.relative_to(ROOT)} commits a Secret object"
                for generator in doc.get("secretGenerator", []):
                    assert not generator.get("literals"), (
                        f"{path.relative_to(ROOT)}: secretGenerator literals"
                    )
                    for source in generator.get("envs", []) + generator.get("files", []):
                        source_path = (path.parent / source.split("=")[-1]).resolve()
                        assert _git_ignored(source_path), (
                            f"{source_path} feeds a secret but is not git-ignored"
                        )


def _git_ignored(path: Path) -> bool:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True, check=False
    )
    return proc.returncode == 0


def test_secret_env_files_are_git_ignored_and_templates_are_not():
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the tracked-files check needs it")
    for template in SECRETS_DIR.glob("*.env.example"):
        assert not _git_ignored(template), template
        assert _git_ignored(template.with_suffix("")), f"{template.with_suffix('')} would be committed"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and ARG defaults substituted."""
    joined, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        joined.append(buffer + line)
        buffer = ""
    args: dict[str, str] = {}
    out = []
    for line in joined:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG":
            name, _, default = rest.strip().partition("=")
            args.setdefault(name, default)
        elif op == "FROM":
            rest = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest
            )
        out.append((op, rest.strip()))
    return out


def _check_common(path: Path) -> list[tuple[str, str]]:
    instr = _instructions(path)
    froms = [rest.split()[0] for op, rest in instr if op == "FROM"]
    assert froms, f"{path.name}: no FROM"
    for image in froms:
        if "@sha256:" in image:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{path.name}: base image {image} is not pinned"
    users = [rest for op, rest in instr if op == "USER"]
    assert users, f"{path.name}: no USER, the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{path.name}: final USER is root"
    assert instr.index(("USER", users[-1])) > max(i for i, (op, _) in enumerate(instr) if op == "RUN")
    assert any(op == "WORKDIR" for op, _ in instr)
    env_text = " ".join(rest for op, rest in instr if op in {"ENV", "ARG"})
    for forbidden in "MLFLOW_TRACKING_URI AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY PASSWORD TOKEN".split():
        assert forbidden not in env_text, f"{path.name} bakes {forbidden} into the image"
    assert not _secret_literals(path.read_text())
    return instr


def test_project_dockerfile():
    instr = _check_common(DOCKERFILE)
    env_text = " ".join(rest for op, rest in instr if op == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "HF_HUB_OFFLINE=1"):
        assert setting in env_text
    copies = [rest.split() for op, rest in instr if op == "COPY"]
    destinations = {c[-1] for c in copies if c[0] == "."}
    assert destinations, "the project source is never copied into the image"
    installs = [rest for op, rest in instr if op == "RUN" and "pip install" in rest]
    assert any(
        re.search(rf"pip install [^&;]*(\s|^)({'|'.join(map(re.escape, destinations | {'.'}))})(\s|$)", rest)
        for rest in installs
    ), "the project is never pip-installed"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    image_deps = project["dependencies"] + project["optional-dependencies"]["workflow"]  # what the image installs
    pins = {re.split(r"[=<>~!\[ ]", d, maxsplit=1)[0]: d for d in image_deps}
    assert "kfp" in pins, "kfp must be in the image for install_kfp_package=False"
    assert "optional-dependencies']['workflow']" in DOCKERFILE.read_text(), "the image lacks the workflow extra"
    args = dict(rest.partition("=")[::2] for op, rest in instr if op == "ARG")
    assert f"torch=={args['TORCH_VERSION']}" == pins["torch"].replace(" ", "")
    assert f"torchvision=={args['TORCHVISION_VERSION']}" == pins["torchvision"].replace(" ", "")
    assert "python:3.11" in " ".join(rest for op, rest in instr if op in {"ARG", "FROM"})


def test_image_does_not_expose_every_gpu():
    """NVIDIA_VISIBLE_DEVICES=all in the image makes the NVIDIA runtime give every GPU of the node to any pod
    of this image, even one that asked for none; the device plugin sets it per pod instead."""
    env_text = " ".join(rest for op, rest in _instructions(DOCKERFILE) if op in {"ENV", "ARG"})
    assert "NVIDIA_VISIBLE_DEVICES" not in env_text


CONSTRAINTS = ROOT / "constraints.txt"


def test_python_dependencies_are_locked_by_a_constraints_file():
    """Every package the image installs has an exact version (constraints.txt, pip freeze of the tested
    environment), the project's own requirements among them, and the image installs with it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.url and not req.extras, f"constraints.txt: {line} is not a pin"
        pins[canonicalize_name(req.name)] = spec.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert canonicalize_name(project["name"]) not in pins, "the project itself is pinned"
    for dependency in project["dependencies"] + project["optional-dependencies"]["workflow"]:  # the image's
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {req}"
    instr = _instructions(DOCKERFILE)
    assert any(op == "COPY" and "constraints.txt" in rest.split() for op, rest in instr)
    installs = [rest for op, rest in instr if op == "RUN" and "pip install" in rest and "-r " in rest]
    assert installs and all("-c constraints.txt" in rest for rest in installs)
    args = dict(rest.partition("=")[::2] for op, rest in instr if op == "ARG")
    assert pins["torch"] == args["TORCH_VERSION"] and pins["torchvision"] == args["TORCHVISION_VERSION"]
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "constraints.txt" not in ignored


def test_mlflow_dockerfile_matches_manifests():
    instr = _check_common(MLFLOW_DOCKERFILE)
    args = dict(rest.partition("=")[::2] for op, rest in instr if op == "ARG")
    version = args["MLFLOW_VERSION"]
    installs = " ".join(rest for op, rest in instr if op == "RUN" and "pip install" in rest)
    for package in ("mlflow[auth]==${MLFLOW_VERSION}", "psycopg2", "boto3"):  # [auth]: the basic-auth app
        assert package in installs, f"mlflow image lacks {package}"
    for target in KUSTOMIZATIONS:
        images = {c["image"].split("@")[0] for c in _containers(_one(_render(target), "Deployment", "mlflow"))}
        assert images and all(image.endswith(f"blip-mlflow:{version}") for image in images), images


def test_dockerignore_keeps_the_context_small_and_secret_free():
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    assert {".git", ".venv", "**/*.env"} <= patterns
    assert not {"blip_core", "components", "pipelines", "pyproject.toml", "README.md"} & patterns


def test_deploy_doc_matches_the_tree():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for path in set(re.findall(r"\binfra/[\w./*-]+", doc)):
        path = path.rstrip(".").split("*")[0]
        assert (ROOT / path).exists() or list(ROOT.glob(path + "*")), f"docs/deploy.md names missing {path}"
    for secret, keys in _secret_examples().items():
        assert secret in doc and all(key in doc for key in keys), f"docs/deploy.md does not document {secret}"
    for target in KUSTOMIZATIONS:
        if target.startswith("overlays/"):
            assert f"infra/k8s/{target}" in doc, f"docs/deploy.md does not mention {target}"


# ---------------------------------------------------------------------------------------------------------------
# MLflow authentication, for real: the server configuration and the mlflow-setup script of the manifests


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_call(url: str, method: str, path: str, body=None, user: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_server_refuses_anonymous_writes_and_setup_creates_the_pipeline_user(tmp_path):
    """Runs `mlflow server` with the manifest's arguments and auth config (SQLite standing in for PostgreSQL),
    then the mlflow-setup Job's script: anonymous requests are refused, the pipeline's user can track and
    register, another signed-in user can only read, and re-running the setup is harmless."""
    import os
    import sys
    import time
    import urllib.request

    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF), as the image has")
    docs = _render("base")
    (server,) = [c for c in _containers(_one(docs, "Deployment", "mlflow"), init=False) if c["name"] == "mlflow"]
    flags = _args(server)
    ini = configparser.ConfigParser()
    ini.read_string(_one(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ini["mlflow"]["database_uri"] = db
    with open(tmp_path / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", secrets.token_hex(12))
    pipeline = ("blip-pipeline", secrets.token_hex(12))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
                "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    assert {k for k, e in _env(server).items() if "secretKeyRef" in e.get("valueFrom", {})} <= set(env) | {
        "PGUSER", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # the server's own settings
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "server", "--app-name", flags["--app-name"], "--backend-store-uri", db,
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        # the setup Job's script, with the Job's environment
        setup = _containers(_one(docs, "Job", "mlflow-setup"))[0]
        setup_env = {**env, "MLFLOW_URL": url, "MLFLOW_TRACKING_USERNAME": pipeline[0],
                     "MLFLOW_TRACKING_PASSWORD": pipeline[1]}
        assert set(_env(setup)) <= set(setup_env) | {"HOME"}
        for _ in range(2):  # idempotent
            run = subprocess.run([sys.executable, "-c", setup["args"][0]], env=setup_env, capture_output=True,
                                 text=True, timeout=120, check=False)
            assert run.returncode == 0, run.stderr

        create = ("POST", "/api/2.0/mlflow/experiments/create", {"name": "blip-capfilt"})
        assert _mlflow_call(url, *create) == 401  # anonymous
        assert _mlflow_call(url, *create, user=(pipeline[0], "wrong")) == 401
        assert _mlflow_call(url, *create, user=pipeline) == 200
        assert _mlflow_call(url, "POST", "/api/2.0/mlflow/registered-models/create", {"name": "blip-capfilt"},
                            user=pipeline) == 200
        # another signed-in user (created by the administrator) may read, not write the pipeline's objects
        reader = ("reader", secrets.token_hex(12))
        assert _mlflow_call(url, "POST", "/api/2.0/mlflow/users/create",
                            {"username": reader[0], "password": reader[1]}, user=admin) == 200
        assert _mlflow_call(url, "GET", "/api/2.0/mlflow/registered-models/get?name=blip-capfilt", user=reader) == 200
        alias = {"name": "blip-capfilt", "alias": "champion", "version": "1"}
        assert _mlflow_call(url, "POST", "/api/2.0/mlflow/registered-models/alias", alias, user=reader) == 403
        assert _mlflow_call(url, "POST", "/api/2.0/mlflow/registered-models/alias", alias) == 401
        assert _mlflow_call(url, "GET", "/health") == 200  # probes need no user
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
