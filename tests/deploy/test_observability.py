"""Dashboards, alert rules and docs/metrics.md against what the running services export.

The services run (``SecureStack``: every service, each as its own NATS user) and are
scraped over HTTP; every PromQL expression of the Grafana dashboards and the alert rules is
parsed by a PromQL parser, and every metric it names must be in those scrapes (``up`` is
Prometheus' own). docs/metrics.md must list exactly the metrics the services export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from ._stack import SecureStack, exported_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "guestbus"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "rules" / "guestbus.rules.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
PROMETHEUS_OWN = {"up"}
REQUIRED_ALERTS = {
    "GuestbusVmLinkDown",
    "GuestbusCertificatesNotRenewing",
    "GuestbusCAUnavailable",
    "GuestbusDrRunFailed",
    "GuestbusSerialBridgeDown",
}
# Grafana's variables, replaced by values of the right kind before parsing
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$service": ".*",
}


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) for every query."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], grafana_to_promql(target["expr"])))
    return found


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
async def exported(stack: SecureStack) -> set[str]:
    names: set[str] = set()
    for service in stack.hosts:
        names |= exported_names(await stack.scrape(service))
    return names


def test_dashboards_are_provisionable_grafana_json() -> None:
    assert {p.stem for p in DASHBOARDS} == {
        "guestbus-fleet",
        "guestbus-rpc",
        "guestbus-certificates",
        "guestbus-dr",
    }
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["uid"] not in uids
        uids.add(board["uid"])
        assert board["title"].startswith("guestbus / ") and "guestbus" in board["tags"]
        # a data source variable, so the same file works in any Grafana (file provisioning,
        # the sidecar): no instance-specific uid baked in
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, (path.name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"


@pytest.mark.parametrize(("board", "title", "expr"), dashboard_exprs())
def test_every_dashboard_query_parses(board: str, title: str, expr: str) -> None:
    metric_names(expr)  # raises ValueError on a syntax error


async def test_every_dashboard_and_alert_metric_is_exported_by_a_running_service(
    exported: set[str],
) -> None:
    known = exported | PROMETHEUS_OWN
    missing = []
    for board, title, expr in dashboard_exprs():
        missing += [f"{board} / {title}: {n}" for n in sorted(metric_names(expr) - known)]
    for rule in rules():
        missing += [
            f"alert {rule['alert']}: {n}" for n in sorted(metric_names(rule["expr"]) - known)
        ]
    assert missing == []
    # the dashboards cover what the issue asks for
    used = {n for _, _, expr in dashboard_exprs() for n in metric_names(expr)}
    for name in (
        "guestbus_vms",
        "guestbus_guest_rpcs_total",
        "guestbus_bridge_vm_link_up",
        "guestbus_bridge_rpc_seconds_bucket",
        "guestbus_certificates_soonest_expiry_timestamp_seconds",
        "guestbus_certificates_expiring",
        "guestbus_certificates_renewed_total",
        "guestbus_dr_vms_total",
    ):
        assert name in used, name


def test_alert_rules_are_valid_and_complete() -> None:
    found = {rule["alert"]: rule for rule in rules()}
    assert set(found) == REQUIRED_ALERTS
    for name, rule in found.items():
        metric_names(rule["expr"])
        if "for" in rule:
            assert re.fullmatch(r"[0-9]+[smhd]", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert 'within="21d"' in found["GuestbusCertificatesNotRenewing"]["expr"]
    assert 'job="guestbus-serial-bridge"' in found["GuestbusSerialBridgeDown"]["expr"]


def documented() -> set[str]:
    rows = [line for line in METRICS_DOC.read_text().splitlines() if line.startswith("| `")]
    return {n for row in rows for n in re.findall(r"`(guestbus_[a-z0-9_]+)`", row.split("|")[1])}


async def test_docs_metrics_lists_exactly_the_exported_metrics(stack: SecureStack) -> None:
    families: set[str] = set()
    from prometheus_client.parser import text_string_to_metric_families

    for service in stack.hosts:
        for family in text_string_to_metric_families(await stack.scrape(service)):
            name = family.name
            if not name.startswith("guestbus_") or name.endswith("_created"):
                continue
            families.add(name + "_total" if family.type == "counter" else name)
    docs = documented()
    assert sorted(families - docs) == [], "exported but not in docs/metrics.md"
    assert sorted(docs - families) == [], "in docs/metrics.md but exported by no service"
