"""Infra checks: every kustomize tree under infra/k8s renders with `kubectl kustomize`, and the rendered objects
carry the essentials (pinned images, ports, probes, resources, non-root security contexts, services that reach
their pods, secrets referenced by name only, the Volcano queue, RBAC for the TorchX launcher, the MLflow server
wiring). The Dockerfiles are checked structurally, since no image can be built here."""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shutil
import subprocess
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
NAMESPACE = "blip"

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
    """Every kustomization under infra/k8s that renders on its own (Components only render inside one)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization")
        if kind == "Kustomization":
            found.append(path.parent.relative_to(K8S).as_posix())
    return found


KUSTOMIZATIONS = _kustomizations()


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize trees cannot be rendered")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60, check=False
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
def test_objects_live_in_the_blip_namespace(target):
    docs = _render(target)
    _one(docs, "Namespace", NAMESPACE)
    for d in docs:
        namespace = d["metadata"].get("namespace")
        if d["kind"] in CLUSTER_SCOPED_KINDS:
            assert namespace is None, f"cluster-scoped {d['kind']}/{d['metadata']['name']} has a namespace"
        else:
            assert namespace == NAMESPACE, f"{_where(d)} is in namespace {namespace!r}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_images_are_pinned(target):
    docs = _render(target)
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert workloads
    for obj in workloads:
        for c in _containers(obj):
            image = c["image"]
            if "@sha256:" in image:
                continue
            last = image.rsplit("/", 1)[-1]
            assert ":" in last, f"{_where(obj, c)}: image {image} has no tag"
            tag = last.split(":", 1)[1]
            assert tag and tag.lower() != "latest", f"{_where(obj, c)}: image {image} is not pinned"


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
API_KINDS |= {"Deployment", "StatefulSet", "Job", "PodDisruptionBudget"}


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
    client = pytest.importorskip("kubernetes.client")
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
    assert {"blip-minio-root", "blip-postgres", "blip-s3-credentials"} <= set(examples)
    assert set(examples["blip-s3-credentials"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name, pairs in examples.items():
        assert pairs, f"{name} template declares no keys"
        assert all(v == "" for v in pairs.values()), f"{name} template carries values: {pairs}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_secrets_are_referenced_by_name_and_documented(target):
    docs = _render(target)
    assert not _by_kind(docs, "Secret"), (
        f"{target} renders a Secret: secrets are created by hand, not committed"
    )
    examples = _secret_examples()
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
    assert settings["BLIP_K8S_NAMESPACE"] == NAMESPACE
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
    assert ("ServiceAccount", NAMESPACE, pipeline_sa["metadata"]["name"]) in subjects
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
    for var in re.findall(r"\$\((\w+)\)", backend):  # Kubernetes expands $(VAR) only for defined variables
        assert var in env and "secretKeyRef" in env[var].get("valueFrom", {}), (
            f"{var} is not read from a secret"
        )
    _service_for_url(docs, re.sub(r"//[^@]*@", "//", backend))

    destination = flags["--artifacts-destination"]
    assert destination.startswith("s3://")
    buckets = _env(_one(docs, "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0])["BUCKETS"]
    assert urlsplit(destination).netloc in buckets["value"].split(), "the artifact bucket is never created"
    assert flags["--host"] == "0.0.0.0"
    assert int(flags["--port"]) in {p["containerPort"] for p in server["ports"]}

    s3_endpoint = env["MLFLOW_S3_ENDPOINT_URL"]["value"]
    minio, _ = _service_for_url(docs, s3_endpoint)
    assert minio["metadata"]["name"] == "minio"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "blip-s3-credentials"

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
    _service_for_url(docs, minio_setup["S3_ENDPOINT"]["value"])
    buckets = minio_setup["BUCKETS"]["value"].split()
    for key in ("BLIP_DATA_ROOT", "BLIP_DVC_REMOTE"):
        assert urlsplit(settings[key]).netloc in buckets, f"{key} names a bucket the setup job never creates"


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
        pytest.skip("git is not installed")
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
    pins = {re.split(r"[=<>~!\[ ]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    assert "kfp" in pins, "kfp must be in the image for install_kfp_package=False"
    args = dict(rest.partition("=")[::2] for op, rest in instr if op == "ARG")
    assert f"torch=={args['TORCH_VERSION']}" == pins["torch"].replace(" ", "")
    assert f"torchvision=={args['TORCHVISION_VERSION']}" == pins["torchvision"].replace(" ", "")
    assert "python:3.11" in " ".join(rest for op, rest in instr if op in {"ARG", "FROM"})


def test_mlflow_dockerfile_matches_manifests():
    instr = _check_common(MLFLOW_DOCKERFILE)
    args = dict(rest.partition("=")[::2] for op, rest in instr if op == "ARG")
    version = args["MLFLOW_VERSION"]
    installs = " ".join(rest for op, rest in instr if op == "RUN" and "pip install" in rest)
    for package in ("mlflow==${MLFLOW_VERSION}", "psycopg2", "boto3"):
        assert package in installs, f"mlflow image lacks {package}"
    for target in KUSTOMIZATIONS:
        images = {c["image"] for c in _containers(_one(_render(target), "Deployment", "mlflow"))}
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
