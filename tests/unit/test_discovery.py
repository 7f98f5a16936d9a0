"""serial-bridge discovery: the path pattern and libvirt domain XML (live and persistent)."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestbus_serial_bridge.discovery import (
    PatternError,
    compile_pattern,
    parse_domain_xml,
    scan,
    scan_all,
    scan_pattern,
)

A = "5b0c1e2a-1111-4222-8333-944455556666"
B = "11111111-2222-4333-8444-555566667777"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="gbd-") as d:
        yield Path(d)


def bind(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    return s


def domain(uuid: str, name: str, path: str, port: int = 1, kind: str = "unix") -> str:
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><devices>
      <serial type='pty'><target type='isa-serial' port='0'/></serial>
      <serial type='{kind}'><source mode='bind' path='{path}'/>
        <target type='isa-serial' port='{port}'/></serial>
    </devices></domain>"""


def test_pattern_needs_exactly_one_uuid_placeholder() -> None:
    with pytest.raises(PatternError, match=r"\{uuid\}"):
        compile_pattern("/var/lib/libvirt/qemu/serial.1")
    glob_expr, regex = compile_pattern("/x/{uuid}.serial.1")
    assert glob_expr == "/x/*.serial.1"
    assert regex.match(f"/x/{A}.serial.1")
    assert not regex.match("/x/not-a-uuid.serial.1")


def test_pattern_scan_finds_sockets_by_uuid(short_tmp: Path) -> None:
    socks = [bind(short_tmp / f"{A}.serial.1"), bind(short_tmp / f"{B.upper()}.serial.1")]
    (short_tmp / "junk.serial.1").write_text("")
    (short_tmp / f"{A}.serial.0").write_text("")
    try:
        found = scan_pattern(str(short_tmp / "{uuid}.serial.1"))
    finally:
        for s in socks:
            s.close()
    assert set(found) == {A, B}
    assert found[B].path.endswith(f"{B.upper()}.serial.1")


def test_domain_xml_picks_the_unix_serial_on_the_configured_port() -> None:
    xml = domain(A, "web-1", "/run/a.sock", port=1)
    vm = parse_domain_xml(xml, 1)
    assert vm is not None
    assert (vm.uuid, vm.name, vm.path, vm.source) == (A, "web-1", "/run/a.sock", "libvirt-xml")
    assert parse_domain_xml(xml, 2) is None
    assert parse_domain_xml(domain(A, "x", "/p", kind="tcp"), 1) is None
    assert parse_domain_xml("<not xml", 1) is None
    assert parse_domain_xml(domain("nope", "x", "/p"), 1) is None


def test_live_status_xml_is_understood() -> None:
    # libvirt's run directory wraps the live domain in <domstatus>.
    xml = f"<domstatus state='running' pid='1'>{domain(A, 'db', '/s')}</domstatus>"
    vm = parse_domain_xml(xml, 1)
    assert vm is not None and vm.name == "db"


def test_scan_merges_sources_and_ignores_missing_sockets(short_tmp: Path) -> None:
    socks = short_tmp / "socks"
    xml_dir = short_tmp / "xml"
    socks.mkdir()
    xml_dir.mkdir()
    sa = bind(socks / f"{A}.serial.1")
    try:
        (xml_dir / "a.xml").write_text(domain(A, "named-a", str(socks / f"{A}.serial.1")))
        (xml_dir / "b.xml").write_text(domain(B, "b-without-socket", str(socks / "gone.sock")))
        (xml_dir / "broken.xml").write_text("<domain>")
        found = scan(str(socks / "{uuid}.serial.1"), [str(xml_dir), str(short_tmp / "absent")], 1)
    finally:
        sa.close()
    assert set(found) == {A}
    assert found[A].name == "named-a"  # XML knows the name; it wins over the pattern


def test_scan_all_also_lists_defined_domains_without_a_socket(short_tmp: Path) -> None:
    """A defined domain that is not running (persistent XML, no socket until QEMU starts) is
    described, so the bridge can record it; only a socket that exists is linkable."""
    socks = short_tmp / "socks"
    xml_dir = short_tmp / "xml"
    socks.mkdir()
    xml_dir.mkdir()
    sa = bind(socks / f"{A}.serial.1")
    try:
        (xml_dir / "a.xml").write_text(domain(A, "running", str(socks / f"{A}.serial.1")))
        (xml_dir / "b.xml").write_text(domain(B, "defined", str(socks / f"{B}.serial.1")))
        found, described = scan_all(None, [str(xml_dir)], 1)
    finally:
        sa.close()
    assert set(found) == {A}
    assert set(described) == {A, B}
    assert described[B].name == "defined" and described[B].source == "libvirt-xml"
    assert scan(None, [str(xml_dir)], 1) == found
