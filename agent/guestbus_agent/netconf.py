"""The guest's network, for DR changes: live state through iproute2, and the files that make
it survive a reboot (netplan, NetworkManager keyfiles, ifupdown).

CPython 3.9+, standard library only. Two backends share one interface: :class:`IpRoute2`
runs ``ip`` (what a guest uses) and :class:`Simulated` keeps the interfaces in memory (the
lab's dry run: thousands of agents in one process must not touch the host's network). The
file renderers are pure functions of text, so they are tested without a guest.
"""

import abc
import configparser
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .commands import interface_entry
from .files import atomic_write

BACKUP_SUFFIX = ".guestbus-dr-bak"
NETPLAN_FILE = "90-guestbus-dr-{name}.yaml"
NM_FILE = "guestbus-dr-{name}.nmconnection"
NEIGH_OK = {"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"}


class NetError(Exception):
    """A network operation failed; the message says which and why."""


def family_of(cidr: str) -> int:
    return ipaddress.ip_interface(cidr).version


def _is_global(cidr: str) -> bool:
    ip = ipaddress.ip_interface(cidr).ip
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast)


@dataclass
class Route:
    to: str
    via: str
    family: int


@dataclass
class Snapshot:
    """What an interface had before a change, to roll back to."""

    name: str
    addresses: List[str]
    routes: List[Route]


# --- backends ----------------------------------------------------------------------------


class Backend(abc.ABC):
    """Live network state of the guest: iproute2 in a guest, simulated in the lab."""

    kind = "abstract"

    @abc.abstractmethod
    def interfaces(self) -> List[Dict[str, Any]]: ...

    @abc.abstractmethod
    def snapshot(self, name: str) -> Snapshot: ...

    @abc.abstractmethod
    def set_addresses(self, name: str, version: int, addresses: Sequence[str]) -> None:
        """Make ``addresses`` the global addresses of one family on ``name``."""

    @abc.abstractmethod
    def set_routes(
        self, name: str, version: int, gateway: Optional[str], routes: Sequence[Route]
    ) -> None:
        """Replace the default route (and add ``routes``) of one family through ``name``."""

    def restore(self, snap: Snapshot, versions: Set[int]) -> None:
        for version in sorted(versions):
            self.set_addresses(
                snap.name, version, [a for a in snap.addresses if family_of(a) == version]
            )
            old = [r for r in snap.routes if r.family == version]
            gateway = next((r.via for r in old if r.to == "default"), None)
            self.set_routes(snap.name, version, gateway, [r for r in old if r.to != "default"])

    @abc.abstractmethod
    def gateway_reachable(self, name: str, gateway: str, timeout: float) -> bool: ...


