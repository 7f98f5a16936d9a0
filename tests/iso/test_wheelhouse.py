"""The agent's offline wheelhouse: a reproducible agent wheel, every pin for every target,
an offline install into an old CPython that runs the agent, the cache, and its verification.

Real pip throughout (no mocks). The first test to use the ``wheelhouse`` fixture may build it
(cold: ~21 MB of downloads); later sessions reuse the cache, hence the longer timeout.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest
from packaging.tags import Tag
from packaging.utils import parse_wheel_filename

import guestbus_agent
from guestbus_agent.layout import AGENT_DIST, WHEELHOUSE_MANIFEST
from guestbus_iso_builder.wheelhouse import (
    PINS_FILE,
    TARGET_ARCHS,
    TARGET_PYTHONS,
    Wheelhouse,
    WheelhouseError,
    build_agent_wheel,
    ensure_wheelhouse,
    load_wheelhouse,
    prune_wheelhouses,
)

pytestmark = pytest.mark.timeout(600)

PINS_PATH = Path(guestbus_agent.__file__).parent / PINS_FILE


def _pins() -> dict[str, str]:
    """name -> version, read plainly (not through the module under test)."""
    pins: dict[str, str] = {}
    for raw in PINS_PATH.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {raw!r}"
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


def _offline_env() -> dict[str, str]:
    """pip with no configuration at all: no index, no find-links but the ones we pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(
    argv: list[str | Path], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- the agent wheel ------------------------------------------------------------------------


def test_agent_wheel_is_reproducible_and_well_formed(tmp_path: Path) -> None:
    first = build_agent_wheel(tmp_path / "a")
    second = build_agent_wheel(tmp_path / "b")
    version = guestbus_agent.__version__
    assert first.name == second.name == f"guestbus_agent-{version}-py3-none-any.whl"
    assert first.read_bytes() == second.read_bytes()

    dist_info = f"guestbus_agent-{version}.dist-info"
    with zipfile.ZipFile(first) as zf:
        infos = zf.infolist()
        names = [info.filename for info in infos]
        assert names[: len(names) - 4] == sorted(names[: len(names) - 4])
        assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {info.external_attr >> 16 for info in infos} == {0o100644}
        for expected in (
            "guestbus/__init__.py",
            "guestbus/wire/__init__.py",
            "guestbus/wire/session.py",
            "guestbus_agent/__init__.py",
            "guestbus_agent/main.py",
            f"guestbus_agent/{PINS_FILE}",
            "guestbus_agent/systemd/guestbus-agent.service",
        ):
            assert expected in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert not [
            n
            for n in names
            if n.startswith("guestbus/")
            and not (n == "guestbus/__init__.py" or n.startswith("guestbus/wire/"))
        ], "only guestbus/__init__.py and guestbus.wire of the host package go to guests"

        metadata = zf.read(f"{dist_info}/METADATA").decode()
        assert f"Name: {AGENT_DIST}\n" in metadata
        assert f"Version: {version}\n" in metadata
        assert "Requires-Python: >=3.9\n" in metadata
        for name in _pins():
            assert f"Requires-Dist: {name}" in metadata
        assert "Tag: py3-none-any" in zf.read(f"{dist_info}/WHEEL").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        assert "guestbus-agent = guestbus_agent.main:main" in entry_points

        # RECORD lists every other member with its urlsafe-b64 sha256 and size.
        record = zf.read(f"{dist_info}/RECORD").decode().splitlines()
        assert f"{dist_info}/RECORD,," in record
        listed = {}
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            listed[path] = (digest, size)
        assert set(listed) == set(names)
        for name in names:
            if name == f"{dist_info}/RECORD":
                continue
            data = zf.read(name)
            b64 = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert listed[name] == (f"sha256={b64}", str(len(data))), name


# --- what the wheelhouse holds --------------------------------------------------------------


def _runs_on(tag: Tag, python: str, arch: str) -> bool:
    """Would CPython ``python`` on glibc 2.17+ ``arch`` install a wheel with this tag?"""
    minor = int(python.split(".")[1])
    cp = f"cp3{minor}"
    legacy = {f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"}
    glibc = re.fullmatch(rf"manylinux_2_(\d+)_{re.escape(arch)}", tag.platform)
    if not (tag.platform == "any" or tag.platform in legacy or (glibc and int(glibc[1]) <= 17)):
        return False
    if tag.abi == cp:
        return tag.interpreter == cp
    if tag.abi == "abi3":
        stable = re.fullmatch(r"cp3(\d+)", tag.interpreter)
        return bool(stable) and int(stable[1]) <= minor  # type: ignore[index]
    if tag.abi == "none":
        return tag.interpreter in ("py3", f"py3{minor}", cp)
    return False


def test_every_pin_has_a_wheel_for_every_target(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    wanted = {**_pins(), AGENT_DIST: wheelhouse.agent_version}
    wheels = [f for f in wheelhouse.files if f.name != WHEELHOUSE_MANIFEST]
    parsed = [parse_wheel_filename(f.name) for f in wheels]
    for name, version, _build, _tags in parsed:
        assert wanted.get(name) == str(version), f"unexpected wheel {name} {version}"

    missing = []
    for python in TARGET_PYTHONS:
        for arch in TARGET_ARCHS:
            for pin, pinned in wanted.items():
                if not any(
                    n == pin and str(v) == pinned and any(_runs_on(t, python, arch) for t in tags)
                    for n, v, _b, tags in parsed
                ):
                    missing.append(f"{pin}=={pinned} for CPython {python} {arch}")
    assert not missing

    # cffi is version-specific (one wheel per python per arch); cryptography is abi3 only.
    cffi = [tags for n, _v, _b, tags in parsed if n == "cffi"]
    assert len(cffi) == len(TARGET_PYTHONS) * len(TARGET_ARCHS)
    cryptography = [tags for n, _v, _b, tags in parsed if n == "cryptography"]
    assert cryptography and all(t.abi == "abi3" for tags in cryptography for t in tags)

    assert wheelhouse.files == tuple(sorted(wheelhouse.files, key=lambda p: p.name))
    assert {f.name for f in wheelhouse.path.iterdir()} == {f.name for f in wheelhouse.files}
    assert wheelhouse.id.startswith(f"{wheelhouse.agent_version}-")
    assert wheelhouse.path.name == wheelhouse.id
    # The agent wheel in the cache is the one this checkout builds, byte for byte.
    agent = next(f for f in wheels if f.name.startswith("guestbus_agent-"))
    assert agent.read_bytes() == build_agent_wheel(tmp_path).read_bytes()


# --- installing it offline into a guest-like Python ----------------------------------------


def _interpreter_candidates(minor: int) -> list[str]:
    found = [f"python3.{minor}"]
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "versions"
    found += sorted(str(p) for p in pyenv.glob(f"3.{minor}*/bin/python3.{minor}"))
    found += [f"/usr/bin/python3.{minor}", f"/usr/local/bin/python3.{minor}"]
    return found


def _guest_python() -> tuple[str, str]:
    """(interpreter, test id): python3.9 if one runs here, else the oldest 3.9+ that does."""
    for minor in range(9, 14):
        for candidate in _interpreter_candidates(minor):
            try:
                proc = subprocess.run(
                    [candidate, "-c", "import sys, ensurepip; print(sys.version_info[:2])"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if proc.returncode == 0 and proc.stdout.strip() == f"(3, {minor})":
                label = f"cp3{minor}" if minor == 9 else f"cp3{minor}-oldest-found-no-python3.9"
                return candidate, label
    return sys.executable, f"cp3{sys.version_info[1]}-host-python-no-python3.9"


GUEST_PYTHON, GUEST_ID = _guest_python()


@pytest.mark.parametrize("guest_python", [GUEST_PYTHON], ids=[GUEST_ID])
def test_agent_installs_offline_and_runs(
    wheelhouse: Wheelhouse, guest_python: str, tmp_path: Path
) -> None:
    if platform.machine() not in TARGET_ARCHS:
        pytest.skip(f"this machine is {platform.machine()}, not a target arch {TARGET_ARCHS}")
    venv = tmp_path / "guest-venv"
    env = _offline_env()
    _run([guest_python, "-m", "venv", venv], env=env)
    python = venv / "bin" / "python"
    _run(
        [python, "-m", "pip", "install", "--no-index", "--find-links", wheelhouse.path, AGENT_DIST],
        env=env,
        cwd=tmp_path,
    )

    out = _run([venv / "bin" / "guestbus-agent", "--version"], env=env, cwd=tmp_path).stdout
    assert out.strip() == f"guestbus-agent {wheelhouse.agent_version}"

    probe = (
        "import guestbus.wire, guestbus_agent, cryptography, serial_asyncio, sys\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "ec.generate_private_key(ec.SECP256R1())\n"  # the native part loads and works
        "print(sys.prefix == sys.base_prefix, guestbus_agent.__file__)\n"
    )
    out = _run([python, "-c", probe], env=env, cwd=tmp_path).stdout
    in_base, agent_file = out.split()
    assert in_base == "False" and Path(agent_file).is_relative_to(venv)


# --- the cache ------------------------------------------------------------------------------


def test_cached_wheelhouse_is_reused_without_pip(wheelhouse: Wheelhouse) -> None:
    before = wheelhouse.path.stat()
    messages: list[str] = []
    started = time.monotonic()
    again = ensure_wheelhouse(wheelhouse.path.parent, progress=messages.append)
    elapsed = time.monotonic() - started
    assert again == wheelhouse
    assert not [m for m in messages if "downloading" in m], messages
    after = wheelhouse.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert elapsed < 5.0


def test_tampered_or_incomplete_copy_does_not_verify(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(wheelhouse.path, copy)
    assert load_wheelhouse(copy).id == wheelhouse.id

    victim = next(copy.glob("cryptography-*.whl"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(WheelhouseError, match=re.escape(victim.name)):
        load_wheelhouse(copy)

    shutil.copy2(wheelhouse.path / victim.name, victim)  # repaired
    load_wheelhouse(copy)
    gone = next(copy.glob("pyserial-*.whl"))
    gone.unlink()
    with pytest.raises(WheelhouseError, match=re.escape(gone.name) + ": missing"):
        load_wheelhouse(copy)

    shutil.copy2(wheelhouse.path / gone.name, gone)
    (copy / "stray-1.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(
        WheelhouseError, match=re.escape("stray-1.0-py3-none-any.whl: not in the manifest")
    ):
        load_wheelhouse(copy)

    with pytest.raises(WheelhouseError, match="not a wheelhouse"):
        load_wheelhouse(tmp_path / "nowhere")


# --- building from a directory of wheels (air-gapped host) ----------------------------------


def test_builds_offline_from_a_wheel_source(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    """A wheelhouse from a connected host is a complete source: same id, same files."""
    cache = tmp_path / "cache"
    built = ensure_wheelhouse(cache, source=str(wheelhouse.path))
    assert built.id == wheelhouse.id
    assert built.path == cache / wheelhouse.id
    assert [f.name for f in built.files] == [f.name for f in wheelhouse.files]
    for ours, theirs in zip(built.files, wheelhouse.files):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    assert [p.name for p in cache.iterdir()] == [wheelhouse.id]


def test_damaged_cache_entry_is_rebuilt(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(wheelhouse.path, cache / wheelhouse.id)
    victim = next((cache / wheelhouse.id).glob("cffi-*.whl"))
    victim.write_bytes(victim.read_bytes()[:-1])  # truncated, as after a crash
    messages: list[str] = []
    rebuilt = ensure_wheelhouse(cache, source=str(wheelhouse.path), progress=messages.append)
    assert any("does not verify" in m and victim.name in m for m in messages), messages
    assert rebuilt.id == wheelhouse.id
    assert (rebuilt.path / victim.name).read_bytes() == (wheelhouse.path / victim.name).read_bytes()
    assert [p.name for p in cache.iterdir()] == [wheelhouse.id]


def test_empty_source_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(WheelhouseError) as caught:
        ensure_wheelhouse(cache, source=str(empty))
    message = str(caught.value)
    assert str(empty) in message and "holds no wheels" in message
    assert "GUESTBUS_ISO_WHEEL_SOURCE" in message and "cryptography==" in message
    assert not cache.exists() or not list(cache.iterdir())

    with pytest.raises(WheelhouseError, match="is not a directory"):
        ensure_wheelhouse(cache, source=str(tmp_path / "missing"))


def test_incomplete_source_reports_pip_and_leaves_nothing(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for wheel in wheelhouse.path.glob("py*.whl"):  # pyserial, pycparser: not cffi/cryptography
        shutil.copy2(wheel, partial)
    cache = tmp_path / "cache"
    with pytest.raises(WheelhouseError) as caught:
        ensure_wheelhouse(cache, source=str(partial))
    message = str(caught.value)
    assert "pip could not download" in message and str(partial) in message
    assert "cffi==" in message  # pip's own last lines name what it could not find
    assert "GUESTBUS_ISO_WHEEL_SOURCE" in message
    assert list(cache.iterdir()) == []


def test_pruning_drops_only_other_idle_wheelhouses(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    current = cache / wheelhouse.path.name
    shutil.copytree(wheelhouse.path, current)
    kept = load_wheelhouse(current)
    old, fresh, other = cache / "0.0.1-aaaaaaaaaaaa", cache / "0.0.2-bbbbbbbbbbbb", cache / "notes"
    for d in (old, fresh, other):
        d.mkdir()
    (old / "wheelhouse.json").write_text("{}")
    (fresh / "wheelhouse.json").write_text("{}")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(current, (two_days_ago, two_days_ago))
    assert prune_wheelhouses(cache, kept) == [old.name]
    assert sorted(p.name for p in cache.iterdir()) == sorted([current.name, fresh.name, "notes"])
