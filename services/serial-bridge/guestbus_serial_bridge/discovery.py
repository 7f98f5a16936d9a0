"""Finding VM serial sockets on this host: a path pattern, and libvirt domain XML.

Both sources are re-read on every scan, so new VMs are picked up and vanished ones dropped
without a restart. The VM identity comes from where the socket is (its path or its domain's
``<uuid>``), never from anything the guest says.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("guestbus.bridge.discovery")

UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
DEFAULT_PATTERN = "/var/lib/libvirt/qemu/{uuid}.serial.1"


@dataclass(frozen=True)
class VmSocket:
    uuid: str
    path: str
    name: str | None = None
    source: str = "pattern"


class PatternError(ValueError):
    pass


def compile_pattern(pattern: str) -> tuple[str, re.Pattern[str]]:
    """A ``{uuid}`` path pattern → (glob, regex capturing the uuid)."""
    if pattern.count("{uuid}") != 1:
        raise PatternError(
            f"socket pattern {pattern!r} must contain {{uuid}} exactly once, "
            "e.g. /var/lib/libvirt/qemu/{uuid}.serial.1"
        )
    before, after = pattern.split("{uuid}")
    glob_expr = glob.escape(before) + "*" + glob.escape(after)
    regex = re.compile("^" + re.escape(before) + f"({UUID_RE})" + re.escape(after) + "$")
    return glob_expr, regex


def scan_pattern(pattern: str) -> dict[str, VmSocket]:
    glob_expr, regex = compile_pattern(pattern)
    found: dict[str, VmSocket] = {}
    for path in glob.glob(glob_expr):
        m = regex.match(path)
        if m:
            uuid = m.group(1).lower()
            found[uuid] = VmSocket(uuid=uuid, path=path, source="pattern")
    return found


def parse_domain_xml(text: str, port: int) -> VmSocket | None:
    """The unix serial socket of a domain whose ``<target port>`` equals ``port``, if any.

    Matches ``<serial type='unix'><source mode='bind' path='…'/><target port='N'/>`` (and the
    same under ``<console>`` or ``<channel>`` is ignored: those are not the guest's UART N).
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    # libvirt's run directory wraps the live XML in <domstatus>; look for the domain anywhere.
    domain = root if root.tag == "domain" else root.find(".//domain")
    if domain is None:
        return None
    uuid_el = domain.find("uuid")
    if uuid_el is None or not uuid_el.text or not re.fullmatch(UUID_RE, uuid_el.text.strip()):
        return None
    name_el = domain.find("name")
    devices = domain.find("devices")
    if devices is None:
        return None
    for serial in devices.findall("serial"):
        if serial.get("type") != "unix":
            continue
        target = serial.find("target")
        source = serial.find("source")
        if target is None or source is None or source.get("path") is None:
            continue
        try:
            target_port = int(target.get("port", "0"))
        except ValueError:
            continue
        if target_port == port and source.get("mode", "bind") == "bind":
            return VmSocket(
                uuid=uuid_el.text.strip().lower(),
                path=str(source.get("path")),
                name=name_el.text.strip() if name_el is not None and name_el.text else None,
                source="libvirt-xml",
            )
    return None


_parsed: dict[tuple[str, int], tuple[tuple[int, int, int], VmSocket | None]] = {}
"""(path, port) → (inode, size, mtime) of the file when parsed, and what it held: a rescan
re-reads only domain XML that changed."""


def scan_xml_dir(directory: str, port: int) -> dict[str, VmSocket]:
    found: dict[str, VmSocket] = {}
    try:
        entries = sorted(
            (e for e in os.scandir(directory) if e.name.endswith(".xml")), key=lambda e: e.name
        )
    except OSError:
        return found
    seen: set[tuple[str, int]] = set()
    for entry in entries:
        key = (entry.path, port)
        try:
            st = entry.stat()
        except OSError:
            continue
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _parsed.get(key)
        if cached is not None and cached[0] == stamp:
            vm = cached[1]
        else:
            try:
                text = Path(entry.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.debug("skipping %s: %s", entry.name, exc)
                continue
            vm = parse_domain_xml(text, port)
            _parsed[key] = (stamp, vm)
        seen.add(key)
        if vm is not None:
            found[vm.uuid] = vm
    for key in [
        k for k in _parsed if k[0].startswith(directory.rstrip("/") + "/") and k not in seen
    ]:
        del _parsed[key]  # the file is gone
    return found


def scan(pattern: str | None, xml_dirs: list[str], port: int) -> dict[str, VmSocket]:
    """Every VM socket that exists now; XML (which knows names) wins over the pattern."""
    return scan_all(pattern, xml_dirs, port)[0]


def scan_all(
    pattern: str | None, xml_dirs: list[str], port: int
) -> tuple[dict[str, VmSocket], dict[str, VmSocket]]:
    """(every VM socket that exists now, every VM the domain XML describes).

    The second also holds domains that are defined but not running (persistent XML in
    ``/etc/libvirt/qemu``, whose socket QEMU creates only at start): such a VM is known, so
    it can be recorded (and get its ISO) before its first start, but there is nothing to
    connect to yet.
    """
    found: dict[str, VmSocket] = {}
    described: dict[str, VmSocket] = {}
    if pattern:
        found.update(scan_pattern(pattern))
    for directory in xml_dirs:
        for uuid, vm in scan_xml_dir(directory, port).items():
            described.setdefault(uuid, vm)
            if os.path.exists(vm.path):
                found[uuid] = vm
    return found, described
