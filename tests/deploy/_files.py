"""The deployment files, read the way their tools read them."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from guestbus.broker import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "guestbus"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
NATS_DIR = ROOT / "deploy" / "nats"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

SERVICES = ("rpc-router", "cert-authority", "iso-builder", "dr-orchestrator", "serial-bridge")


def dockerfile_stages() -> dict[str, str]:
    """Build stage name → its text."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    stages = {}
    for part in parts:
        head = part.splitlines()[0]
        m = re.search(r"\bAS\s+([a-z0-9-]+)", head, re.I)
        assert m, f"unnamed stage: FROM {head}"
        stages[m.group(1)] = "FROM " + part
    return stages


def stage_user(stage: str) -> str | None:
    users = re.findall(r"^USER\s+(\S+)", stage, flags=re.M)
    return users[-1] if users else None


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def docs(manifests: Mapping[str, str]) -> list[dict[str, Any]]:
    out = []
    for name, text in manifests.items():
        if name.endswith("NOTES.txt"):
            continue
        out += [d for d in yaml.safe_load_all(text) if d]
    return out


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every Deployment, DaemonSet and Job."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def nats_check(conf: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``nats-server -t``: parse a configuration as the server does, without starting it."""
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(conf)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
