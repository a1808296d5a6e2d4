"""deploy/k8s: manifests parse, and probes, ports, scrape config and volumes match the settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from streamlstm.config import Settings, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def documents() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/k8s, by file name."""
    out = {}
    for path in sorted(K8S.glob("*.y*ml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def resource(kind: str) -> dict[str, Any]:
    found = [d for docs in documents().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    spec = resource("StatefulSet")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "streamlstm")


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings a replica starts with: the ConfigMap's file plus the container's env."""
    for name in list(os.environ):
        if name.upper().startswith("STREAMLSTM_"):
            monkeypatch.delenv(name)
    config_path = flag_value(container()["args"], "--config")
    assert config_path, "the container should pass --config FILE"
    mount = next(
        m for m in container()["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")
    )
    volume = next(
        v
        for v in resource("StatefulSet")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    )
    configmap = resource("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = config_path[len(mount["mountPath"]) + 1 :]
    local = tmp_path / key
    local.write_text(configmap["data"][key])
    tomllib.loads(local.read_text())
    for env in container().get("env", []):
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    return load_settings(local)


def test_manifests_parse_and_are_listed() -> None:
    docs = documents()
    kustomization = docs.pop("kustomization.yaml")[0]
    for name, items in docs.items():
        for doc in items:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
    listed = set(kustomization["resources"])
    optional = {"podmonitor.yaml"}  # needs the Prometheus Operator's CRDs
    assert listed == set(docs) - optional
    kinds = {d["kind"] for items in docs.values() for d in items}
    assert {"StatefulSet", "ConfigMap", "Service", "PodMonitor"} <= kinds


def test_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert "StatefulSet" in kinds


def test_env_names_are_settings() -> None:
    for env in container()["env"]:
        name = env["name"]
        if not name.startswith("STREAMLSTM_"):
            continue
        section, _, field = name[len("STREAMLSTM_") :].lower().partition("__")
        assert section in Settings.model_fields, name
        assert field in type(getattr(Settings(), section)).model_fields, name


def test_probes_and_ports_match_the_metrics_port(settings: Settings) -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == settings.metrics.port

    def probe(kind: str) -> tuple[str, int]:
        get = c[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", settings.metrics.port)
    assert probe("readinessProbe") == ("/readyz", settings.metrics.port)
    if "startupProbe" in c:
        assert probe("startupProbe") == ("/healthz", settings.metrics.port)


def test_scraping_targets_the_metrics_port(settings: Settings) -> None:
    template = resource("StatefulSet")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics.port
    assert annotations["prometheus.io/path"] == "/metrics"
    pod_labels = template["metadata"]["labels"]
    monitor = resource("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    names = {p["name"] for p in container()["ports"]}
    for endpoint in monitor["podMetricsEndpoints"]:
        assert endpoint["port"] in names and endpoint.get("path", "/metrics") == "/metrics"
    service = resource("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names | {settings.metrics.port}
    assert resource("StatefulSet")["spec"]["serviceName"] == service["metadata"]["name"]


def test_checkpoints_are_a_persistent_volume(settings: Settings) -> None:
    sts = resource("StatefulSet")["spec"]
    claims = {t["metadata"]["name"] for t in sts.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    path = settings.training.checkpoint_dir
    assert path is not None and str(path) in mounts, f"{path} is not mounted"
    assert mounts[str(path)] in claims, f"{path} is not on a persistent volume claim"
    unused = claims - set(mounts.values())
    assert not unused, f"volume claims no container mounts: {sorted(unused)}"


def test_replicas_share_one_group_and_fit_the_partitions(settings: Settings) -> None:
    sts = resource("StatefulSet")["spec"]
    assert 1 < sts["replicas"] <= settings.kafka.partitions
    assert sts["selector"]["matchLabels"].items() <= sts["template"]["metadata"]["labels"].items()


def test_pod_runs_as_the_image_user() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile, re.M)[-1])
    security = resource("StatefulSet")["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