class IpRoute2(Backend):
    """The guest's real network through ``ip`` (iproute2, JSON output)."""

    kind = "iproute2"

    def __init__(self, ip: str = "ip") -> None:
        self.ip = ip

    def _run(self, *args: str, check: bool = True) -> str:
        argv = [self.ip, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetError(f"{' '.join(argv)}: {exc}") from None
        if check and proc.returncode != 0:
            raise NetError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def _json(self, *args: str) -> List[Dict[str, Any]]:
        out = self._run("-j", *args)
        try:
            data = json.loads(out or "[]")
        except ValueError:
            raise NetError(f"ip -j {' '.join(args)}: not JSON") from None
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def interfaces(self) -> List[Dict[str, Any]]:
        return [interface_entry(link) for link in self._json("addr", "show")]

    def _addresses(self, name: str, version: int) -> List[str]:
        out = []
        for link in self._json(f"-{version}", "addr", "show", "dev", name):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global" and "local" in a:
                    out.append("{}/{}".format(a["local"], a["prefixlen"]))
        return out

    def _routes(self, name: str, version: int) -> List[Route]:
        routes = []
        for r in self._json(f"-{version}", "route", "show", "dev", name):
            if r.get("gateway"):
                routes.append(Route(str(r.get("dst", "default")), str(r["gateway"]), version))
        return routes

    def snapshot(self, name: str) -> Snapshot:
        return Snapshot(
            name,
            self._addresses(name, 4) + self._addresses(name, 6),
            self._routes(name, 4) + self._routes(name, 6),
        )

    def set_addresses(self, name: str, version: int, addresses: Sequence[str]) -> None:
        current = self._addresses(name, version)
        wanted = [str(ipaddress.ip_interface(a)) for a in addresses]
        for addr in current:
            if addr not in wanted:
                self._run("addr", "del", addr, "dev", name)
        for addr in wanted:
            if addr not in current:
                extra = ["broadcast", "+"] if version == 4 else []
                self._run("addr", "add", addr, *extra, "dev", name)
        self._run("link", "set", name, "up")

    def set_routes(
        self, name: str, version: int, gateway: Optional[str], routes: Sequence[Route]
    ) -> None:
        fam = f"-{version}"
        for old in self._routes(name, version):
            if old.to == "default" and old.via != gateway:
                self._run(fam, "route", "del", "default", "via", old.via, "dev", name, check=False)
        if gateway:
            self._run(fam, "route", "replace", "default", "via", gateway, "dev", name)
        for route in routes:
            self._run(fam, "route", "replace", route.to, "via", route.via, "dev", name)

    def gateway_reachable(self, name: str, gateway: str, timeout: float) -> bool:
        """The gateway answers ARP / neighbour discovery on ``name`` (an entry learnt after
        this call: the cache is flushed first, so an entry from the old site cannot count).
        Gateways that drop ICMP still answer this, and no ``ping`` binary is needed."""
        self._run("neigh", "flush", "to", gateway, "dev", name, check=False)
        deadline = time.monotonic() + timeout
        version = ipaddress.ip_address(gateway).version
        while True:
            try:
                with socket.socket(
                    socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM
                ) as sock:
                    sock.sendto(b"guestbus", (gateway, 9))  # any packet makes the kernel resolve it
            except OSError:
                pass
            for entry in self._json("neigh", "show", "to", gateway, "dev", name):
                state = entry.get("state", [])
                states = set(state if isinstance(state, list) else [state])
                if entry.get("lladdr") and states & NEIGH_OK:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


class Simulated(Backend):
    """Interfaces in memory: the dry-run renderer of lab agents (nothing on the host changes).
    ``reachable`` is the set of gateways that answer (None: every one does)."""

    kind = "simulated"

    def __init__(self, interfaces: Sequence[Dict[str, Any]], apply_delay: float = 0.0) -> None:
        self.nics: Dict[str, Dict[str, Any]] = {}
        for nic in interfaces:
            self.nics[str(nic["name"])] = {
                "name": str(nic["name"]),
                "mac": nic.get("mac"),
                "up": True,
                "addresses": list(nic.get("addresses", [])),
                "routes": [],
            }
        self.reachable: Optional[Set[str]] = None
        self.apply_delay = apply_delay
        self.changes = 0

    def _nic(self, name: str) -> Dict[str, Any]:
        if name not in self.nics:
            raise NetError(f"no interface {name}")
        return self.nics[name]

    def interfaces(self) -> List[Dict[str, Any]]:
        return [
            {"name": n["name"], "mac": n["mac"], "up": n["up"], "addresses": list(n["addresses"])}
            for n in self.nics.values()
        ]

    def snapshot(self, name: str) -> Snapshot:
        nic = self._nic(name)
        return Snapshot(name, list(nic["addresses"]), [Route(**r) for r in nic["routes"]])

    def set_addresses(self, name: str, version: int, addresses: Sequence[str]) -> None:
        nic = self._nic(name)
        if self.apply_delay:
            time.sleep(self.apply_delay)
        self.changes += 1
        kept = [a for a in nic["addresses"] if family_of(a) != version or not _is_global(a)]
        nic["addresses"] = kept + [str(ipaddress.ip_interface(a)) for a in addresses]

    def set_routes(
        self, name: str, version: int, gateway: Optional[str], routes: Sequence[Route]
    ) -> None:
        nic = self._nic(name)
        kept = [r for r in nic["routes"] if r["family"] != version]
        new = [{"to": "default", "via": gateway, "family": version}] if gateway else []
        new += [{"to": r.to, "via": r.via, "family": version} for r in routes]
        nic["routes"] = kept + new

    def gateway_reachable(self, name: str, gateway: str, timeout: float) -> bool:
        return self.reachable is None or gateway in self.reachable


# --- DNS ---------------------------------------------------------------------------------


def render_resolv_conf(
    old: str, nameservers: Sequence[str], search: Sequence[str], note: str
) -> str:
    """``resolv.conf`` with new servers and search list; ``options`` and other lines kept."""
    kept = [
        line
        for line in old.splitlines()
        if line.strip()
        and not line.lstrip().startswith(("#", ";", "nameserver", "search", "domain"))
    ]
    out = [f"# {note}"]
    if search:
        out.append("search " + " ".join(search))
    out += ["nameserver " + ns for ns in nameservers]
    return "\n".join(out + kept) + "\n"


def write_resolv_conf(path: Path, text: str) -> None:
    """Atomically where possible; in place where the file is a mount point (a container's or
    ``ip netns exec``'s bind mount cannot be renamed over)."""
    try:
        atomic_write(path, text.encode("utf-8"), 0o644)
    except OSError:
        with open(str(path), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


# --- persistence: renderers ----------------------------------------------------------------


@dataclass
class Persist:
    """One interface's new configuration, as the renderers need it."""

    name: str
    mac: Optional[str]
    addresses: List[str]
    versions: Set[int]
    gateways: List[str] = field(default_factory=list)
    routes: List[Route] = field(default_factory=list)
    dns: List[str] = field(default_factory=list)
    search: List[str] = field(default_factory=list)


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


_YAML_KEY = re.compile(r"^(\s*)(\"[^\"]*\"|'[^']*'|[^\s:#'\"][^:#]*?)\s*:(\s.*|)$")
_SECTIONS = ("ethernets", "vlans", "bonds", "bridges", "wifis")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def netplan_remove(text: str, name: str, mac: Optional[str]) -> Tuple[str, bool]:
    """Remove the definition of interface ``name`` (or the one matching ``mac``) from the
    device sections of a netplan file written in block style. Returns the new text and
    whether anything was removed. Flow-style sections raise NetError (left to a person)."""
    lines = text.splitlines(keepends=True)
    out: List[str] = []
    removed = False
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _YAML_KEY.match(line.rstrip("\n"))
        if not (m and m.group(2).strip("\"'") in _SECTIONS):
            out.append(line)
            i += 1
            continue
        rest = m.group(3).split("#", 1)[0].strip()
        if rest:
            if name in rest or (mac and mac.lower() in rest.lower()):
                raise NetError(
                    f"the {m.group(2)} section is written in flow style; edit it by hand"
                )
            out.append(line)
            i += 1
            continue
        section_indent = _indent(line)
        j = i + 1
        children: List[Tuple[int, int]] = []  # (start, end) of each child block
        child_indent: Optional[int] = None
        while j < len(lines) and (_blank(lines[j]) or _indent(lines[j]) > section_indent):
            if not _blank(lines[j]):
                if child_indent is None:
                    child_indent = _indent(lines[j])
                if _indent(lines[j]) == child_indent:
                    children.append((j, j + 1))
                elif children:
                    children[-1] = (children[-1][0], j + 1)
            j += 1
        kept_children = []
        for start, end in children:
            key = _YAML_KEY.match(lines[start].rstrip("\n"))
            child = key.group(2).strip("\"'") if key else ""
            block = "".join(lines[start:end]).lower()
            by_mac = bool(mac) and re.search(
                r"macaddress\s*:\s*[\"']?" + re.escape((mac or "").lower()), block
            )
            if child == name or by_mac:
                removed = True
            else:
                kept_children.append((start, end))
        if kept_children or not children:
            out.append(line)
            for start, end in kept_children:
                out.extend(lines[start:end])
        else:
            out.append(" " * section_indent + f"{m.group(2)}: {{}}\n")
        i = j
    return "".join(out), removed


def render_netplan(p: Persist, note: str) -> str:
    lines = [f"# {note}", "network:", "  version: 2", "  ethernets:", f"    {p.name}:"]
    if p.mac:
        lines += ["      match:", f"        macaddress: {_q(p.mac.lower())}"]
        lines.append(f"      set-name: {_q(p.name)}")
    if 4 in p.versions:
        lines.append("      dhcp4: false")
    if 6 in p.versions:
        lines += ["      dhcp6: false", "      accept-ra: false"]
    lines.append("      addresses:")
    lines += [f"        - {_q(a)}" for a in p.addresses]
    routes = [("0.0.0.0/0" if family_of(g + "/0") == 4 else "::/0", g) for g in p.gateways]
    routes += [(r.to, r.via) for r in p.routes]
    if routes:
        lines.append("      routes:")
        for to, via in routes:
            lines += [f"        - to: {_q(to)}", f"          via: {_q(via)}"]
    if p.dns or p.search:
        lines.append("      nameservers:")
        if p.dns:
            lines.append("        addresses: [" + ", ".join(_q(d) for d in p.dns) + "]")
        if p.search:
            lines.append("        search: [" + ", ".join(_q(s) for s in p.search) + "]")
    return "\n".join(lines) + "\n"


def _nm_parser() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


def nm_profile_matches(text: str, name: str, mac: Optional[str]) -> bool:
    parser = _nm_parser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return False
    if parser.get("connection", "interface-name", fallback=None) == name:
        return True
    found = parser.get("ethernet", "mac-address", fallback="") or ""
    return bool(mac) and found.lower() == (mac or "").lower()


def render_nm(p: Persist, existing: Optional[str], note: str) -> str:
    """A NetworkManager keyfile: ``existing`` (the profile that manages the interface) with
    the changed families rewritten, or a new profile."""
    parser = _nm_parser()
    if existing:
        parser.read_string(existing)
    else:
        seed = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"guestbus-dr:{p.name}:{p.mac}"))
        parser.read_dict(
            {
                "connection": {
                    "id": f"guestbus-dr-{p.name}",
                    "uuid": seed,
                    "type": "ethernet",
                    "interface-name": p.name,
                },
                "ipv4": {"method": "auto"},
                "ipv6": {"method": "auto"},
            }
        )
        if p.mac:
            parser.read_dict({"ethernet": {"mac-address": p.mac.upper()}})
    parser.set("connection", "autoconnect", "true")
    parser.set("connection", "autoconnect-priority", "999")
    dns_done = False
    for version in (4, 6):
        if version not in p.versions:
            continue
        section = f"ipv{version}"
        if parser.has_section(section):
            parser.remove_section(section)
        parser.add_section(section)
        parser.set(section, "method", "manual")
        addrs = [a for a in p.addresses if family_of(a) == version]
        for k, addr in enumerate(addrs, 1):
            parser.set(section, f"address{k}", addr)
        gw = next((g for g in p.gateways if family_of(g + "/0") == version), None)
        if gw:
            parser.set(section, "gateway", gw)
        for k, route in enumerate([r for r in p.routes if r.family == version], 1):
            parser.set(section, f"route{k}", f"{route.to},{route.via}")
        dns = [d for d in p.dns if family_of(d + "/0") == version]
        if dns:
            parser.set(section, "dns", ";".join(dns) + ";")
            parser.set(section, "ignore-auto-dns", "true")
        if p.search and not dns_done:
            parser.set(section, "dns-search", ";".join(p.search) + ";")
            dns_done = True
    buf = io.StringIO()
    parser.write(buf, space_around_delimiters=False)
    return f"# {note}\n" + buf.getvalue()


