"""Taking a config from the ISO: the rule, the files and modes, the refusals, the mount.

Runs on CPython 3.9 with ``--noconftest`` (stdlib, pytest and cryptography only): this is
guest-side code. Certificates are made here with cryptography; ISOs are real directories,
and where the kernel allows, real images on real loop devices.
"""

import datetime
import json
import logging
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

import guestbus_agent
from guestbus.wire import HelloReceived, Session
from guestbus_agent.config import AgentConfig, ConfigError, parse_config
from guestbus_agent.main import main
from guestbus_agent.provisioning import (
    IsoLocator,
    ProvisioningError,
    iso_directory,
    newer,
    take_at_start,
    take_from,
)

VM = "5b0c1e2a-1111-4222-8333-944455556666"
OTHER_VM = "9d3f0c1a-2222-4333-8444-a55566667777"


# --- material ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_tls(vm: str) -> Tuple[bytes, bytes, bytes]:
    """(key, certificate, CA) PEMs: a client certificate with CN ``vm`` from a fresh CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(vm))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return _pem_key(key), cert.public_bytes(pem), ca.public_bytes(pem)


def dr_key() -> bytes:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def config_data(
    serial: Optional[int] = 1, vm: str = VM, uuid: str = "cfg-1", **extra: Any
) -> Dict[str, Any]:
    data: Dict[str, Any] = {"vm_uuid": vm, "config_uuid": uuid, "gateway_host": "10.0.0.10"}
    if serial is not None:
        data["config_serial"] = serial
    data.update(extra)
    return data


def make_iso(
    where: Path,
    config: Dict[str, Any],
    tls: Optional[Tuple[bytes, bytes, bytes]] = None,
    with_tls: bool = True,
    dr: bool = True,
) -> Path:
    """A directory shaped like the ISO's root."""
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps(config, indent=2))
    if with_tls:
        key, cert, ca = tls or make_tls(str(config["vm_uuid"]))
        (where / "client.key").write_bytes(key)
        os.chmod(str(where / "client.key"), 0o600)
        (where / "client.crt").write_bytes(cert)
        (where / "ca.pem").write_bytes(ca)
    if dr:
        (where / "dr-verify.pem").write_bytes(dr_key())
    return where


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` with its contents, to prove nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def guest(tmp_path: Path) -> Tuple[Path, Path]:
    """(config path, state dir) of a guest, empty at first."""
    return tmp_path / "etc" / "guestbus" / "config.json", tmp_path / "var" / "lib" / "guestbus"


# --- the rule --------------------------------------------------------------------------------


def cfg(serial: Optional[int], uuid: str = "cfg-1", vm: str = VM, **extra: Any) -> AgentConfig:
    return parse_config(config_data(serial, vm, uuid, **extra))


@pytest.mark.parametrize(
    "iso,installed,take",
    [
        (cfg(1), None, True),
        (cfg(None), None, True),
        (cfg(3, "cfg-3"), cfg(2, "cfg-2"), True),
        (cfg(2, "cfg-2"), cfg(2, "cfg-2"), False),
        (cfg(1, "cfg-1"), cfg(2, "cfg-2"), False),
        # serials decide even when config_uuid differs (an older ISO rebuilt)
        (cfg(1, "cfg-9"), cfg(2, "cfg-2"), False),
        # one side without a serial: config_uuid decides
        (cfg(None, "cfg-2"), cfg(5, "cfg-1"), True),
        (cfg(7, "cfg-1"), cfg(None, "cfg-1"), False),
        (cfg(None, "cfg-1"), cfg(None, "cfg-1"), False),
        # a clone's derived config came from this very config: not new
        (cfg(None, "tmpl"), cfg(None, "clone-1", source_config_uuid="tmpl"), False),
    ],
)
def test_newer_rule(iso: AgentConfig, installed: Optional[AgentConfig], take: bool) -> None:
    decision = newer(iso, installed)
    assert decision.take is take, decision.reason
    assert not decision.refused


def test_newer_config_for_another_vm_is_refused_unless_forced() -> None:
    iso, installed = cfg(5, "tmpl-5"), cfg(2, "clone-2", vm=OTHER_VM)
    decision = newer(iso, installed)
    assert not decision.take and decision.refused
    assert VM in decision.reason and OTHER_VM in decision.reason
    assert "--force" in decision.reason
    assert newer(iso, installed, force=True).take
    # not newer at all: simply current, nothing to warn about
    assert not newer(cfg(1, "tmpl-1"), installed).refused


@pytest.mark.parametrize("value", [-1, 1.5, "3", True])
def test_config_serial_is_validated_and_named(value: object) -> None:
    with pytest.raises(ConfigError, match="'config_serial' must be a non-negative integer"):
        parse_config(config_data(serial=None, config_serial=value), "iso/config.json")


def test_config_serial_round_trips() -> None:
    parsed = parse_config(config_data(serial=7))
    assert parsed.config_serial == 7 and parsed.to_json()["config_serial"] == 7
    assert "config_serial" not in parse_config(config_data(serial=None)).to_json()


# --- take_from -------------------------------------------------------------------------------


def test_take_from_installs_config_identity_and_dr_key(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    tls = make_tls(VM)
    iso = make_iso(tmp_path / "iso", config_data(serial=4), tls)
    outcome = take_from(iso, config_path, state)
    assert outcome.taken and "no config installed" in outcome.reason
    assert outcome.summary().startswith(f"took config cfg-1 #4 for VM {VM}")
    assert json.loads(config_path.read_text())["config_serial"] == 4
    assert mode(config_path) == 0o600 and mode(config_path.parent) == 0o755
    tls_dir = state / "tls"
    assert mode(tls_dir) == 0o700
    assert (tls_dir / "client.key").read_bytes() == tls[0] and mode(tls_dir / "client.key") == 0o600
    assert (tls_dir / "client.crt").read_bytes() == tls[1]
    assert (tls_dir / "ca.pem").read_bytes() == tls[2]
    dr = config_path.parent / "dr-verify.pem"
    assert dr.read_bytes() == (iso / "dr-verify.pem").read_bytes() and mode(dr) == 0o644

    before = snapshot(tmp_path / "etc"), snapshot(state)
    again = take_from(iso, config_path, state)
    assert not again.taken and again.summary().startswith("kept the installed config: already")
    assert (snapshot(tmp_path / "etc"), snapshot(state)) == before


def test_newer_iso_replaces_config_and_certificate_older_does_not(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    take_from(make_iso(tmp_path / "v2", config_data(serial=2, uuid="cfg-2")), config_path, state)
    new_tls = make_tls(VM)
    v3 = make_iso(tmp_path / "v3", config_data(serial=3, uuid="cfg-3"), new_tls)
    assert take_from(v3, config_path, state).taken
    assert (state / "tls" / "client.crt").read_bytes() == new_tls[1]
    assert (state / "tls" / "client.crt.prev").exists()  # the previous pair is kept aside
    v1 = make_iso(tmp_path / "v1", config_data(serial=1, uuid="cfg-1"))
    before = snapshot(tmp_path / "etc"), snapshot(state)
    outcome = take_from(v1, config_path, state)
    assert not outcome.taken and "config_serial 1 is not newer than the installed 3" in (
        outcome.reason
    )
    assert (snapshot(tmp_path / "etc"), snapshot(state)) == before


def test_iso_without_identity_installs_the_config_only(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    iso = make_iso(tmp_path / "iso", config_data(), with_tls=False, dr=False)
    assert take_from(iso, config_path, state).taken
    assert config_path.exists() and not (state / "tls").exists()
    assert not (config_path.parent / "dr-verify.pem").exists()


def test_certificate_for_another_vm_is_refused_and_nothing_written(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    iso = make_iso(tmp_path / "iso", config_data(), make_tls(OTHER_VM))
    with pytest.raises(ProvisioningError, match=f"client.crt is for VM {OTHER_VM}.*rebuild"):
        take_from(iso, config_path, state)
    assert not config_path.parent.exists() and not state.exists()


def test_key_of_another_certificate_is_refused(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    _, cert, ca = make_tls(VM)
    iso = make_iso(tmp_path / "iso", config_data(), (make_tls(VM)[0], cert, ca))
    with pytest.raises(ProvisioningError, match=r"client\.key is not the key of client\.crt"):
        take_from(iso, config_path, state)
    (iso / "client.key").unlink()
    with pytest.raises(ProvisioningError, match=r"missing client\.key"):
        take_from(iso, config_path, state)
    assert not config_path.exists() and not state.exists()


def test_dr_key_must_be_ed25519(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    iso = make_iso(tmp_path / "iso", config_data())
    (iso / "dr-verify.pem").write_bytes(make_tls(VM)[2])  # a certificate, not a key
    with pytest.raises(ProvisioningError, match=r"dr-verify\.pem: not a PEM public key"):
        take_from(iso, config_path, state)
    assert not config_path.exists()


def test_another_vms_iso_is_refused_unless_forced(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    take_from(make_iso(tmp_path / "mine", config_data(serial=1)), config_path, state)
    before = snapshot(tmp_path / "etc"), snapshot(state)
    theirs = make_iso(tmp_path / "theirs", config_data(serial=9, vm=OTHER_VM, uuid="x"))
    outcome = take_from(theirs, config_path, state)
    assert not outcome.taken and outcome.refused
    assert f"this VM is {VM}" in outcome.summary()
    assert (snapshot(tmp_path / "etc"), snapshot(state)) == before
    forced = take_from(theirs, config_path, state, force=True)
    assert forced.taken and json.loads(config_path.read_text())["vm_uuid"] == OTHER_VM


def test_template_iso_on_a_clone_keeps_the_clones_identity(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    """The clone's agent wrote its derived config into the state dir: that is the one the
    agent runs with, so the template's next ISO is for another VM and is refused."""
    config_path, state = guest
    take_from(make_iso(tmp_path / "t1", config_data(serial=1, uuid="tmpl-1")), config_path, state)
    derived = config_data(serial=1, vm=OTHER_VM, uuid="clone-1", source_config_uuid="tmpl-1")
    (state / "config.json").write_text(json.dumps(derived))
    same = take_from(
        make_iso(tmp_path / "t1b", config_data(serial=1, uuid="tmpl-1")), config_path, state
    )
    assert not same.taken and not same.refused
    later = take_from(
        make_iso(tmp_path / "t2", config_data(serial=2, uuid="tmpl-2")), config_path, state
    )
    assert later.refused and f"this VM is {OTHER_VM}" in later.reason


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps(config_data(gateway_port=0)), "'gateway_port'"),
        (json.dumps(config_data(config_serial=-3)), "'config_serial'"),
    ],
)
def test_broken_iso_config_changes_nothing(
    tmp_path: Path, guest: Tuple[Path, Path], text: str, match: str
) -> None:
    config_path, state = guest
    take_from(make_iso(tmp_path / "good", config_data(serial=1)), config_path, state)
    before = snapshot(tmp_path / "etc"), snapshot(state)
    bad = make_iso(tmp_path / "bad", config_data(serial=2, uuid="cfg-2"))
    (bad / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        take_from(bad, config_path, state)
    assert (snapshot(tmp_path / "etc"), snapshot(state)) == before


def test_unusable_installed_config_is_replaced(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    config_path.parent.mkdir(parents=True)
    config_path.write_text("{}")
    outcome = take_from(make_iso(tmp_path / "iso", config_data()), config_path, state)
    assert outcome.taken and "installed config is unusable" in outcome.reason


# --- guestbus-agent --take-config-from -------------------------------------------------------


def run_main(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_take_config_from_cli(
    tmp_path: Path, guest: Tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, state = guest
    iso = make_iso(tmp_path / "iso", config_data(serial=2))
    base = ["--config", str(config_path), "--state-dir", str(state)]
    code, out, _ = run_main([*base, "--take-config-from", str(iso)], capsys)
    assert (
        code == 0 and out.startswith(f"took config cfg-1 #2 for VM {VM}") and out.count("\n") == 1
    )
    code, out, _ = run_main([*base, "--take-config-from", str(iso)], capsys)
    assert code == 0 and out.startswith("kept the installed config: already current")

    other = make_iso(tmp_path / "other", config_data(serial=3, vm=OTHER_VM))
    code, out, _ = run_main([*base, "--take-config-from", str(other)], capsys)
    assert code == 0 and "--force takes it anyway" in out
    code, out, _ = run_main([*base, "--take-config-from", str(other), "--force"], capsys)
    assert code == 0 and "(forced)" in out

    bad = make_iso(tmp_path / "bad", config_data(serial=9, heartbeat_interval="fast"))
    code, out, err = run_main([*base, "--take-config-from", str(bad)], capsys)
    assert code == 2 and out == ""
    assert "error:" in err and "'heartbeat_interval'" in err and "Traceback" not in err
    code, _, err = run_main([*base, "--take-config-from", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no config.json here: not a GUESTBUS ISO" in err
    code, _, err = run_main(["--take-config-from", str(iso)], capsys)
    assert code == 2 and "needs --config FILE" in err
    code, _, err = run_main([*base, "--force"], capsys)
    assert code == 2 and "--force goes with --take-config-from" in err


def test_help_names_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for option in ("--take-config-from", "--force", "--no-iso", "--config"):
        assert option in out


def test_unit_runs_the_venv_agent_with_the_installed_config() -> None:
    unit = Path(guestbus_agent.__file__).parent / "systemd" / "guestbus-agent.service"
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    expected = "ExecStart=/opt/guestbus/venv/bin/guestbus-agent --config /etc/guestbus/config.json"
    assert exec_start == [expected]


# --- at start: the agent looks for the ISO --------------------------------------------------


def fake_attached_iso(tmp_path: Path, iso: Path) -> IsoLocator:
    """/dev/disk/by-label and /proc/self/mounts stand-ins: a file stands in for the device,
    the label link resolves to it, and the mount table says it is mounted at ``iso``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    device = tmp_path / "sr0"
    device.write_bytes(b"")
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    os.symlink(str(device), str(by_label / "GUESTBUS"))
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\n{device} {iso} iso9660 ro 0 0\n")
    return IsoLocator(
        by_label_dir=str(by_label), mounts=str(mounts), mount_root=str(tmp_path / "m")
    )


AGENT_SCRIPT = """
import json, sys
from guestbus_agent.main import main
from guestbus_agent.provisioning import IsoLocator
sys.exit(main(sys.argv[2:], locator=IsoLocator(**json.loads(sys.argv[1]))))
"""


def python_path() -> str:
    import guestbus.wire

    roots = [Path(guestbus_agent.__file__).parents[1], Path(guestbus.wire.__file__).parents[2]]
    return os.pathsep.join(str(root) for root in roots)


def first_hello(
    argv: List[str], locator: IsoLocator, timeout: float = 20.0
) -> Tuple[Dict[str, Any], str]:
    """Start the real agent on a pty: the params of the first hello it writes, and its log."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=python_path())
    loc = json.dumps(locator.__dict__)
    argv = [sys.executable, "-c", AGENT_SCRIPT, loc, *argv, "--device", os.ttyname(slave)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    session = Session()
    hello: Optional[Dict[str, Any]] = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            for event in session.receive_data(os.read(master, 65536)):
                if isinstance(event, HelloReceived):
                    hello = event.params
            if hello is not None:
                break
    finally:
        proc.terminate()
        try:
            log_text = proc.communicate(timeout=10)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            log_text = proc.communicate()[0].decode(errors="replace")
        os.close(master)
        os.close(slave)
    assert hello is not None, f"no hello from the agent; its log:\n{log_text}"
    return hello, log_text


def test_agent_takes_a_newer_iso_at_start_and_not_an_older_one(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    take_from(make_iso(tmp_path / "v2", config_data(serial=2, uuid="cfg-2")), config_path, state)
    argv = ["--config", str(config_path), "--state-dir", str(state)]

    v3 = make_iso(tmp_path / "v3", config_data(serial=3, uuid="cfg-3"))
    hello, log_text = first_hello(argv, fake_attached_iso(tmp_path / "a", v3))
    assert hello["vm"] == VM and hello["config_uuid"] == "cfg-3"
    assert "took config cfg-3 #3" in log_text
    assert json.loads(config_path.read_text())["config_serial"] == 3

    v1 = make_iso(tmp_path / "v1", config_data(serial=1, uuid="cfg-1"))
    hello, log_text = first_hello(argv, fake_attached_iso(tmp_path / "b", v1))
    assert hello["config_uuid"] == "cfg-3"
    assert "kept the installed config" in log_text

    v4 = make_iso(tmp_path / "v4", config_data(serial=4, uuid="cfg-4"))
    hello, log_text = first_hello([*argv, "--no-iso"], fake_attached_iso(tmp_path / "c", v4))
    assert hello["config_uuid"] == "cfg-3"


def test_agent_with_a_broken_iso_keeps_its_config(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    take_from(make_iso(tmp_path / "v1", config_data(serial=1)), config_path, state)
    broken = make_iso(tmp_path / "v2", config_data(serial=2, uuid="cfg-2"), make_tls(OTHER_VM))
    argv = ["--config", str(config_path), "--state-dir", str(state)]
    hello, log_text = first_hello(argv, fake_attached_iso(tmp_path / "a", broken))
    assert hello["config_uuid"] == "cfg-1"
    assert "ERROR" in log_text and "keeping the installed one" in log_text


def test_first_start_without_installed_config_takes_the_isos(
    tmp_path: Path, guest: Tuple[Path, Path]
) -> None:
    config_path, state = guest
    iso = make_iso(tmp_path / "iso", config_data(serial=1))
    argv = ["--config", str(config_path), "--state-dir", str(state)]
    assert first_hello(argv, fake_attached_iso(tmp_path / "a", iso))[0]["vm"] == VM
    assert mode(config_path) == 0o600 and (state / "tls" / "client.crt").exists()


def test_no_iso_attached_is_quiet(tmp_path: Path, guest: Tuple[Path, Path]) -> None:
    config_path, state = guest
    locator = IsoLocator(by_label_dir=str(tmp_path / "none"), mounts=str(tmp_path / "none"))
    assert take_at_start(config_path, state, locator) is None


# --- at start: an attached ISO that is not mounted ------------------------------------------


def _root_with(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture()
def loop_device() -> Iterator[Any]:
    """Attach an image file to a free loop device (read-only); detached afterwards."""
    attached: List[str] = []

    def attach(image: Path) -> str:
        proc = subprocess.run(
            ["losetup", "-f", "--show", "-r", str(image)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"no loop devices here: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return attached[-1]

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def label_link(tmp_path: Path, device: str) -> str:
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    os.symlink(device, str(by_label / "GUESTBUS"))
    return str(by_label)


def mounted_under(root: Path) -> List[str]:
    with open("/proc/self/mounts") as mounts:
        return [line for line in mounts if str(root) in line]


def test_attached_unmounted_image_is_mounted_read_and_unmounted(
    tmp_path: Path, guest: Tuple[Path, Path], loop_device: Any
) -> None:
    """The whole temporary-mount path on a real loop device. The kernel here may lack
    iso9660 (see the next test), so this image is ext4: only ``-t`` differs."""
    _root_with("losetup", "mkfs.ext4", "mount", "umount")
    config_path, state = guest
    iso = make_iso(tmp_path / "content", config_data(serial=5))
    image = tmp_path / "guestbus.img"
    with open(str(image), "wb") as f:
        f.truncate(8 << 20)
    mkfs = ["mkfs.ext4", "-q", "-L", "GUESTBUS", "-d", str(iso), str(image)]
    subprocess.run(mkfs, check=True, capture_output=True)
    device = loop_device(image)
    mount_root = tmp_path / "run-iso"
    locator = IsoLocator(
        by_label_dir=label_link(tmp_path, device), mount_root=str(mount_root), fstype="ext4"
    )

    with iso_directory(locator) as where:
        assert where is not None and where.parent == mount_root
        (line,) = mounted_under(mount_root)
        options = line.split()[3].split(",")
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(options)
        assert (where / "config.json").exists()
    assert mounted_under(mount_root) == [] and list(mount_root.iterdir()) == []
    assert mode(mount_root) == 0o700

    outcome = take_at_start(config_path, state, locator)
    assert outcome is not None and outcome.taken
    assert json.loads(config_path.read_text())["config_serial"] == 5
    assert mounted_under(mount_root) == [] and list(mount_root.iterdir()) == []


def test_real_iso9660_image(
    tmp_path: Path,
    guest: Tuple[Path, Path],
    loop_device: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real ISO (genisoimage -V GUESTBUS -r -J) on a loop device, mounted as the agent
    does. Where the kernel has no iso9660 the mount fails: that must be logged with the
    reason, leave nothing behind and keep the installed config."""
    _root_with("losetup", "genisoimage", "mount", "umount")
    config_path, state = guest
    iso = make_iso(tmp_path / "content", config_data(serial=6))
    image = tmp_path / "guestbus.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-V", "GUESTBUS", "-r", "-J", "-o", str(image), str(iso)],
        check=True,
    )
    device = loop_device(image)
    mount_root = tmp_path / "run-iso"
    locator = IsoLocator(by_label_dir=label_link(tmp_path, device), mount_root=str(mount_root))
    with open("/proc/filesystems") as f:
        supported = "iso9660" in f.read().split()
    caplog.set_level(logging.INFO, logger="guestbus.agent")
    outcome = take_at_start(config_path, state, locator)
    if supported:
        assert outcome is not None and outcome.taken
        assert json.loads(config_path.read_text())["config_serial"] == 6
        assert mode(config_path) == 0o600 and mode(state / "tls" / "client.key") == 0o600
    else:
        assert outcome is None and not config_path.exists()
        assert "could not be mounted: mount failed" in caplog.text
        assert "iso9660" in caplog.text
    assert mounted_under(mount_root) == [] and list(mount_root.iterdir()) == []


def test_not_root_cannot_mount_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As an unprivileged user (root drops to nobody for the call) the attached ISO is not
    mounted, and the log says why."""
    shared = Path(tempfile.mkdtemp(prefix="guestbus-test-"))
    try:
        os.chmod(str(shared), 0o755)
        device = shared / "sr0"
        device.write_bytes(b"")
        os.symlink(str(device), str(shared / "GUESTBUS"))
        (shared / "mounts").write_text("proc /proc proc rw 0 0\n")
        locator = IsoLocator(
            by_label_dir=str(shared), mounts=str(shared / "mounts"), mount_root=str(shared / "m")
        )
        caplog.set_level(logging.INFO, logger="guestbus.agent")
        was_root = os.geteuid() == 0
        if was_root:
            os.seteuid(65534)
        try:
            with iso_directory(locator) as where:
                assert where is None
        finally:
            if was_root:
                os.seteuid(0)
        assert "could not be mounted: not root" in caplog.text
        assert not (shared / "m").exists()
    finally:
        shutil.rmtree(str(shared))
