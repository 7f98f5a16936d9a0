"""DR plans: the rules a plan must follow, and the addresses it gives one VM.

:func:`check_plan` finds every problem of a plan at once (a person fixes them in one go) and
the warnings worth reading; :func:`target_for` computes what one VM becomes in a run from
the interfaces its agent reports: ordered rules (first match wins), the host offset kept
(10.0.0.17 in 10.0.0.0/24 → 10.9.0.17 in 10.9.0.0/24, across prefix lengths as long as the
offset fits), per-VM custom addresses over the rules, separate rules for tests.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from guestbus.contract import (
    DrAddresses,
    DrInterfaceTarget,
    DrMapping,
    DrPlan,
    DrRoute,
    DrRunKind,
    DrTarget,
    DrVmOverride,
    Interface,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IfAddress = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class MappingError(Exception):
    """This VM cannot be given addresses by the plan; the message says why."""


def is_uuid(ref: str) -> bool:
    return bool(_UUID.match(ref))


def family(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


# --- parsing ------------------------------------------------------------------------------


def parse_network(text: str, where: str, problems: list[str]) -> Network | None:
    if "/" not in text:
        problems.append(f"{where}: {text!r} needs a prefix length, e.g. {text}/24")
        return None
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(f"{where}: {text!r} is not a network in CIDR notation ({exc})")
            return None
        problems.append(f"{where}: {text!r} has host bits set; did you mean {loose}?")
        return None
    if net.is_loopback or net.is_link_local or net.is_multicast or net.is_unspecified:
        problems.append(f"{where}: {text} is a loopback, link-local or multicast network")
        return None
    return net


def parse_ip(text: str, where: str, problems: list[str]) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        problems.append(f"{where}: {text!r} is not an IP address")
        return None


def parse_interface_address(text: str, where: str, problems: list[str]) -> IfAddress | None:
    if "/" not in text:
        problems.append(f"{where}: {text!r} needs a prefix length, e.g. {text}/24")
        return None
    try:
        addr = ipaddress.ip_interface(text)
    except ValueError:
        problems.append(f"{where}: {text!r} is not an address with a prefix (e.g. 10.9.0.5/24)")
        return None
    reason = reserved_in(addr.ip, addr.network)
    if reason:
        problems.append(f"{where}: {text} is {reason}")
        return None
    return addr


def reserved_in(ip: Address, net: Network) -> str | None:
    """Why ``ip`` cannot be a host address in ``net`` (None when it can)."""
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return "a loopback, link-local, multicast or unspecified address"
    if net.version == 4 and net.prefixlen <= 30:
        if ip == net.network_address:
            return f"the network address of {net}"
        if ip == net.broadcast_address:
            return f"the broadcast address of {net}"
    return None


def _check_dns(values: Iterable[str], where: str, problems: list[str]) -> None:
    for i, value in enumerate(values):
        parse_ip(value, f"{where}[{i}]", problems)


def _check_search(values: Iterable[str], where: str, problems: list[str]) -> None:
    for i, value in enumerate(values):
        name = value.rstrip(".")
        if not name or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
            problems.append(f"{where}[{i}]: {value!r} is not a domain name")


# --- checking a plan ----------------------------------------------------------------------


@dataclass
class Rule:
    """A validated mapping rule."""

    index: int
    source: Network
    target: Network
    mapping: DrMapping

    def image(self, ip: Address) -> Address:
        return self.target.network_address + (int(ip) - int(self.source.network_address))


def _check_rule(m: DrMapping, where: str, problems: list[str]) -> Rule | None:
    before = len(problems)
    source = parse_network(m.source, f"{where}.source", problems)
    target = parse_network(m.target, f"{where}.target", problems)
    if source is not None and target is not None and source.version != target.version:
        problems.append(
            f"{where}: source {source} is {family(source.version)} but target {target} is "
            f"{family(target.version)}; a rule maps within one family"
        )
        target = None
    if m.gateway is not None:
        gw = parse_ip(m.gateway, f"{where}.gateway", problems)
        if gw is not None and target is not None:
            if gw.version != target.version or gw not in target:
                problems.append(f"{where}.gateway: {gw} is not inside the target {target}")
            elif reason := reserved_in(gw, target):
                problems.append(f"{where}.gateway: {gw} is {reason}")
    _check_dns(m.dns, f"{where}.dns", problems)
    _check_search(m.search, f"{where}.search", problems)
    for j, route in enumerate(m.routes):
        parse_network(route.to, f"{where}.routes[{j}].to", problems)
        via = parse_ip(route.via, f"{where}.routes[{j}].via", problems)
        if (
            via is not None
            and target is not None
            and (via.version != target.version or via not in target)
        ):
            problems.append(
                f"{where}.routes[{j}].via: {via} is not inside the target {target} "
                "(a next hop must be on the new network)"
            )
    if len(problems) != before or source is None or target is None:
        return None
    return Rule(0, source, target, m)


def check_rules(mappings: Sequence[DrMapping], what: str, problems: list[str]) -> list[Rule]:
    """Validate ordered rules; refuse rules that can never match and targets that collide."""
    rules: list[Rule] = []
    for i, m in enumerate(mappings):
        rule = _check_rule(m, f"{what}[{i}]", problems)
        if rule is not None:
            rule.index = i
            rules.append(rule)
    for a_pos, a in enumerate(rules):
        for b in rules[a_pos + 1 :]:
            if a.source.version != b.source.version:
                continue
            if b.source.subnet_of(a.source):  # type: ignore[arg-type]
                problems.append(
                    f"{what}[{b.index}].source {b.source} lies inside {what}[{a.index}].source "
                    f"{a.source}, which comes first: it can never match (put the more specific "
                    "rule first)"
                )
                continue
            if not a.target.overlaps(b.target):
                continue
            # A specific rule before a broader one may re-state what the broader one would
            # give its subnet (to set another gateway or DNS there): then they agree.
            consistent = (
                a.source.subnet_of(b.source)  # type: ignore[arg-type]
                and a.source.prefixlen == a.target.prefixlen
                and b.image(a.source.network_address) == a.target.network_address
            )
            if not consistent:
                problems.append(
                    f"{what}[{a.index}].target {a.target} and {what}[{b.index}].target "
                    f"{b.target} overlap: two VMs could be given the same address"
                )
    return rules


@dataclass
class PlanCheck:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vms: int = 0


def check_plan(plan: DrPlan) -> PlanCheck:
    """Every problem of ``plan`` (empty: valid) and warnings."""
    out = PlanCheck()
    problems, warnings = out.problems, out.warnings
    rules = check_rules(plan.mappings, "mappings", problems)
    test_rules = check_rules(plan.test_mappings, "test_mappings", problems)

    seen: dict[str, str] = {}
    for g, group in enumerate(plan.groups):
        if not group:
            problems.append(f"groups[{g}]: empty group")
        for i, ref in enumerate(group):
            key = ref.lower() if is_uuid(ref) else ref
            if key in seen:
                problems.append(f"groups[{g}][{i}]: VM {ref!r} is already in {seen[key]}")
            else:
                seen[key] = f"groups[{g}]"
    out.vms = len(seen)

    overridden: set[str] = set()
    taken: dict[str, str] = {}
    for i, vm in enumerate(plan.vms):
        where = f"vms[{i}]"
        key = vm.vm.lower() if is_uuid(vm.vm) else vm.vm
        if key in overridden:
            problems.append(f"{where}: VM {vm.vm!r} has overrides twice")
        overridden.add(key)
        # by uuid here and by name in a group (or the other way round): only the registry
        # can tell, so the run start checks it (orphan_overrides)
        decidable = all(is_uuid(ref) == is_uuid(vm.vm) for ref in seen)
        if key not in seen and decidable:
            problems.append(f"{where}: VM {vm.vm!r} has overrides but is in no group")
        if vm.interface is not None and not vm.interface.strip():
            problems.append(f"{where}.interface: empty")
        for label, block, covering in (("", vm, rules), (".test", vm.test, test_rules)):
            if block is None:
                continue
            addrs = _check_addresses(block, f"{where}{label}", problems)
            for addr in addrs:
                other = taken.get(str(addr.ip))
                if other is not None and other != f"{vm.vm}{label}":
                    problems.append(f"{where}{label}.addresses: {addr.ip} is also given to {other}")
                taken[str(addr.ip)] = f"{vm.vm}{label}"
            if (
                addrs
                and block.gateway is None
                and not any(
                    any(a.ip in r.target for r in covering if r.mapping.gateway) for a in addrs
                )
            ):
                warnings.append(
                    f"{where}{label}: no gateway given and no rule's target covers its "
                    "addresses: the VM gets no default route"
                )

    t = plan.timeouts
    if t.gateway and t.gateway >= t.apply:
        problems.append(
            f"timeouts.gateway ({t.gateway:g} s) must be shorter than timeouts.apply "
            f"({t.apply:g} s): the agent checks the gateway within the apply time"
        )
    if not plan.mappings and not any(vm.addresses for vm in plan.vms):
        warnings.append("no mappings and no custom addresses: a failover changes nothing")
    if not plan.test_mappings:
        untested = out.vms - sum(1 for vm in plan.vms if vm.test and vm.test.addresses)
        if untested:
            warnings.append(
                f"no test_mappings: a test run fails for the {untested} VM(s) without custom "
                "test addresses (a test never reuses production addresses)"
            )
    return out


def _check_addresses(block: DrAddresses, where: str, problems: list[str]) -> list[IfAddress]:
    addrs: list[IfAddress] = []
    for j, text in enumerate(block.addresses):
        addr = parse_interface_address(text, f"{where}.addresses[{j}]", problems)
        if addr is not None:
            addrs.append(addr)
    if block.gateway is not None:
        gw = parse_ip(block.gateway, f"{where}.gateway", problems)
        if gw is not None and addrs and not any(gw in a.network for a in addrs):
            problems.append(f"{where}.gateway: {gw} is not inside any of its addresses' networks")
        if gw is not None and not addrs:
            problems.append(f"{where}.gateway: given without addresses")
    _check_dns(block.dns or [], f"{where}.dns", problems)
    _check_search(block.search or [], f"{where}.search", problems)
    return addrs


# --- one VM's target ----------------------------------------------------------------------


def orphan_overrides(plan: DrPlan, groups: list[list[str]], names: dict[str, str]) -> list[str]:
    """Overrides that match no VM of the resolved ``groups`` (uuids; ``names`` by uuid)."""
    return [
        f"vms[{i}]: VM {item.vm!r} has overrides but is in no group"
        for i, item in enumerate(plan.vms)
        if not any(override_for(plan, vm, names.get(vm)) is item for g in groups for vm in g)
    ]


def override_for(plan: DrPlan, vm: str, name: str | None) -> DrVmOverride | None:
    for item in plan.vms:
        ref = item.vm
        if (is_uuid(ref) and ref.lower() == vm) or (name is not None and ref == name):
            return item
    return None


def _global(text: str) -> IfAddress | None:
    try:
        addr = ipaddress.ip_interface(text)
    except ValueError:
        return None
    ip = addr.ip
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return addr


@dataclass
class _Nic:
    iface: Interface
    old: list[IfAddress]
    new: list[IfAddress] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)  # families changed
    rules: list[tuple[int, DrMapping]] = field(default_factory=list)  # (family, rule)
    gateway: dict[int, str] = field(default_factory=dict)
    unmatched: list[IfAddress] = field(default_factory=list)
    custom: set[int] = field(default_factory=set)  # families replaced by custom addresses

    @property
    def label(self) -> str:
        return self.iface.name or self.iface.mac or "?"


def _find_nic(nics: list[_Nic], ref: str) -> _Nic | None:
    if _MAC.match(ref):
        return next((n for n in nics if (n.iface.mac or "").lower() == ref.lower()), None)
    return next((n for n in nics if n.iface.name == ref), None)


def _add_unique(out: list[str], values: Iterable[str]) -> None:
    for value in values:
        if value not in out:
            out.append(value)


def target_for(
    plan: DrPlan,
    kind: DrRunKind,
    vm: str,
    name: str | None,
    interfaces: Sequence[Interface],
) -> DrTarget:
    """What ``vm`` becomes in a ``kind`` run, from the interfaces its agent reported.

    Raises :class:`MappingError` when the plan gives it nothing, or an address would not
    fit its target network."""
    problems: list[str] = []
    rules = check_rules(
        plan.test_mappings if kind is DrRunKind.TEST else plan.mappings, "mappings", problems
    )
    if problems:  # the plan was checked when stored; this is a safety net
        raise MappingError("the plan's rules are invalid: " + "; ".join(problems))
    override = override_for(plan, vm, name)
    custom: DrAddresses | None = override
    if kind is DrRunKind.TEST:
        custom = override.test if override is not None else None
    if custom is not None and not custom.addresses:
        custom = None

    nics = [
        _Nic(iface, [a for a in (_global(t) for t in iface.addresses) if a is not None])
        for iface in interfaces
        if iface.name != "lo"
    ]
    notes: list[str] = []
    for nic in nics:
        for addr in nic.old:
            rule = next((r for r in rules if addr.ip in r.source), None)
            if rule is None:
                nic.unmatched.append(addr)
                continue
            new_ip = rule.image(addr.ip)
            if new_ip not in rule.target:
                offset = int(addr.ip) - int(rule.source.network_address)
                raise MappingError(
                    f"{nic.label} {addr}: host offset {offset} does not fit in the target "
                    f"{rule.target} of rule {rule.index} "
                    f"({rule.source} → {rule.target})"
                )
            reason = reserved_in(new_ip, rule.target)
            if reason:
                raise MappingError(f"{nic.label} {addr} would become {new_ip}, {reason}")
            nic.new.append(ipaddress.ip_interface(f"{new_ip}/{rule.target.prefixlen}"))
            nic.touched.add(addr.version)
            if (addr.version, rule.mapping) not in nic.rules:
                nic.rules.append((addr.version, rule.mapping))
            if rule.mapping.gateway and addr.version not in nic.gateway:
                nic.gateway[addr.version] = rule.mapping.gateway

    dns: list[str] = []
    search: list[str] = []
    if custom is not None:
        assert override is not None
        custom_addrs = [ipaddress.ip_interface(a) for a in custom.addresses]
        if override.interface:
            chosen = _find_nic(nics, override.interface)
            if chosen is None:
                raise MappingError(
                    f"the plan puts its custom addresses on {override.interface!r}, but the VM "
                    f"has no such interface (it has {', '.join(n.label for n in nics) or 'none'})"
                )
        else:
            chosen = next((n for n in nics if n.touched), None) or next(
                (n for n in nics if n.old), None
            )
            if chosen is None:
                raise MappingError("the VM reports no interface with an address to replace")
        families = {a.version for a in custom_addrs}
        chosen.new = [a for a in chosen.new if a.version not in families] + custom_addrs
        chosen.touched |= families
        chosen.custom |= families
        for version in families:
            chosen.gateway.pop(version, None)
        covering = [r.mapping for r in rules if any(a.ip in r.target for a in custom_addrs)]
        if custom.gateway:
            chosen.gateway[ipaddress.ip_address(custom.gateway).version] = custom.gateway
        else:
            for m in covering:
                if m.gateway:
                    chosen.gateway.setdefault(ipaddress.ip_address(m.gateway).version, m.gateway)
        if custom.dns is not None:
            _add_unique(dns, custom.dns)
        if custom.search is not None:
            _add_unique(search, custom.search)
        # the rules the custom addresses replace no longer give this family anything
        chosen.rules = [(v, m) for v, m in chosen.rules if v not in families]
        for m in covering:
            version = ipaddress.ip_network(m.target).version
            if (version, m) not in chosen.rules:
                chosen.rules.append((version, m))

    changed = [n for n in nics if n.touched]
    if not changed:
        have = "; ".join(f"{n.label} {', '.join(map(str, n.old))}" for n in nics if n.old)
        raise MappingError(
            f"no {'test ' if kind is DrRunKind.TEST else ''}mapping rule matches any of its "
            f"addresses ({have or 'it reports none'}) and the plan has no custom "
            f"{'test ' if kind is DrRunKind.TEST else ''}addresses for it"
        )
    for nic in nics:
        for addr in nic.unmatched:
            if addr.version in nic.custom:
                continue
            if addr.version in nic.touched:
                nic.new.append(addr)  # same family as a changed address, no rule: kept
                notes.append(f"{nic.label} {addr}: no rule matches; kept")
            else:
                notes.append(f"{nic.label} {addr}: no rule matches; unchanged")

    targets: list[DrInterfaceTarget] = []
    default_taken: set[int] = set()
    for nic in changed:
        gateways = []
        for fam in sorted(nic.gateway):
            if fam in default_taken:
                notes.append(
                    f"{nic.label}: gateway {nic.gateway[fam]} not used (one default route per "
                    f"family; {family(fam)} already has one)"
                )
                continue
            default_taken.add(fam)
            gateways.append(nic.gateway[fam])
        routes: list[DrRoute] = []
        for _, m in nic.rules:
            if custom is None or custom.dns is None:
                _add_unique(dns, m.dns)
            if custom is None or custom.search is None:
                _add_unique(search, m.search)
            for route in m.routes:
                if route not in routes:
                    routes.append(route)
        new_unique: list[str] = []
        _add_unique(new_unique, (str(a) for a in nic.new))
        targets.append(
            DrInterfaceTarget(
                name=nic.iface.name,
                mac=nic.iface.mac,
                addresses=new_unique,
                previous=[str(a) for a in nic.old if a.version in nic.touched],
                gateways=gateways,
                routes=routes,
            )
        )
    return DrTarget(interfaces=targets, dns=dns, search=search, notes=notes)


def target_addresses(target: DrTarget) -> list[str]:
    """Every address (without prefix) the target gives, for conflict checks."""
    return [str(ipaddress.ip_interface(a).ip) for i in target.interfaces for a in i.addresses]
