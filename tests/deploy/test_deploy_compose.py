"""docker-compose.yml and deploy/Dockerfile agree with each other and with the settings model.

No Docker engine needed: the files are parsed, the ``STREAMLSTM_...`` variables are loaded
through :func:`streamlstm.config.load_settings` (with the TOML file the container mounts),
and the container health check script is run against a live metrics endpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from streamlstm.config import Settings, load_settings  # noqa: E402
from streamlstm.metrics import Metrics, MetricsServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DAEMON = "streamlstm"
PRODUCER = "producer"
KAFKA = "kafka"
KAFKA_INIT = "kafka-init"


# -- helpers -------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings (mapping or list form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): _env_str(v) for k, v in env.items()}


def _env_str(value: Any) -> str:
    """How Compose passes a YAML value: null as empty, booleans in lower case."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def volumes_of(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(source, target)`` of every volume of a service (short or long syntax)."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((str(vol.get("source", "")), str(vol["target"])))
        else:
            parts = str(vol).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instr = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instr) if word == "FROM")
    return instr[last_from:]


def exec_form(args: str) -> list[str]:
    """Arguments of an exec-form instruction (``["a", "b"]``)."""
    assert args.startswith("["), f"expected exec form (JSON array), got {args!r}"
    return json.loads(args)


def image_copies() -> dict[str, str]:
    """Final-stage ``COPY`` from the build context: target path -> repository path."""
    out = {}
    for word, args in final_stage():
        if word == "COPY" and "--from" not in args:
            src, dst = args.split()[-2:]
            out[dst] = src
    return out


def image_config_arg() -> str:
    cmd = next(exec_form(a) for w, a in final_stage() if w == "CMD")
    path = flag_value(cmd, "--config")
    assert path, f"Dockerfile CMD should pass --config FILE, got {cmd}"
    return path


