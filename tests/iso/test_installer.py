"""The ISO's installer, run for real: ``sh install.sh --root <scratch>`` on an ISO-shaped
directory made of the repo's files and the real wheelhouse, under the oldest Python the
guests run (3.9 when this machine has it).

What "offline" means is proven, not assumed: pip runs with a dead index
(``PIP_INDEX_URL=http://127.0.0.1:9/``, ``PIP_NO_INDEX=1``) and, where this machine allows
it, the whole install runs in a network namespace without any network.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

import guestbus_agent
from guestbus.wire import HelloReceived, Session
from guestbus_agent import install, layout
from guestbus_iso_builder.wheelhouse import Wheelhouse

VM = "5b0c1e2a-1111-4222-8333-944455556666"
AGENT_DIR = Path(guestbus_agent.__file__).parent
TLS = ("client.key", "client.crt", "ca.pem")


# --- the guest's Python and the way the installer is run ---------------------------------------


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except OSError:
        return None
    return (int(out[0]), int(out[1])) if len(out) == 2 else None


@cache
def guest_python() -> str:
    """The oldest CPython >= 3.9 here (3.9 itself when found), as the Makefile finds it."""
    candidates = [f"python3.{minor}" for minor in range(9, 14)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3.*[0-9]")))
    found: list[tuple[tuple[int, int], str]] = []
    for name in candidates:
        path = shutil.which(name)
        version = _version(path) if path else None
        if path and version and version >= (3, 9):
            found.append((version, path))
    return min(found)[1] if found else sys.executable


@cache
def no_network_prefix() -> tuple[str, ...]:
    """``unshare --net`` where it works here (root): the install then has no network at all."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0:
        return (unshare, "--net")
    return ()


def run_install(
    source: Path, root: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=guest_python(), PIP_INDEX_URL="http://127.0.0.1:9/", PIP_NO_INDEX="1")
    env.update(env_extra or {})
    argv = [*no_network_prefix(), "sh", str(source / "install.sh"), "--root", str(root), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"install failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def failed(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, f"expected failure:\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr


# --- the ISO ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(vm: str) -> tuple[bytes, bytes, bytes]:
    """(key, certificate, CA) PEMs: a client certificate with CN ``vm`` from a fresh CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name("test CA"))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=7))
        )
        if ca:
            builder = builder.add_extension(x509.BasicConstraints(True, None), critical=True)
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        key_pem,
        cert(vm, key.public_key(), False).public_bytes(pem),
        cert("test CA", ca_key.public_key(), True).public_bytes(pem),
    )


def make_source(
    where: Path, wheelhouse: Wheelhouse | None, serial: int, vm: str = VM
) -> tuple[Path, tuple[bytes, bytes, bytes]]:
    """An ISO-shaped directory: the repo's installer and unit, a config, certificates, the DR
    key, and (``wheelhouse`` given: a full ISO) the wheels. Returns it and its TLS files."""
    where.mkdir(parents=True)
    for name in ("install.py", "install.sh"):
        shutil.copy(AGENT_DIR / name, where / name)
    shutil.copy(AGENT_DIR / "systemd" / layout.UNIT_NAME, where / layout.ISO_UNIT)
    config = {
        "vm_uuid": vm,
        "config_uuid": f"cfg-{serial}",
        "config_serial": serial,
        "gateway_host": "10.0.0.10",
    }
    (where / layout.ISO_CONFIG).write_text(json.dumps(config, indent=2))
    tls = make_tls(vm)
    for name, data in zip(TLS, tls):
        (where / name).write_bytes(data)
    os.chmod(where / layout.ISO_KEY, 0o600)
    dr = ed25519.Ed25519PrivateKey.generate().public_key()
    (where / layout.ISO_DR_KEY).write_bytes(
        dr.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (where / layout.ISO_README).write_text("guestbus test ISO\n")
    if wheelhouse is not None:
        wheels = where / layout.ISO_WHEELS
        wheels.mkdir()
        for path in wheelhouse.files:
            shutil.copy(path, wheels / path.name)
    return where, tls


# --- looking at the installed guest ----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every file and link under ``root`` (mode and contents), to prove nothing changed."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = (0, os.readlink(path))
        elif path.is_file():
            out[str(path.relative_to(root))] = (mode(path), path.read_bytes())
    return out


def installed_config(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "etc/guestbus/config.json").read_text())
    return data


def system_site_packages() -> dict[str, list[str]]:
    """The guest Python's own site-packages directories (and the user's), listed."""
    code = (
        "import json, site, sysconfig; p = sysconfig.get_paths(); "
        "print(json.dumps(sorted({p['purelib'], p['platlib'], site.getusersitepackages()})))"
    )
    proc = subprocess.run([guest_python(), "-c", code], capture_output=True, text=True, check=True)
    listing: dict[str, list[str]] = {}
    for directory in json.loads(proc.stdout):
        path = Path(directory)
        listing[directory] = sorted(os.listdir(path)) if path.is_dir() else []
    return listing


def first_hello(argv: list[str], timeout: float = 30.0) -> tuple[dict[str, Any], str]:
    """Run the installed agent on a pty we hold the master of; the first hello it writes
    (decoded with guestbus.wire, as the serial-bridge does) and its log."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    argv = [*argv, "--device", os.ttyname(slave)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    session = Session()
    hello: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + timeout
        while hello is None and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                for event in session.receive_data(os.read(master, 65536)):
                    if isinstance(event, HelloReceived):
                        hello = event.params
    finally:
        proc.terminate()
        try:
            log = proc.communicate(timeout=10)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0].decode(errors="replace")
        os.close(master)
        os.close(slave)
    assert hello is not None, f"no hello from the installed agent; its log:\n{log}"
    return hello, log


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "guest"
    root.mkdir()
    yield root


