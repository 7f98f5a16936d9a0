"""The ISO image itself, read back by independent readers: label, names in all three name
spaces, modes, contents, the config against its schema, and byte-for-byte reproducibility."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from guestbus import pki
from guestbus.contract import AgentConfigFile, IsoKind
from guestbus.drkeys import public_pem
from guestbus_agent import layout
from guestbus_agent.config import parse_config
from guestbus_iso_builder.content import VmMaterial, config_uuid, iso_entries, load_agent_files
from guestbus_iso_builder.media import IsoEntry, MediaError, build_iso_bytes
from guestbus_iso_builder.wheelhouse import Wheelhouse

from ._support import isoinfo, pycdlib_read, xorriso_extract

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
VM = "5b0c1f2e-0000-4000-8000-000000000042"


def _material(serial: int = 1) -> VmMaterial:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, VM)]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = pki.cert_pem(cert).encode()
    config = AgentConfigFile(
        vm_uuid=VM, config_uuid="-", config_serial=serial, gateway_host="gw.example.test"
    )
    config = config.model_copy(update={"config_uuid": config_uuid(config, cert_pem)})
    return VmMaterial(
        config=config,
        name="web-1",
        ca_pem=pki.cert_pem(ca).encode(),
        cert_pem=cert_pem,
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        dr_public_pem=public_pem(Ed25519PrivateKey.generate()),
    )


@pytest.fixture(scope="module")
def material() -> VmMaterial:
    return _material()


@pytest.fixture(scope="module")
def config_only_iso(material: VmMaterial, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("iso") / "vm.iso"
    path.write_bytes(
        build_iso_bytes(
            iso_entries(material, IsoKind.CONFIG_ONLY, None, load_agent_files()), label="GUESTBUS"
        )
    )
    return path


ROOT_FILES = sorted(
    [
        layout.ISO_CONFIG,
        layout.ISO_CA,
        layout.ISO_CERT,
        layout.ISO_KEY,
        layout.ISO_DR_KEY,
        layout.ISO_INSTALLER,
        layout.ISO_INSTALL_SH,
        layout.ISO_UNIT,
        layout.ISO_README,
    ]
)


def test_label_joliet_and_rock_ridge_as_isoinfo_sees_them(config_only_iso: Path) -> None:
    info = isoinfo(config_only_iso, "-d")
    assert "Volume id: GUESTBUS" in info
    assert "Joliet" in info
    assert "Rock Ridge signatures" in info


def test_names_in_all_three_name_spaces(config_only_iso: Path) -> None:
    rock_ridge = [p.lstrip("/") for p in isoinfo(config_only_iso, "-R", "-f").split()]
    joliet = [p.lstrip("/") for p in isoinfo(config_only_iso, "-J", "-f").split()]
    plain = [p.lstrip("/") for p in isoinfo(config_only_iso, "-f").split()]
    assert sorted(rock_ridge) == ROOT_FILES
    assert sorted(joliet) == ROOT_FILES
    # ISO 9660 level 3: upper-case d-characters, version ;1, and one per file
    assert len(plain) == len(ROOT_FILES)
    for name in plain:
        base, _, version = name.partition(";")
        assert version == "1"
        assert base == base.upper() and all(c.isalnum() or c in "._" for c in base), name
    assert "CONFIG.JSON;1" in plain and "CLIENT.KEY;1" in plain


def test_modes_and_contents_survive_an_independent_extraction(
    config_only_iso: Path, material: VmMaterial, tmp_path: Path
) -> None:
    listing = isoinfo(config_only_iso, "-R", "-l")
    key_line = next(line for line in listing.splitlines() if line.rstrip().endswith("client.key"))
    assert key_line.startswith("-rw-------")
    out = xorriso_extract(config_only_iso, tmp_path / "x")
    assert (out / "client.key").stat().st_mode & 0o777 == 0o600
    assert (out / "install.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "client.key").read_bytes() == material.key_pem
    assert (out / "client.crt").read_bytes() == material.cert_pem
    assert (out / "ca.pem").read_bytes() == material.ca_pem
    assert (out / "dr-verify.pem").read_bytes() == material.dr_public_pem
    agent_dir = Path(layout.__file__).parent
    assert (out / "install.py").read_bytes() == (agent_dir / "install.py").read_bytes()
    unit = (out / "guestbus-agent.service").read_text()
    assert "ExecStart=" in unit
    readme = (out / "README.txt").read_text()
    assert VM in readme and "config-only" in readme
    # pycdlib, a second reader, agrees on bytes and mode
    data, mode = pycdlib_read(config_only_iso, "/client.key")
    assert data == material.key_pem and mode & 0o7777 == 0o600


def test_the_config_is_valid_for_the_schema_and_for_the_agent(
    config_only_iso: Path, tmp_path: Path
) -> None:
    out = xorriso_extract(config_only_iso, tmp_path / "x")
    data = json.loads((out / "config.json").read_text())
    schema = json.loads((SCHEMAS / "agent-config.json").read_text())
    jsonschema.validate(data, schema)
    config = parse_config(data, "iso")
    assert config.vm_uuid == VM
    assert config.gateway_host == "gw.example.test"
    assert data["config_serial"] == 1


def test_the_agent_accepts_every_command_the_contract_allows() -> None:
    from guestbus.contract import AGENT_COMMANDS
    from guestbus_agent.config import KNOWN_COMMANDS

    assert tuple(AGENT_COMMANDS) == tuple(KNOWN_COMMANDS)


@pytest.fixture
def other_timezone() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Auckland"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_same_inputs_give_byte_identical_images(
    material: VmMaterial, config_only_iso: Path, other_timezone: None
) -> None:
    entries = iso_entries(material, IsoKind.CONFIG_ONLY, None, load_agent_files())
    again = build_iso_bytes(list(reversed(entries)), label="GUESTBUS")  # other order, other TZ
    assert hashlib.sha256(again).digest() == hashlib.sha256(config_only_iso.read_bytes()).digest()
    # and a different input gives a different image
    changed = list(entries)
    changed[0] = IsoEntry(changed[0].path, changed[0].data + b" ", changed[0].mode)  # type: ignore[operator]
    assert build_iso_bytes(changed, label="GUESTBUS") != again


def test_config_uuid_follows_content_and_certificate(material: VmMaterial) -> None:
    cfg = material.config
    assert config_uuid(cfg, material.cert_pem) == cfg.config_uuid
    assert config_uuid(cfg, material.cert_pem + b"\n") != cfg.config_uuid
    newer = cfg.model_copy(update={"config_serial": 2})
    assert config_uuid(newer, material.cert_pem) != cfg.config_uuid


def test_bad_entries_are_refused() -> None:
    with pytest.raises(MediaError, match="twice"):
        build_iso_bytes([IsoEntry("a", b"1"), IsoEntry("a", b"2")], label="X")
    with pytest.raises(MediaError, match="invalid path"):
        build_iso_bytes([IsoEntry("../etc/passwd", b"1")], label="X")
    with pytest.raises(MediaError, match="file and as a directory"):
        build_iso_bytes([IsoEntry("a", b"1"), IsoEntry("a/b", b"2")], label="X")


def test_a_full_image_carries_the_wheelhouse_with_usable_names(
    material: VmMaterial, wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    path = tmp_path / "full.iso"
    path.write_bytes(
        build_iso_bytes(
            iso_entries(material, IsoKind.FULL, wheelhouse, load_agent_files()), label="GUESTBUS"
        )
    )
    rock_ridge = {p.lstrip("/") for p in isoinfo(path, "-R", "-f").split()}
    wheels = {f"wheels/{f.name}" for f in wheelhouse.files}
    assert wheels <= rock_ridge  # Linux sees the real file names pip needs
    joliet = [p.lstrip("/") for p in isoinfo(path, "-J", "-f").split()]
    assert all(len(part) <= 64 for p in joliet for part in p.split("/"))
    assert len([p for p in joliet if p.startswith("wheels/")]) == len(wheels)
    out = xorriso_extract(path, tmp_path / "x")
    for f in wheelhouse.files:
        assert (out / "wheels" / f.name).read_bytes() == f.read_bytes()
    readme = (out / "README.txt").read_text()
    assert wheelhouse.id in readme
