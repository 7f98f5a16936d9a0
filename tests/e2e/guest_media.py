"""CD-ROMs for e2e guests: the tiny serial-probe ISO, and a real full guestbus ISO.

Both are labelled GUESTBUS, so the guest image's firstboot unit mounts them and runs their
``install.sh``:

- ``serial_probe_iso()``: an ``install.sh`` that talks on ``/dev/ttyS1`` by hand (no agent,
  no Python) to prove the reference serial port carries bytes both ways;
- ``agent_iso()``: what iso-builder puts on a full ISO (its own ``content`` and ``media``
  code: config, certificate, installer, unit, the offline wheelhouse), with a throw-away CA
  instead of the cert-authority service, so no service runs.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from guestbus.contract import AgentConfigFile, IsoKind
from guestbus.pki import spiffe_id
from guestbus_agent import layout
from guestbus_iso_builder import content, media
from guestbus_iso_builder.wheelhouse import Wheelhouse, ensure_wheelhouse

PROBE_HELLO = "GUEST-TO-HOST"
PROBE_ECHO = "GUEST-ECHO"
PROBE_SCRIPT = rf"""#!/bin/sh
# e2e serial probe, run by the guest's firstboot unit as if it were the installer: writes
# "{PROBE_HELLO} <n>" lines to /dev/ttyS1 every second until the host sends a line back,
# then answers "{PROBE_ECHO} <that line>" and says on the console what it got.
set -u
tty=/dev/ttyS1
stty -F "$tty" raw -echo 115200 || {{ echo "serial-probe: cannot set up $tty"; exit 3; }}
exec 3<>"$tty"
reply=/run/serial-probe.reply
rm -f "$reply"
head -n 1 <&3 >"$reply" &
n=0
while [ ! -s "$reply" ]; do
    [ "$n" -ge 600 ] && {{ echo "serial-probe: the host never answered"; exit 4; }}
    printf '{PROBE_HELLO} %s\n' "$n" >&3
    sleep 1
    n=$((n + 1))
done
line=$(cat "$reply")
printf '{PROBE_ECHO} %s\n' "$line" >&3
echo "serial-probe: the host said: $line (after $n hellos)"
"""


def genisoimage(source: Path, out: Path, label: str = layout.ISO_LABEL) -> Path:
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise RuntimeError("genisoimage is not installed: apt-get install genisoimage")
    subprocess.run(
        [tool, "-quiet", "-V", label, "-r", "-J", "-o", str(out), str(source)], check=True
    )
    return out


def serial_probe_iso(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "install.sh"
        script.write_text(PROBE_SCRIPT)
        script.chmod(0o755)
        return genisoimage(Path(tmp), out)


def wheelhouse() -> Wheelhouse:
    """The agent's offline wheelhouse, in the cache the ISO tests use (built once: ~21 MB)."""
    root = Path(os.environ.get("GUESTBUS_TEST_CACHE", "~/.cache/guestbus-tests")).expanduser()
    return ensure_wheelhouse(root / "wheelhouse")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _tls(vm: str, trust_domain: str = "guestbus.local") -> tuple[bytes, bytes, bytes]:
    """(CA, certificate, key) PEMs: a VM client certificate as the cert-authority makes it
    (CN and one SPIFFE URI SAN name the VM) from a throw-away CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("guestbus e2e CA"))
        .issuer_name(_name("guestbus e2e CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(vm))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(trust_domain, vm))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def agent_iso(
    out: Path,
    vm: str,
    *,
    name: str | None = None,
    heartbeat_interval: float = 5.0,
    house: Wheelhouse | None = None,
) -> Path:
    """A full ISO for ``vm`` made by iso-builder's own content and mastering code. No IP
    fallback (the guests have no network): the serial link is the only one."""
    ca_pem, cert_pem, key_pem = _tls(vm)
    draft = AgentConfigFile(
        vm_uuid=vm,
        config_uuid="pending",
        config_serial=1,
        gateway_host="gateway.invalid",
        serial_device="/dev/ttyS1",
        heartbeat_interval=heartbeat_interval,
        ip_fallback=False,
    )
    config = draft.model_copy(update={"config_uuid": content.config_uuid(draft, cert_pem)})
    dr_public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    material = content.VmMaterial(
        config=config,
        name=name,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        dr_public_pem=dr_public,
    )
    entries = content.iso_entries(
        material, IsoKind.FULL, house or wheelhouse(), content.load_agent_files()
    )
    with out.open("wb") as f:
        media.build_iso(entries, f, label=layout.ISO_LABEL)
    return out