# --- the tests -------------------------------------------------------------------------------


def test_installer_copies_the_layout_names_exactly() -> None:
    """install.py cannot import layout.py (it runs before the agent is installed)."""
    shared = {name for name in vars(install) if name.isupper() and hasattr(layout, name)}
    assert {"VENV", "AGENT_BIN", "CONFIG_PATH", "UNIT_PATH", "STATE_DIR", "ISO_WHEELS"} <= shared
    for name in shared:
        assert getattr(install, name) == getattr(layout, name), name
    imports = [
        line
        for line in (AGENT_DIR / "install.py").read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]
    assert not [line for line in imports if "guestbus" in line or line.startswith("from .")]


def test_fresh_install_is_offline_and_the_agent_starts_with_the_isos_config(
    tmp_path: Path, scratch: Path, wheelhouse: Wheelhouse
) -> None:
    source, tls = make_source(tmp_path / "iso", wheelhouse, serial=1)
    site_before = system_site_packages()
    out = ok(run_install(source, scratch))
    assert "venv: created" in out and "agent: installed guestbus-agent" in out
    assert "config: took config cfg-1 #1" in out and "unit: installed" in out
    assert "not started (--root was given)" in out

    venv = scratch / "opt/guestbus/venv"
    pyvenv = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in pyvenv
    want = ".".join(map(str, _version(guest_python()) or ()))
    assert f"version = {want}." in pyvenv or f"version_info = {want}." in pyvenv
    agent = venv / "bin/guestbus-agent"
    version = subprocess.run([agent, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"guestbus-agent {wheelhouse.agent_version}"
    imported = subprocess.run(
        [venv / "bin/python", "-c", "import guestbus_agent.main, guestbus.wire; print('ok')"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "ok"
    assert system_site_packages() == site_before

    config = scratch / "etc/guestbus/config.json"
    assert mode(config) == 0o600 and mode(config.parent) == 0o755
    assert installed_config(scratch)["config_serial"] == 1
    assert mode(scratch / "etc/guestbus/dr-verify.pem") == 0o644
    state_tls = scratch / "var/lib/guestbus/tls"
    assert mode(state_tls) == 0o700 and mode(state_tls / "client.key") == 0o600
    assert [(state_tls / name).read_bytes() for name in TLS] == list(tls)
    unit = scratch / "etc/systemd/system/guestbus-agent.service"
    assert unit.read_bytes() == (AGENT_DIR / "systemd/guestbus-agent.service").read_bytes()
    wants = scratch / "etc/systemd/system/multi-user.target.wants/guestbus-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/guestbus-agent.service"
    # root's PATH finds the agent's own command (`guestbus-agent ssr ...` in the guest)
    assert (
        os.readlink(scratch / "usr/local/sbin/guestbus-agent")
        == "/opt/guestbus/venv/bin/guestbus-agent"
    )

    hello, _ = first_hello(
        [str(agent), "--config", str(config), "--state-dir", str(scratch / "var/lib/guestbus")]
    )
    assert hello["vm"] == VM and hello["config_uuid"] == "cfg-1"
    assert hello["agent_version"] == wheelhouse.agent_version

    before = tree(scratch)
    again = ok(run_install(source, scratch))
    assert "nothing to do" in again and "already installed" in again
    assert tree(scratch) == before


def test_upgrade_keeps_the_identity_unless_the_iso_is_newer(
    tmp_path: Path, scratch: Path, wheelhouse: Wheelhouse
) -> None:
    v2, _ = make_source(tmp_path / "v2", wheelhouse, serial=2)
    ok(run_install(v2, scratch))
    state = scratch / "var/lib/guestbus"
    # What the running agent made since: a renewed certificate, a derived (clone) config.
    renewed = make_tls(VM)
    for name, data in zip(TLS, renewed):
        (state / "tls" / name).write_bytes(data)
    (state / "config.json").write_text(json.dumps({"note": "derived by the agent"}))

    ok(run_install(v2, scratch))  # the same ISO again: an upgrade in place
    assert [(state / "tls" / name).read_bytes() for name in TLS] == list(renewed)
    assert (state / "config.json").exists()

    v1, _ = make_source(tmp_path / "v1", wheelhouse, serial=1)
    out = ok(run_install(v1, scratch))
    assert "kept the installed config" in out
    assert installed_config(scratch)["config_serial"] == 2
    assert (state / "tls/client.crt").read_bytes() == renewed[1]

    v3, tls3 = make_source(tmp_path / "v3", wheelhouse, serial=3)
    out = ok(run_install(v3, scratch))
    assert "took config cfg-3 #3" in out
    assert installed_config(scratch)["config_serial"] == 3
    assert [(state / "tls" / name).read_bytes() for name in TLS] == list(tls3)
    assert (state / "config.json").exists()  # the state dir is never wiped

    # A config-only ISO refreshes the config of the installed agent.
    v4, tls4 = make_source(tmp_path / "v4", None, serial=4)
    out = ok(run_install(v4, scratch))
    assert "keeping the installed" in out and "took config cfg-4 #4" in out
    assert (state / "tls/client.crt").read_bytes() == tls4[1]

    # A tampered wheel: refused before anything is touched.
    bad, _ = make_source(tmp_path / "bad", wheelhouse, serial=9)
    wheel = next((bad / "wheels").glob("pyserial-*.whl"))
    damaged = bytearray(wheel.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    wheel.write_bytes(bytes(damaged))
    before = tree(scratch)
    err = failed(run_install(bad, scratch))
    assert f"{wheel.name}: sha256 differs" in err and "tampered" in err
    assert tree(scratch) == before


def test_tampered_or_config_only_iso_on_a_fresh_guest_changes_nothing(
    tmp_path: Path, scratch: Path, wheelhouse: Wheelhouse
) -> None:
    config_only, _ = make_source(tmp_path / "config-only", None, serial=1)
    err = failed(run_install(config_only, scratch))
    assert "this is a config-only ISO; install from a full ISO first" in err
    assert list(scratch.iterdir()) == []

    full, _ = make_source(tmp_path / "full", wheelhouse, serial=1)
    (full / "wheels" / "extra-1.0-py3-none-any.whl").write_bytes(b"PK")
    err = failed(run_install(full, scratch))
    assert "extra-1.0-py3-none-any.whl: not in wheelhouse.json" in err
    (full / "wheels" / "extra-1.0-py3-none-any.whl").unlink()
    (full / "wheels" / "wheelhouse.json").write_text("{}")
    assert "wheelhouse.json: unusable" in failed(run_install(full, scratch))
    assert list(scratch.iterdir()) == []


def test_broken_venv_is_recreated_uninstall_keeps_the_identity_purge_removes_it(
    tmp_path: Path, scratch: Path, wheelhouse: Wheelhouse
) -> None:
    source, _ = make_source(tmp_path / "iso", wheelhouse, serial=1)
    ok(run_install(source, scratch))
    venv = scratch / "opt/guestbus/venv"
    (venv / "bin/python").unlink()
    out = ok(run_install(source, scratch))
    assert "re-creating" in out and "its python does not run" in out
    cfg = venv / "pyvenv.cfg"
    lines = cfg.read_text().splitlines()
    cfg.write_text("\n".join("version = 3.8.0" if ln.startswith("version") else ln for ln in lines))
    out = ok(run_install(source, scratch))
    assert "made by Python 3.8" in out
    assert subprocess.run([venv / "bin/guestbus-agent", "--version"]).returncode == 0

    # A guest without the venv module (Debian without python3-venv), stood in for by a
    # ``venv`` package that cannot run: the message says what to install, and the venv
    # that was to be replaced is back as it was.
    no_venv = tmp_path / "no-venv"
    (no_venv / "venv").mkdir(parents=True)
    (no_venv / "venv" / "__init__.py").write_text("")
    cfg.write_text(cfg.read_text().replace("version = ", "version = 3.8.0\n#", 1))
    before = tree(scratch)
    err = failed(run_install(source, scratch, env_extra={"PYTHONPATH": str(no_venv)}))
    assert "install python3-venv" in err
    assert tree(scratch) == before
    ok(run_install(source, scratch))

    out = ok(run_install(source, scratch, "--uninstall"))
    assert "kept" in out and "--purge removes it" in out
    for gone in ("opt/guestbus", "etc/guestbus", "etc/systemd/system/guestbus-agent.service"):
        assert not (scratch / gone).exists(), gone
    wants = scratch / "etc/systemd/system/multi-user.target.wants/guestbus-agent.service"
    assert not os.path.lexists(wants)
    assert not os.path.lexists(scratch / "usr/local/sbin/guestbus-agent")
    assert (scratch / "var/lib/guestbus/tls/client.key").exists()
    assert "nothing to remove" in ok(run_install(source, scratch, "--uninstall"))
    ok(run_install(source, scratch, "--uninstall", "--purge"))
    assert not (scratch / "var/lib/guestbus").exists()


def test_install_sh_without_a_new_enough_python_says_so(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("python3", "python3.9"):
        (stubs / name).write_text("#!/bin/sh\nexit 1\n")  # answers "too old"
        os.chmod(stubs / name, 0o755)
    proc = subprocess.run(
        ["/bin/sh", str(AGENT_DIR / "install.sh")],
        env={"PATH": str(stubs)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "needs Python 3.9 or newer" in proc.stderr


def test_installing_into_the_system_needs_root() -> None:
    """Without --root, an unprivileged user is told to run it as root (nothing is tried)."""
    if os.geteuid() != 0:
        proc = subprocess.run([sys.executable, str(AGENT_DIR / "install.py")], capture_output=True)
    else:
        python = next(
            (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None
        )
        if python is None or (_version(python) or (0, 0)) < (3, 9):
            pytest.skip("no system python3 >= 3.9 that an unprivileged user can run")
        shared = Path(tempfile.mkdtemp(prefix="guestbus-install-"))
        try:
            os.chmod(shared, 0o755)
            shutil.copy(AGENT_DIR / "install.py", shared / "install.py")
            proc = subprocess.run(
                [python, str(shared / "install.py")], capture_output=True, user=65534, cwd=shared
            )
        finally:
            shutil.rmtree(shared)
    assert proc.returncode == 1
    assert b"run it as root (sudo sh install.sh), or give --root DIR" in proc.stderr
