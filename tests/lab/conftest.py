"""Fixtures for the lab hypervisor tests (real unix sockets, real ptys)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A short socket directory: unix socket paths must stay under 108 bytes, which pytest's
    own tmp_path (plus a 36-character uuid) can exceed."""
    path = Path(tempfile.mkdtemp(prefix="gblab-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