_IFUP_KEYWORDS = ("iface", "auto", "allow-", "mapping", "source", "source-directory", "rename")


def _ifup_keyword(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#") and s.split()[0].startswith(_IFUP_KEYWORDS)


def render_ifupdown_stanza(p: Persist, version: int) -> List[str]:
    fam = "inet" if version == 4 else "inet6"
    addrs = [a for a in p.addresses if family_of(a) == version]
    lines = [f"iface {p.name} {fam} static", f"    address {addrs[0]}"]
    gw = next((g for g in p.gateways if family_of(g + "/0") == version), None)
    if gw:
        lines.append(f"    gateway {gw}")
    for extra in addrs[1:]:
        lines.append(f"    up ip -{version} addr add {extra} dev {p.name}")
    for route in [r for r in p.routes if r.family == version]:
        lines.append(f"    up ip -{version} route replace {route.to} via {route.via} dev {p.name}")
    if version == min(p.versions) and p.dns:
        lines.append("    dns-nameservers " + " ".join(p.dns))
    if version == min(p.versions) and p.search:
        lines.append("    dns-search " + " ".join(p.search))
    return lines


def ifupdown_replace(text: str, p: Persist) -> Tuple[str, bool]:
    """Replace the ``iface <name> inet[6] …`` stanzas of the changed families in one
    interfaces(5) file. Returns the new text and whether this file defined the interface."""
    lines = text.splitlines()
    out: List[str] = []
    found = False
    written: Set[int] = set()
    i = 0
    while i < len(lines):
        parts = lines[i].split()
        if len(parts) >= 3 and parts[0] == "iface" and parts[1] == p.name:
            found = True
            version = 6 if parts[2] == "inet6" else 4
            j = i + 1
            while j < len(lines) and not _ifup_keyword(lines[j]):
                j += 1
            if version in p.versions:
                out += render_ifupdown_stanza(p, version)
                written.add(version)
            else:
                out += lines[i:j]
            i = j
            continue
        out.append(lines[i])
        i += 1
    if found:
        for version in sorted(p.versions - written):
            out += ["", *render_ifupdown_stanza(p, version)]
    return "\n".join(out) + "\n", found


def ifupdown_defines(text: str, name: str) -> bool:
    return any(
        len(parts) >= 2 and parts[0] == "iface" and parts[1] == name
        for parts in (line.split() for line in text.splitlines())
    )


# --- persistence: choosing the stack -------------------------------------------------------


class Stacks:
    """The guest's network configuration files under ``root`` (``/`` in a guest)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.netplan = root / "etc/netplan"
        self.nm = root / "etc/NetworkManager/system-connections"
        self.interfaces = root / "etc/network/interfaces"
        self.interfaces_d = root / "etc/network/interfaces.d"
        self.cloud_cfg_d = root / "etc/cloud/cloud.cfg.d"

    def detected(self) -> List[str]:
        found = []
        if self.netplan.is_dir() and any(self.netplan.glob("*.yaml")):
            found.append("netplan")
        if (self.root / "etc/NetworkManager").is_dir():
            found.append("networkmanager")
        if self.interfaces.is_file():
            found.append("ifupdown")
        return found

    def _ifupdown_files(self) -> List[Path]:
        files = [self.interfaces] if self.interfaces.is_file() else []
        if self.interfaces_d.is_dir():
            files += sorted(p for p in self.interfaces_d.iterdir() if p.is_file())
        return files

    def _ifupdown_owner(self, name: str) -> Optional[Path]:
        for path in self._ifupdown_files():
            try:
                if ifupdown_defines(path.read_text(encoding="utf-8"), name):
                    return path
            except OSError:
                continue
        return None

    def choose(self, name: str) -> Optional[str]:
        """netplan when the guest uses it (it renders for networkd and NetworkManager alike),
        else ifupdown if it defines the interface, else NetworkManager, else ifupdown."""
        found = self.detected()
        if "netplan" in found:
            return "netplan"
        if "ifupdown" in found and self._ifupdown_owner(name) is not None:
            return "ifupdown"
        if "networkmanager" in found:
            return "networkmanager"
        if "ifupdown" in found:
            return "ifupdown"
        return None

    @staticmethod
    def _backup(path: Path) -> None:
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if not backup.exists():  # keep the original, from before any DR change
            atomic_write(backup, path.read_bytes(), 0o600)

    def persist(self, p: Persist, note: str) -> Tuple[List[str], List[str]]:
        """Write ``p`` through the chosen stack; (files written, warnings)."""
        stack = self.choose(p.name)
        if stack is None:
            return [], [f"{p.name}: no netplan, NetworkManager or ifupdown found: not persisted"]
        if stack == "netplan":
            return self._netplan(p, note)
        if stack == "networkmanager":
            return self._nm(p, note)
        return self._ifupdown(p, note)

    def _netplan(self, p: Persist, note: str) -> Tuple[List[str], List[str]]:
        ours = self.netplan / NETPLAN_FILE.format(name=p.name)
        written, warnings = [], []
        for path in sorted(self.netplan.glob("*.yaml")):
            if path == ours:
                continue
            text = path.read_text(encoding="utf-8")
            try:
                new, removed = netplan_remove(text, p.name, p.mac)
            except NetError as exc:
                warnings.append(f"netplan {path}: {exc}; it may still configure {p.name}")
                continue
            if removed:
                self._backup(path)
                atomic_write(path, new.encode("utf-8"), 0o600)
                written.append(f"netplan: {path} ({p.name} removed)")
        atomic_write(ours, render_netplan(p, note).encode("utf-8"), 0o600)
        written.append(f"netplan: {ours}")
        if (self.root / "etc/cloud").is_dir():
            # cloud-init would write its own network config again at the next boot
            cfg = self.cloud_cfg_d / "99-guestbus-dr-network.cfg"
            atomic_write(cfg, b"network: {config: disabled}\n", 0o644)
            written.append(f"cloud-init: {cfg}")
        return written, warnings

    def _nm(self, p: Persist, note: str) -> Tuple[List[str], List[str]]:
        self.nm.mkdir(parents=True, exist_ok=True)
        target: Optional[Path] = None
        existing: Optional[str] = None
        for path in sorted(self.nm.glob("*.nmconnection")):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                continue
            if nm_profile_matches(text, p.name, p.mac):
                target, existing = path, text
                break
        if target is None:
            target = self.nm / NM_FILE.format(name=p.name)
        else:
            self._backup(target)
        atomic_write(target, render_nm(p, existing, note).encode("utf-8"), 0o600)
        return [f"networkmanager: {target}"], []

    def _ifupdown(self, p: Persist, note: str) -> Tuple[List[str], List[str]]:
        owner = self._ifupdown_owner(p.name)
        if owner is not None:
            text = owner.read_text(encoding="utf-8")
            new, _ = ifupdown_replace(text, p)
            self._backup(owner)
            atomic_write(owner, new.encode("utf-8"), 0o644)
            return [f"ifupdown: {owner}"], []
        stanzas = [f"# {note}", f"auto {p.name}"]
        for version in sorted(p.versions):
            stanzas += render_ifupdown_stanza(p, version)
        text = self.interfaces.read_text(encoding="utf-8") if self.interfaces.is_file() else ""
        if self.interfaces.is_file():
            self._backup(self.interfaces)
        body = text.rstrip("\n") + "\n\n" + "\n".join(stanzas) + "\n"
        atomic_write(self.interfaces, body.encode("utf-8"), 0o644)
        return [f"ifupdown: {self.interfaces}"], []
