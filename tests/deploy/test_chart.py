"""The Helm chart, linted and rendered by Helm's own code (helm-python-sdk: libhelm_c).

No cluster exists here: the rendered manifests are checked statically — images, probes,
hostPath only on the bridge, secrets only in Secrets, the NATS users and JetStream replicas
end to end — for the default values and for a non-default set (an existing NATS with
credentials files, monitors, rules, dashboards, a persistent ISO volume). The NATS subchart
is a declared dependency fetched by `helm dependency build`; what the chart passes it (its
values: the 3-node cluster, JetStream, the users) is checked here, and its authorization
block is parsed by a real nats-server.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from guestbus import permissions

from ._files import (
    CHART,
    SERVICES,
    containers,
    dockerfile_stages,
    docs,
    env_of,
    load_yaml,
    nats_check,
    pod_specs,
)

RELEASE = "gb"
NAMESPACE = "guestbus"
MISSING_DEP = "chart directory is missing these dependencies: nats"

NON_DEFAULT: dict[str, Any] = {
    "nats": {"enabled": False},
    "externalNats": {
        "url": "nats://nats-a.example:4222,nats://nats-b.example:4222",
        "auth": {"type": "creds", "secretName": "guestbus-creds"},
        "tlsCaSecret": "nats-ca",
    },
    "jetstream": {"replicas": 1},
    "image": {"registry": "registry.example:5000/", "tag": "1.2.3", "pullPolicy": "Always"},
    "rpcRouter": {"replicas": 3, "service": {"type": "NodePort", "nodePort": 32074}},
    "isoBuilder": {"output": {"persistence": {"enabled": True, "size": "50Gi"}}},
    "certAuthority": {"passphrase": {"existingSecret": "my-ca-passphrase"}},
    "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}},
    "prometheusRule": {
        "enabled": True,
        "alerts": {
            "GuestbusVmLinkDown": {"for": "30m", "severity": "critical"},
            "GuestbusDrRunFailed": {"disabled": True},
        },
    },
    "dashboards": {"enabled": True},
    # null drops the chart's default label (Helm merges maps)
    "serialBridge": {
        "nodeSelector": {"guestbus.io/hypervisor": None, "node-role.example/kvm": "yes"}
    },
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return docs(manifests)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def custom() -> list[dict[str, Any]]:
    return render(NON_DEFAULT)


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_helm_lint_finds_nothing_but_the_unfetched_nats_dependency(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [MISSING_DEP], report
    serious = [m for m in report["messages"] if m["severity"] >= 2 and m["error"] != MISSING_DEP]
    assert serious == []


def test_every_workload_of_the_default_install(default: list[dict[str, Any]]) -> None:
    deployments = {component(o): o for o in by_kind(default, "Deployment").values()}
    assert set(deployments) == {"rpc-router", "cert-authority", "iso-builder", "dr-orchestrator"}
    # several replicas where their state allows it (queue groups, a KV lease for DR)
    assert all(d["spec"]["replicas"] >= 2 for d in deployments.values())
    (bridge,) = by_kind(default, "DaemonSet").values()
    assert component(bridge) == "serial-bridge"
    spec = bridge["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"guestbus.io/hypervisor": "true"}
    env = env_of(spec["containers"][0])
    assert env["GUESTBUS_BRIDGE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    (job,) = by_kind(default, "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "provision"
    gateway = by_kind(default, "Service")[f"{RELEASE}-guestbus-gateway"]
    assert gateway["spec"]["type"] == "LoadBalancer"
    assert gateway["spec"]["ports"] == [
        {"name": "gateway", "port": 2074, "targetPort": "gateway", "protocol": "TCP"}
    ]
    assert gateway["spec"]["selector"]["app.kubernetes.io/component"] == "rpc-router"


@pytest.mark.parametrize("which", ["default", "custom"])
def test_images_are_the_dockerfile_targets(which: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(which)
    targets = set(dockerfile_stages())
    prefix, tag = ("guestbus/", "0.1.0") if which == "default" else (
        "registry.example:5000/guestbus/", "1.2.3"
    )  # fmt: skip
    seen = set()
    for _obj, spec in pod_specs(objects):
        for c in containers(spec):
            m = re.fullmatch(re.escape(prefix) + r"([a-z-]+):" + re.escape(tag), c["image"])
            assert m, c["image"]
            assert m.group(1) in targets, f"{c['image']}: no such Dockerfile target"
            seen.add(m.group(1))
    assert seen == {*SERVICES, "cli"}


def test_probes_on_every_service_container(default: list[dict[str, Any]]) -> None:
    checked = 0
    for obj, spec in pod_specs(default):
        if obj["kind"] == "Job":
            continue
        (c,) = spec["containers"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
        # an init container waits until the service's JetStream resources exist
        (wait,) = spec["initContainers"]
        assert wait["command"][:4] == ["guestbus", "provision", "--check", component(obj)]
        checked += 1
    assert checked == len(SERVICES)


@pytest.mark.parametrize("which", ["default", "custom"])
def test_host_paths_only_on_the_bridge_and_read_only(
    which: str, request: pytest.FixtureRequest
) -> None:
    for obj, spec in pod_specs(request.getfixturevalue(which)):
        host = {v["name"]: v["hostPath"] for v in spec.get("volumes", []) if "hostPath" in v}
        if component(obj) != "serial-bridge":
            assert host == {}, obj["metadata"]["name"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for c in containers(spec):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
            continue
        assert {h["path"] for h in host.values()} == {
            "/var/lib/libvirt/qemu",
            "/run/libvirt/qemu",
            "/etc/libvirt/qemu",
            "/run/libvirt",  # libvirt's sockets: the host adapter
        }
        (c,) = spec["containers"]
        assert env_of(c)["GUESTBUS_LIBVIRT_URI"]["value"] == "qemu:///system"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert all(mounts[name].get("readOnly") is True for name in host)
        # root, but with one capability: open QEMU's sockets and libvirt's 0600 XML
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_host_adapter_can_be_turned_off() -> None:
    """No libvirt socket on the node, an empty URI: the bridge links VMs, nothing more."""
    objects = render({"serialBridge": {"hostAdapter": {"enabled": False}}})
    (spec,) = [s for o, s in pod_specs(objects) if component(o) == "serial-bridge"]
    paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert "/run/libvirt" not in paths and "/run/libvirt/qemu" in paths
    (c,) = spec["containers"]
    assert env_of(c)["GUESTBUS_LIBVIRT_URI"]["value"] == ""
    assert "/run/libvirt" not in {m["mountPath"] for m in c["volumeMounts"]}


def test_nats_users_and_jetstream_replicas_of_the_default_install(
    default: list[dict[str, Any]],
) -> None:
    values = load_yaml(CHART / "values.yaml")
    secret_name = values["natsAuth"]["secretName"]
    for obj, spec in pod_specs(default):
        role = "provisioner" if obj["kind"] == "Job" else component(obj)
        for c in containers(spec):
            env = env_of(c)
            assert env["GUESTBUS_NATS_URL"]["value"] == f"nats://{RELEASE}-nats:4222"
            assert env["GUESTBUS_NATS_USER"]["value"] == role
            ref = env["GUESTBUS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": secret_name, "key": role}
            assert env["GUESTBUS_NATS_INBOX_PREFIX"]["value"] == permissions.inbox_prefix(role)
        assert env_of(spec["containers"][0])["GUESTBUS_JS_REPLICAS"]["value"] == "3"
    secrets = by_kind(default, "Secret")
    users = secrets[secret_name]
    assert set(users["data"]) == set(permissions.ROLES)
    for value in users["data"].values():
        assert permissions.check_password(base64.b64decode(value).decode()) is None
    assert users["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ca = secrets[f"{RELEASE}-guestbus-ca-passphrase"]
    assert len(base64.b64decode(ca["data"]["passphrase"])) >= 32
    assert ca["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # the CA passphrase reaches cert-authority and dr-orchestrator as a file from the Secret
    for obj, spec in pod_specs(default):
        if component(obj) in ("cert-authority", "dr-orchestrator"):
            env = env_of(spec["containers"][0])
            assert env["GUESTBUS_CA_PASSPHRASE_FILE"]["value"] == "/etc/guestbus/ca/passphrase"
            (vol,) = [v for v in spec["volumes"] if v["name"] == "ca-passphrase"]
            assert vol["secret"]["secretName"] == ca["metadata"]["name"]


def test_the_nats_subchart_runs_a_three_node_jetstream_cluster_with_the_guestbus_users() -> None:
    nats = load_yaml(CHART / "values.yaml")["nats"]
    assert nats["enabled"] is True
    assert nats["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert nats["config"]["jetstream"]["enabled"] is True
    # the authorization block is guestbus.permissions, rendered (never edited by hand)
    assert nats["config"]["merge"]["authorization"] == permissions.helm_authorization()
    secret = load_yaml(CHART / "values.yaml")["natsAuth"]["secretName"]
    assert nats["container"]["env"] == {
        r.password_env: {"valueFrom": {"secretKeyRef": {"name": secret, "key": r.name}}}
        for r in permissions.ROLES.values()
    }


def test_the_subcharts_authorization_block_is_a_valid_nats_configuration(tmp_path: Path) -> None:
    """The NATS chart writes ``<< $X >>`` unquoted; so does this, then nats-server parses it."""
    block = load_yaml(CHART / "values.yaml")["nats"]["config"]["merge"]["authorization"]
    text = re.sub(r'"<< (\$[A-Z0-9_]+) >>"', r"\1", json.dumps(block, indent=1))
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:-1\nauthorization: {text}\n")
    env = {r.password_env: permissions.generate_password() for r in permissions.ROLES.values()}
    result = nats_check(conf, env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stderr + result.stdout


def test_an_existing_nats_with_credentials_files(custom: list[dict[str, Any]]) -> None:
    assert "guestbus-nats-users" not in by_kind(custom, "Secret")  # no users of ours
    assert f"{RELEASE}-guestbus-ca-passphrase" not in by_kind(custom, "Secret")
    for obj, spec in pod_specs(custom):
        role = "provisioner" if obj["kind"] == "Job" else component(obj)
        (creds,) = [v for v in spec["volumes"] if v["name"] == "nats-creds"]
        # each pod mounts only its own credentials file
        assert creds["secret"] == {
            "secretName": "guestbus-creds",
            "items": [{"key": f"{role}.creds", "path": f"{role}.creds"}],
        }
        for c in containers(spec):
            env = env_of(c)
            assert env["GUESTBUS_NATS_URL"]["value"] == NON_DEFAULT["externalNats"]["url"]
            assert env["GUESTBUS_NATS_CREDS"]["value"] == f"/etc/guestbus/nats/{role}.creds"
            assert env["GUESTBUS_NATS_TLS_CA"]["value"] == "/etc/guestbus/nats-ca/ca.crt"
            assert "GUESTBUS_NATS_PASSWORD" not in env
        assert env_of(spec["containers"][0])["GUESTBUS_JS_REPLICAS"]["value"] == "1"
        if component(obj) == "cert-authority":
            (vol,) = [v for v in spec["volumes"] if v["name"] == "ca-passphrase"]
            assert vol["secret"]["secretName"] == "my-ca-passphrase"
        if component(obj) == "rpc-router":
            assert obj["spec"]["replicas"] == 3
    gateway = by_kind(custom, "Service")[f"{RELEASE}-guestbus-gateway"]
    assert gateway["spec"]["type"] == "NodePort"
    assert gateway["spec"]["ports"][0]["nodePort"] == 32074
    (bridge,) = by_kind(custom, "DaemonSet").values()
    assert bridge["spec"]["template"]["spec"]["nodeSelector"] == {"node-role.example/kvm": "yes"}


def test_iso_output_volume(default: list[dict[str, Any]], custom: list[dict[str, Any]]) -> None:
    def output(objects: list[dict[str, Any]]) -> dict[str, Any]:
        for obj, spec in pod_specs(objects):
            if component(obj) == "iso-builder":
                mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
                assert mounts["iso-output"] == "/var/lib/guestbus/isos"
                env = env_of(spec["containers"][0])
                assert env["GUESTBUS_ISO_OUTPUT_DIR"]["value"] == "/var/lib/guestbus/isos"
                return next(v for v in spec["volumes"] if v["name"] == "iso-output")
        raise AssertionError("no iso-builder")

    assert output(default) == {"name": "iso-output", "emptyDir": {}}
    claim = output(custom)["persistentVolumeClaim"]["claimName"]
    pvc = by_kind(custom, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("which", ["default", "custom"])
def test_no_plaintext_secret_outside_secrets(which: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(which)
    secret_values = {
        base64.b64decode(v).decode()
        for s in by_kind(objects, "Secret").values()
        for v in s.get("data", {}).values()
    }
    for cm in by_kind(objects, "ConfigMap").values():
        for key, value in cm.get("data", {}).items():
            assert not any(s in value for s in secret_values), f"{cm['metadata']['name']}/{key}"
            assert "PRIVATE KEY" not in value
            assert not re.search(r"(?i)\"?(password|passphrase|secret)\"?\s*[:=]\s*\"?\w", value)
    for _obj, spec in pod_specs(objects):
        for c in containers(spec):
            for e in c.get("env", []):
                if (
                    re.search(r"PASSWORD|PASSPHRASE|SECRET|TOKEN", e["name"])
                    and "_FILE" not in e["name"]
                ):
                    assert "value" not in e, f"{c['name']}: {e['name']} given in plain text"


def test_monitors_rules_and_dashboards(custom: list[dict[str, Any]]) -> None:
    (pm,) = by_kind(custom, "PodMonitor").values()
    relabel = pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "guestbus-$1"
    (sm,) = by_kind(custom, "ServiceMonitor").values()
    assert sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == "guestbus-$1"
    metrics_services = [
        s for s in by_kind(custom, "Service").values() if "metrics" in s["metadata"]["name"]
    ]
    assert {component(s) for s in metrics_services} == set(SERVICES)

    # the PrometheusRule is the plain rule file, with the per-alert overrides applied
    (rule,) = by_kind(custom, "PrometheusRule").values()
    plain = load_yaml(CHART / "rules" / "guestbus.rules.yaml")
    expected = copy.deepcopy(plain["groups"])
    for group in expected:
        group["rules"] = [r for r in group["rules"] if r["alert"] != "GuestbusDrRunFailed"]
        for r in group["rules"]:
            if r["alert"] == "GuestbusVmLinkDown":
                r["for"] = "30m"
                r["labels"]["severity"] = "critical"
    assert rule["spec"]["groups"] == expected

    maps = [
        c for c in by_kind(custom, "ConfigMap").values() if "dashboard" in c["metadata"]["name"]
    ]
    files = {p.name: p.read_text() for p in (CHART / "dashboards").glob("*.json")}
    assert len(maps) == len(files) == 4
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, body),) = cm["data"].items()
        assert json.loads(body) == json.loads(files[name])


def test_the_default_rule_set_matches_the_plain_rule_file() -> None:
    objects = render({"prometheusRule": {"enabled": True}})
    (rule,) = by_kind(objects, "PrometheusRule").values()
    assert rule["spec"]["groups"] == load_yaml(CHART / "rules" / "guestbus.rules.yaml")["groups"]


@pytest.mark.parametrize(
    "values",
    [
        {"rpcRouter": {"service": {"type": "Internet"}}},
        {"jetstream": {"replicas": 0}},
        {"logLevel": "verbose"},
        {"externalNats": {"auth": {"type": "kerberos"}}},
        {"serialBridge": {"socketPattern": "/var/lib/libvirt/qemu/vm.serial.1"}},
        {"unknownKey": True},
    ],
    ids=["service-type", "replicas", "log-level", "auth-type", "socket-pattern", "unknown-key"],
)
def test_values_schema_refuses_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        render(values)


def test_an_existing_nats_needs_its_url() -> None:
    with pytest.raises(helm.HelmError, match=r"externalNats\.url is required"):
        render({"nats": {"enabled": False}})


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (dep,) = chart["dependencies"]
    assert dep["name"] == "nats" and dep["condition"] == "nats.enabled"
    assert chart["appVersion"] == "0.1.0"
