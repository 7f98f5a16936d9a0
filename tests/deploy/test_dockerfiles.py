"""Every service folder holds the Dockerfile that builds it, cut from the shared one."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "README.md").exists())


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_its_own_dockerfile(service: str) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["build", "runtime", service]  # its stage last: the default target
    assert f'ENTRYPOINT ["guestbus-{service}"]' in text
    root = (ROOT / "Dockerfile").read_text()
    shared = root[root.index("ARG PYTHON_VERSION") : root.index("# --- the services")]
    assert shared in text  # the same build and runtime as every other image
