"""compose.yaml, its NATS configuration, .env.example, Prometheus' scrape configuration and
the Dockerfile, checked statically (no Docker engine here): every service, health check,
volume and NATS user is there, and nats-server itself parses the configuration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guestbus import permissions

from ._files import (
    COMPOSE,
    DOCKERFILE,
    ENV_EXAMPLE,
    NATS_DIR,
    PROMETHEUS,
    ROOT,
    SERVICES,
    dockerfile_stages,
    load_yaml,
    nats_check,
    stage_user,
)

REQUIRED_VAR = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_every_service_with_its_health_check_image_and_user(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"nats", "provision", *SERVICES}
    targets = dockerfile_stages()
    for name in SERVICES:
        svc = services[name]
        assert svc["build"] == {"context": ".", "target": name}
        assert name in targets
        assert svc["image"].startswith(f"guestbus/{name}:")
        test = svc["healthcheck"]["test"]
        assert "/readyz" in " ".join(test)
        env = svc["environment"]
        assert env["GUESTBUS_NATS_URL"] == "nats://nats:4222"
        assert env["GUESTBUS_NATS_USER"] == name
        assert REQUIRED_VAR.fullmatch(env["GUESTBUS_NATS_PASSWORD"]).group(1) == (  # type: ignore[union-attr]
            permissions.password_env(name)
        )
        # started once JetStream is provisioned, which waits for a healthy NATS
        assert svc["depends_on"]["provision"]["condition"] == "service_completed_successfully"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert services["provision"]["depends_on"]["nats"]["condition"] == "service_healthy"
    assert services["provision"]["environment"]["GUESTBUS_NATS_USER"] == "provisioner"
    assert services["provision"]["command"][0] == "provision"
    nats = services["nats"]
    assert nats["image"].startswith("nats:")  # the official image
    assert "healthz?js-enabled-only=true" in " ".join(nats["healthcheck"]["test"])
    assert set(nats["environment"]) == {r.password_env for r in permissions.ROLES.values()}
    assert any(p.endswith(":8222:8222") for p in nats["ports"])  # monitoring
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        assert services[name]["healthcheck"]["test"]


def test_volumes_for_ca_and_iso_state_and_the_read_only_hypervisor_mounts(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(compose["volumes"]) >= {"nats-data", "ca-state", "iso-state", "iso-output"}
    assert "ca-state:/var/lib/guestbus" in services["cert-authority"]["volumes"]
    iso = services["iso-builder"]["volumes"]
    assert "iso-state:/var/lib/guestbus" in iso
    assert "${ISO_OUTPUT_DIR:-iso-output}:/var/lib/guestbus/isos" in iso
    assert "nats-data:/data" in services["nats"]["volumes"]
    bridge = services["serial-bridge"]
    host_mounts = [v for v in bridge["volumes"] if v.split(":")[0].startswith("${LIBVIRT")]
    assert len(host_mounts) == 4 and all(v.endswith(":ro") for v in host_mounts)
    # the host adapter: libvirt's sockets, and a URI that .env may set to "" (adapter off)
    assert "${LIBVIRT_SOCKET_DIR:-/run/libvirt}:/run/libvirt:ro" in host_mounts
    assert bridge["environment"]["GUESTBUS_LIBVIRT_URI"] == "${GUESTBUS_LIBVIRT_URI-qemu:///system}"
    assert bridge["user"] == "0:0" and bridge["cap_add"] == ["DAC_OVERRIDE"]
    # no other service touches the host
    for name, svc in services.items():
        if name != "serial-bridge":
            assert not any(str(v).startswith(("/", "${LIBVIRT")) for v in svc.get("volumes", []))


def test_the_ca_passphrase_is_a_secret_file(compose: dict[str, Any]) -> None:
    ca = compose["services"]["cert-authority"]
    assert ca["secrets"] == ["ca_passphrase"]
    assert ca["environment"]["GUESTBUS_CA_PASSPHRASE_FILE"] == "/run/secrets/ca_passphrase"
    assert compose["secrets"]["ca_passphrase"] == {"environment": "GUESTBUS_CA_PASSPHRASE"}
    for svc in compose["services"].values():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|PASSPHRASE", key) and not key.endswith("_FILE"):
                assert str(value).startswith("${"), f"{key} written into compose.yaml"


def test_env_example_sets_every_required_variable() -> None:
    required = set(REQUIRED_VAR.findall(COMPOSE.read_text()))
    example = env_example()
    assert required <= set(example), sorted(required - set(example))
    assert {r.password_env for r in permissions.ROLES.values()} <= required
    # placeholders that NATS would refuse to take as passwords: they must be set
    for role in permissions.ROLES.values():
        assert permissions.check_password(example[role.password_env]) is not None


def test_the_nats_configuration_is_the_permission_set_and_nats_server_accepts_it(
    tmp_path: Path,
) -> None:
    assert (NATS_DIR / "auth.conf").read_text() == permissions.nats_conf()
    main = (NATS_DIR / "nats.conf").read_text()
    assert "include ./auth.conf" in main and "jetstream" in main and "http: 0.0.0.0:8222" in main
    conf = tmp_path / "nats.conf"
    conf.write_text(main.replace("/data", str(tmp_path / "data")))
    (tmp_path / "auth.conf").write_text((NATS_DIR / "auth.conf").read_text())
    env = {r.password_env: permissions.generate_password() for r in permissions.ROLES.values()}
    result = nats_check(conf, env)
    assert result.returncode == 0, result.stderr + result.stdout
    # without the passwords in its environment the server refuses to start
    missing = nats_check(conf, {})
    assert missing.returncode != 0 and "GUESTBUS_NATS_PASSWORD_" in missing.stderr + missing.stdout


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_as_guestbus_job() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert jobs == {f"guestbus-{s}": [f"{s}:8080"] for s in SERVICES}
    assert config["rule_files"] == ["/etc/prometheus/rules/guestbus.rules.yaml"]


def test_dockerfile_one_target_per_service_non_root_but_the_bridge() -> None:
    stages = dockerfile_stages()
    assert set(stages) == {"build", "runtime", "cli", *SERVICES}
    assert stages["build"].startswith("FROM python:${PYTHON_VERSION}-slim AS build")
    assert stages["runtime"].startswith("FROM python:${PYTHON_VERSION}-slim AS runtime")
    assert "HEALTHCHECK" in stages["runtime"] and "/readyz" in stages["runtime"]
    for name in (*SERVICES, "cli"):
        assert stages[name].startswith(f"FROM runtime AS {name}")
        user = stage_user(stages[name])
        if name == "serial-bridge":
            assert user == "0:0"
        else:
            assert user == "10001:10001", name
        entry = re.search(r'^ENTRYPOINT \["([a-z-]+)"\]', stages[name], re.M)
        assert entry is not None
        expected = "guestbus" if name == "cli" else f"guestbus-{name}"
        assert entry.group(1) == expected
    # every service's console script exists
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in SERVICES:
        assert f'guestbus-{name} = "' in pyproject
    assert "/wheels" in DOCKERFILE.read_text()
    # the bridge's host adapter: libvirt's client library and the `libvirt` extra, built
    # with a compiler that leaves the image again
    bridge = stages["serial-bridge"]
    assert "apt-get install -y --no-install-recommends libvirt0" in bridge
    assert '"guestbus[libvirt]"' in bridge and 'python -c "import libvirt"' in bridge
    assert "apt-get purge -y --auto-remove gcc libc6-dev pkg-config libvirt-dev" in bridge
    assert 'libvirt = ["libvirt-python' in pyproject
