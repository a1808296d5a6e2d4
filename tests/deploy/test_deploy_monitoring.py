"""Prometheus config and rules, the Grafana dashboard: valid, and querying only real metrics.

``promtool`` (Debian's ``prometheus`` package) checks the config and rules and runs the
rule unit tests; without it these tests skip locally and fail in CI (``CI`` set). Every
metric name a rule or a panel queries is checked against a live ``/metrics`` scrape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import live_exposition

yaml = pytest.importorskip("yaml")

from streamlstm.devtools.docgen import metrics_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamlstm.json"
DATASOURCE_UID = "prometheus"

METRIC_RE = re.compile(r"\bstreamlstm_[a-z0-9_]*[a-z0-9]")
# Labels Prometheus adds at scrape time, plus the histogram bucket bound.
TARGET_LABELS = {"job", "instance", "le"}


# -- helpers -------------------------------------------------------------------------------


def promtool() -> str:
    """Path of promtool; skip (locally) or fail (in CI) without it."""
    path = shutil.which("promtool")
    if path:
        return path
    message = (
        "promtool not found: install Debian's `prometheus` package (scripts/ensure-prometheus)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"promtool {args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Series names of a live /metrics scrape -> their label names."""
    body = live_exposition()
    labels = {m.name: set(m.labels) for m in metrics_reference()}
    out: dict[str, set[str]] = {}
    for line in body.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        family = re.sub(r"_(total|info)$", "", name)
        names = [name + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [name]
        for series in names:
            out[series] = labels.get(family, labels.get(name, set()))
    assert len(out) > 20, "the scrape looks empty"
    return out


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target and annotation."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables so promtool can parse the query."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring clauses."""
    names: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names.update(n.strip() for n in clause.split(",") if n.strip())
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names


def check_queries(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> set[str]:
    """Assert every metric and label a query names exists; return the metrics used."""
    used: set[str] = set()
    for where, expr in queries:
        names = set(METRIC_RE.findall(expr))
        unknown = names - set(exported)
        assert not unknown, f"{where}: not exported by the daemon: {sorted(unknown)}"
        allowed = set(TARGET_LABELS).union(*(exported[n] for n in names))
        if not names:
            assert re.search(r"\bup\b", expr), f"{where}: queries no streamlstm metric"
        stray = label_names(expr) - allowed
        assert not stray, f"{where}: labels {sorted(stray)} are on none of {sorted(names)}"
        used |= names
    return used


# -- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    out = run_promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", RULES)


def test_promtool_rule_unit_tests() -> None:
    run_promtool("test", "rules", PROM_DIR / "rules.test.yml")


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((PROM_DIR / "rules.test.yml").read_text())
    tested = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - tested == set(), "alerts that never fire in rules.test.yml"


def test_rules_query_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    used = check_queries([(r.get("alert", r.get("record")), r["expr"]) for r in rules()], exported)
    required = {
        "streamlstm_ready",
        "streamlstm_consumer_lag",
        "streamlstm_dead_letters_total",
        "streamlstm_event_latency_seconds_bucket",
        "streamlstm_finetune_runs_total",
        "streamlstm_drift_total",
        "streamlstm_last_model_update_timestamp_seconds",
    }
    assert required <= used, f"no alert on {sorted(required - used)}"
    assert any(re.search(r"\bup\{", r["expr"]) for r in rules()), "no daemon-down alert"


def test_alerts_carry_severity_summary_and_runbook() -> None:
    for rule in rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"docs/runbook.md#{name.lower()}", name


# -- Grafana -------------------------------------------------------------------------------


def test_dashboard_queries_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    board = dashboard()
    used = check_queries(panel_queries(board), exported)
    variables = [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    check_queries([("templating", v) for v in variables], exported)
    required = {
        "streamlstm_events_total",  # throughput
        "streamlstm_event_latency_seconds_bucket",  # latency percentiles
        "streamlstm_consumer_lag",  # lag per partition
        "streamlstm_keys",
        "streamlstm_state_evictions_total",
        "streamlstm_dead_letters_total",
        "streamlstm_drift_total",
        "streamlstm_finetune_runs_total",
        "streamlstm_finetune_loss",
        "streamlstm_model_version",
    }
    assert required <= used, f"no panel shows {sorted(required - used)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    queries = panel_queries(dashboard())
    groups = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(groups))
    run_promtool("check", "rules", path)


def test_dashboard_layout_and_data_source() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    occupied: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref["uid"] in ("${datasource}", DATASOURCE_UID), panel["title"]


def test_provisioned_data_source_matches_the_dashboard() -> None:
    path = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    sources = yaml.safe_load(path.read_text())["datasources"]
    assert [s["uid"] for s in sources if s["type"] == "prometheus"] == [DATASOURCE_UID]
    assert sources[0]["isDefault"] is True


def test_rule_label_values_are_ones_the_code_uses() -> None:
    from streamlstm import drift
    from streamlstm.events import REASONS
    from streamlstm.learning import gate as trainer

    known = {"result": set(trainer.RESULTS), "detector": set(drift.DETECTORS)}
    known["reason"] = set(REASONS)
    exprs = [r["expr"] for r in rules()] + [e for _, e in panel_queries(dashboard())]
    seen = 0
    for expr in exprs:
        for label, value in re.findall(r'\b(result|detector|reason)="([^"]*)"', expr):
            assert value in known[label], f"{label}={value!r} is never set by the daemon"
            seen += 1
    assert seen >= 2