def local_file_for(container_path: str, service: dict[str, Any] | None) -> Path:
    """The repository file a container sees at ``container_path`` (bind mount, else COPY)."""
    for source, target in volumes_of(service or {}):
        if not source.startswith((".", "/")):
            continue
        if target == container_path:
            return (ROOT / source).resolve()
        if container_path.startswith(target.rstrip("/") + "/"):  # a mounted directory
            return (ROOT / source / container_path[len(target.rstrip("/")) + 1 :]).resolve()
    copies = image_copies()
    assert container_path in copies, f"{container_path} is neither mounted nor in the image"
    return ROOT / copies[container_path]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No STREAMLSTM_ variables from the developer's shell leak into the checks."""
    for name in list(os.environ):
        if name.upper().startswith("STREAMLSTM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def effective_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings the container of service ``name`` starts with: its env + its config file."""
    service = services()[name]
    for key, value in env_of(service).items():
        if key.upper().startswith("STREAMLSTM_"):
            monkeypatch.setenv(key, value)
    argv = as_argv(service.get("command"))
    config = flag_value(argv, "--config")
    entrypoint = as_argv(service.get("entrypoint"))
    if config is None and not entrypoint:  # the image's CMD applies
        config = image_config_arg()
    path = local_file_for(config, service) if config else None
    try:
        return load_settings(path)
    finally:
        for key in env_of(service):
            if key.upper().startswith("STREAMLSTM_"):
                monkeypatch.delenv(key)


def host_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """``(host, container)`` port pairs."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            out.append((int(parts[-2]), int(parts[-1])))
    return out


# -- compose -------------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    assert set(services()) >= {KAFKA, KAFKA_INIT, DAEMON, PRODUCER, "prometheus", "grafana"}


def test_every_service_has_a_pinned_image_or_a_build() -> None:
    for name, svc in services().items():
        if "build" in svc:
            build = svc["build"]
            context = ROOT / build.get("context", ".")
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            continue
        image = svc.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: pin the image tag, got {image!r}"
    assert services()[KAFKA]["image"].startswith("apache/kafka:")


def test_streamlstm_variables_name_real_settings(clean_env: pytest.MonkeyPatch) -> None:
    seen = 0
    for name, svc in services().items():
        for key, value in env_of(svc).items():
            if not key.upper().startswith("STREAMLSTM_"):
                continue
            seen += 1
            section, sep, field = key[len("STREAMLSTM_") :].lower().partition("__")
            assert sep, f"{name}: {key} lacks the __ between section and field"
            assert section in Settings.model_fields, f"{name}: {key}: no section {section!r}"
            model = type(getattr(Settings(), section))
            assert field in model.model_fields, f"{name}: {key}: no setting {section}.{field}"
            # The value is valid and takes effect through the environment.
            expected = getattr(load_settings(overrides={f"{section}.{field}": value}), section)
            clean_env.setenv(key, value)
            loaded = getattr(load_settings(), section)
            clean_env.delenv(key)
            assert getattr(loaded, field) == getattr(expected, field), f"{name}: {key}"
    assert seen >= 4


def test_services_start_with_valid_settings(clean_env: pytest.MonkeyPatch) -> None:
    for name in (DAEMON, PRODUCER):
        effective_settings(name, clean_env)  # raises ConfigError on any bad value


def test_daemon_publishes_its_metrics_port(clean_env: pytest.MonkeyPatch) -> None:
    settings = effective_settings(DAEMON, clean_env)
    assert settings.metrics.enabled
    containers = [c for _, c in host_ports(services()[DAEMON])]
    assert settings.metrics.port in containers
    exposed = [a for w, a in final_stage() if w == "EXPOSE"]
    assert str(settings.metrics.port) in " ".join(exposed).split()


def test_daemon_healthcheck_probes_healthz_with_the_daemon_config(
    clean_env: pytest.MonkeyPatch,
) -> None:
    svc = services()[DAEMON]
    test = as_argv(svc["healthcheck"]["test"])
    assert test[0] == "CMD"
    assert flag_value(test, "--path") == "/healthz"
    assert flag_value(test, "--config") == flag_value(as_argv(svc["command"]), "--config")
    script = next(arg for arg in test if arg.endswith("healthcheck.py"))
    assert local_file_for(script, svc) == ROOT / "deploy" / "healthcheck.py"


def test_daemon_reaches_the_kafka_service(clean_env: pytest.MonkeyPatch) -> None:
    settings = effective_settings(DAEMON, clean_env)
    kafka_env = env_of(services()[KAFKA])
    advertised = {
        listener.split("://", 1)[1]
        for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    for server in settings.kafka.bootstrap_servers.split(","):
        assert server.strip() in advertised, f"{server} is not an advertised Kafka listener"
        assert server.split(":")[0] in (KAFKA, services()[KAFKA].get("hostname"))
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_topics_are_created_before_the_daemon_starts(clean_env: pytest.MonkeyPatch) -> None:
    settings = effective_settings(DAEMON, clean_env)
    script = "\n".join(as_argv(services()[KAFKA_INIT]["command"]))
    created: dict[str, str] = {}
    for line in script.splitlines():
        match = re.search(r"--topic\s+(\S+)", line)
        if match and "--create" in script:
            created[match.group(1)] = line
    k = settings.kafka
    wanted = {
        k.input_topic,
        k.output_topic,
        k.dead_letter_topic,
        settings.model_topic,
        settings.changelog_topic,
    }
    for topic in wanted:
        assert topic in created, f"kafka-init does not create {topic!r}"
        assert re.search(r"--partitions\s+[1-9]\d*", created[topic]), f"{topic}: no partitions"
    model = created[settings.model_topic]  # newest weights only, one writer, read whole
    assert "--partitions 1 " in model and "cleanup.policy=compact" in model, model
    changelog = created[str(settings.changelog_topic)]  # compacted, one partition per input's
    assert "cleanup.policy=compact" in changelog
    count = re.compile(r"--partitions\s+(\d+)")
    assert count.search(changelog).group(1) == count.search(created[k.input_topic]).group(1)  # type: ignore[union-attr]
    assert set(created) == wanted, f"kafka-init creates topics no setting names: {created}"
    init_deps = services()[KAFKA_INIT]["depends_on"]
    assert init_deps[KAFKA]["condition"] == "service_healthy"
    for name in (DAEMON, PRODUCER):
        deps = services()[name]["depends_on"]
        assert deps[KAFKA_INIT]["condition"] == "service_completed_successfully", name


def test_checkpoints_live_on_a_named_volume(clean_env: pytest.MonkeyPatch) -> None:
    settings = effective_settings(DAEMON, clean_env)
    mounts = dict((target, source) for source, target in volumes_of(services()[DAEMON]))
    declared = set(compose().get("volumes") or {})
    image_volumes = " ".join(a for w, a in final_stage() if w == "VOLUME")
    path = settings.training.checkpoint_dir
    assert path is not None
    assert str(path) in mounts, f"{path} is not a volume of the daemon"
    assert mounts[str(path)] in declared, f"{path}: use a named, declared volume"
    assert str(path) in image_volumes, f"{path} is not a VOLUME of the image"


def test_producer_agrees_with_the_daemon(clean_env: pytest.MonkeyPatch) -> None:
    daemon = effective_settings(DAEMON, clean_env)
    producer = effective_settings(PRODUCER, clean_env)
    assert producer.kafka.bootstrap_servers == daemon.kafka.bootstrap_servers
    assert producer.kafka.input_topic == daemon.kafka.input_topic
    assert producer.model.input_size == daemon.model.input_size is not None
    svc = services()[PRODUCER]
    assert svc["image"] == services()[DAEMON]["image"]
    assert as_argv(svc["entrypoint"])[:2] == ["streamlstm", "produce"]


def test_prometheus_scrapes_the_daemon_with_the_rules(clean_env: pytest.MonkeyPatch) -> None:
    settings = effective_settings(DAEMON, clean_env)
    svc = services()["prometheus"]
    config_path = flag_value(as_argv(svc["command"]), "--config.file")
    assert config_path, "prometheus: pass --config.file"
    local = local_file_for(config_path, svc)
    assert local == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(local.read_text())
    targets = [
        t
        for job in config["scrape_configs"]
        if "streamlstm" in job["job_name"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ]
    assert f"{DAEMON}:{settings.metrics.port}" in targets
    for rule_file in config["rule_files"]:
        assert (local.parent / rule_file).is_file()
    assert (9090, 9090) in host_ports(svc)


def test_grafana_is_provisioned_from_the_repository() -> None:
    svc = services()["grafana"]
    mounts = {target: source for source, target in volumes_of(svc)}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasources["datasources"][0]["url"]
    assert url == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "streamlstm.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert path in mounts, f"dashboard provider reads {path}, which is not mounted"
    dashboards = ROOT / mounts[path]
    assert list(dashboards.glob("*.json")), "no dashboard JSON in the mounted folder"
    home = env_of(svc)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (dashboards / home[len(path) + 1 :]).is_file()


def test_bind_mounts_exist_and_host_ports_are_unique() -> None:
    seen: dict[int, str] = {}
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for source, _ in volumes_of(svc):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            elif source:
                assert source in declared, f"{name}: volume {source} is not declared"
        for host, _ in host_ports(svc):
            assert host not in seen, f"port {host}: {name} and {seen[host]}"
            seen[host] = name
        for dep in svc.get("depends_on") or []:
            assert dep in services(), f"{name} depends on unknown {dep}"
    assert set(seen) >= {3000, 9090, 9400}


def test_compose_documents_its_ports() -> None:
    header = COMPOSE_FILE.read_text().split("services:")[0]
    for name, svc in services().items():
        for host, _ in host_ports(svc):
            assert re.search(rf"^#\s+{host}\s", header, re.M), f"port {host} ({name}) undocumented"


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_cpu_torch() -> None:
    instr = dockerfile_instructions()
    froms = [a for w, a in instr if w == "FROM"]
    assert len(froms) >= 2 and any(" AS " in f.upper() for f in froms)
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else "" for w, a in instr if w == "ARG"
    }
    assert "/whl/cpu" in args["TORCH_INDEX_URL"]
    assert "BASE_IMAGE" in args and froms[-1].split()[0] == "${BASE_IMAGE}"
    users = [a for w, a in final_stage() if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(w == "COPY" and "--from=build" in a for w, a in final_stage())


def test_dockerfile_torch_matches_the_makefile_pin() -> None:
    makefile = ROOT / "Makefile"
    pin = re.search(r"torch==([\w.+]+)", makefile.read_text()) if makefile.exists() else None
    if pin is None:
        pytest.skip("the Makefile pins no torch version")
    args = dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pin.group(1)


def test_dockerfile_runs_the_daemon_with_the_baked_config(clean_env: pytest.MonkeyPatch) -> None:
    stage = final_stage()
    entry = next(exec_form(a) for w, a in stage if w == "ENTRYPOINT")
    assert entry == ["streamlstm", "run"]
    config = image_config_arg()
    copies = image_copies()
    assert copies[config] == "deploy/streamlstm.toml"
    settings = load_settings(ROOT / copies[config])
    exposed = " ".join(a for w, a in stage if w == "EXPOSE").split()
    assert str(settings.metrics.port) in exposed
    volumes = " ".join(a for w, a in stage if w == "VOLUME")
    assert settings.training.checkpoint_dir is not None
    assert str(settings.training.checkpoint_dir) in volumes


def test_dockerfile_healthcheck_probes_healthz() -> None:
    check = next(a for w, a in final_stage() if w == "HEALTHCHECK")
    argv = exec_form(check[check.index("CMD") + 3 :].strip())
    assert flag_value(argv, "--path") == "/healthz"
    assert flag_value(argv, "--config") == image_config_arg()
    script = next(a for a in argv if a.endswith(".py"))
    assert image_copies()[script] == "deploy/healthcheck.py"


def test_build_context_includes_every_copied_file() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the dockerignore should whitelist, not blacklist"
    sources = {
        src
        for word, args in dockerfile_instructions()
        if word == "COPY" and "--from" not in args
        for src in args.split()[:-1]
    }
    assert "streamlstm" in sources and "pyproject.toml" in sources
    for src in sources:
        src = src.rstrip("/")
        assert src in included, f"COPY {src}: excluded from the build context"
        if src != "README.md":  # written by the README issue
            assert (ROOT / src).exists(), src


def test_entrypoint_commands_exist() -> None:
    from streamlstm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "produce"} <= set(sub.choices)


# -- the health check script ---------------------------------------------------------------


def _probe(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMLSTM_")}
    env["STREAMLSTM_METRICS__PORT"] = str(port)
    script = ROOT / "deploy" / "healthcheck.py"
    config = ROOT / "deploy" / "streamlstm.toml"
    return subprocess.run(
        [sys.executable, str(script), "--config", str(config), "--timeout", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_script_follows_the_metrics_port() -> None:
    ready = {"value": False}
    server = MetricsServer(Metrics(), "127.0.0.1", 0, ready=lambda: ready["value"]).start()
    try:
        assert _probe(server.port).returncode == 0
        assert _probe(server.port, "--path", "/readyz").returncode == 1
        ready["value"] = True
        assert _probe(server.port, "--path", "/readyz").returncode == 0
    finally:
        server.stop()
    down = _probe(server.port)
    assert down.returncode == 1 and "unhealthy" in down.stderr
