"""Plan rules and address mapping: pure functions, no bus."""

from __future__ import annotations

from typing import Any

import pytest

from guestbus.contract import DrPlan, DrRunKind, Interface
from guestbus.dr.plan import MappingError, check_plan, orphan_overrides, target_for

VM = "5b0c1e2a-1111-4222-8333-944455556666"


def make(**fields: Any) -> DrPlan:
    return DrPlan.model_validate({"name": "p", "groups": [[VM]], **fields})


def nic(*addresses: str, name: str = "eth0", mac: str = "52:54:00:aa:bb:cc") -> Interface:
    return Interface(name=name, mac=mac, addresses=list(addresses))


def problems(**fields: Any) -> list[str]:
    return check_plan(make(**fields)).problems


def test_first_matching_rule_wins_and_a_specific_rule_may_come_first() -> None:
    plan = make(
        mappings=[
            {"source": "10.0.5.0/24", "target": "10.9.5.0/24", "gateway": "10.9.5.254"},
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16", "gateway": "10.9.0.1"},
        ]
    )
    assert check_plan(plan).problems == []
    special = target_for(plan, DrRunKind.FAILOVER, VM, None, [nic("10.0.5.17/24")])
    assert special.interfaces[0].addresses == ["10.9.5.17/24"]
    assert special.interfaces[0].gateways == ["10.9.5.254"]
    general = target_for(plan, DrRunKind.FAILOVER, VM, None, [nic("10.0.7.17/16")])
    assert general.interfaces[0].addresses == ["10.9.7.17/16"]
    assert general.interfaces[0].gateways == ["10.9.0.1"]
    assert general.interfaces[0].previous == ["10.0.7.17/16"]


def test_a_rule_behind_a_broader_one_never_matches_and_is_refused() -> None:
    found = problems(
        mappings=[
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16"},
            {"source": "10.0.5.0/24", "target": "10.8.5.0/24"},
        ]
    )
    assert found == [
        "mappings[1].source 10.0.5.0/24 lies inside mappings[0].source 10.0.0.0/16, which comes "
        "first: it can never match (put the more specific rule first)"
    ]


def test_overlapping_targets_are_refused_unless_the_rules_agree() -> None:
    clash = problems(
        mappings=[
            {"source": "10.0.0.0/24", "target": "10.9.0.0/24"},
            {"source": "10.1.0.0/24", "target": "10.9.0.0/25"},
        ]
    )
    assert any("overlap: two VMs could be given the same address" in p for p in clash)
    # a specific rule that re-states the broader rule's image (another gateway) is fine
    assert (
        problems(
            mappings=[
                {"source": "10.0.5.0/24", "target": "10.9.5.0/24", "gateway": "10.9.5.254"},
                {"source": "10.0.0.0/16", "target": "10.9.0.0/16"},
            ]
        )
        == []
    )
    # ...but one that sends the subnet elsewhere inside the broad target collides
    assert problems(
        mappings=[
            {"source": "10.0.5.0/24", "target": "10.9.6.0/24"},
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16"},
        ]
    )


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ({"source": "10.0.0.0", "target": "10.9.0.0/24"}, "needs a prefix length"),
        ({"source": "10.0.0.0/33", "target": "10.9.0.0/24"}, "is not a network"),
        ({"source": "10.0.0.1/24", "target": "10.9.0.0/24"}, "did you mean 10.0.0.0/24"),
        ({"source": "10.0.0.0/24", "target": "fd00::/64"}, "a rule maps within one family"),
        ({"source": "127.0.0.0/8", "target": "10.9.0.0/8"}, "loopback, link-local"),
        ({"source": "10.0.0.0/24", "target": "10.9.0.0/24", "gateway": "10.8.0.1"}, "not inside"),
        ({"source": "10.0.0.0/24", "target": "10.9.0.0/24", "gateway": "10.9.0.255"}, "broadcast"),
        ({"source": "10.0.0.0/24", "target": "10.9.0.0/24", "dns": ["dns.local"]}, "not an IP"),
        ({"source": "10.0.0.0/24", "target": "10.9.0.0/24", "search": ["-bad-"]}, "domain name"),
        (
            {"source": "10.0.0.0/24", "target": "10.9.0.0/24",
             "routes": [{"to": "172.16.0.0/12", "via": "10.8.0.1"}]},
            "a next hop must be on the new network",
        ),
    ],
)  # fmt: skip
def test_invalid_rules_are_refused_with_the_field_named(
    rule: dict[str, Any], fragment: str
) -> None:
    found = problems(mappings=[rule])
    assert found and found[0].startswith("mappings[0]") and fragment in found[0], found


def test_offset_mapping_across_prefix_lengths() -> None:
    wider = make(mappings=[{"source": "10.0.0.0/24", "target": "172.16.0.0/16"}])
    got = target_for(wider, DrRunKind.FAILOVER, VM, None, [nic("10.0.0.200/24")])
    assert got.interfaces[0].addresses == ["172.16.0.200/16"]
    narrower = make(mappings=[{"source": "10.0.0.0/16", "target": "10.9.0.0/24"}])
    fits = target_for(narrower, DrRunKind.FAILOVER, VM, None, [nic("10.0.0.17/16")])
    assert fits.interfaces[0].addresses == ["10.9.0.17/24"]
    with pytest.raises(
        MappingError, match=r"host offset 273 does not fit in the target 10\.9\.0\.0/24"
    ):
        target_for(narrower, DrRunKind.FAILOVER, VM, None, [nic("10.0.1.17/16")])
    with pytest.raises(MappingError, match=r"broadcast address of 10\.9\.0\.0/24"):
        target_for(narrower, DrRunKind.FAILOVER, VM, None, [nic("10.0.0.255/16")])


def test_ipv6_is_mapped_and_link_local_addresses_are_left_alone() -> None:
    plan = make(
        mappings=[
            {"source": "10.0.0.0/16", "target": "10.9.0.0/16", "gateway": "10.9.0.1"},
            {"source": "fd00:1::/64", "target": "fd09:1::/64", "gateway": "fd09:1::1"},
        ]
    )
    got = target_for(
        plan, DrRunKind.FAILOVER, VM, None,
        [nic("10.0.3.4/16", "fd00:1::abcd/64", "fe80::5054:ff:feaa:bbcc/64")],
    )  # fmt: skip
    assert got.interfaces[0].addresses == ["10.9.3.4/16", "fd09:1::abcd/64"]
    assert got.interfaces[0].gateways == ["10.9.0.1", "fd09:1::1"]
    assert "fe80" not in " ".join(got.interfaces[0].previous)


def test_custom_addresses_override_rules_and_tests_use_their_own() -> None:
    plan = make(
        mappings=[{"source": "10.0.0.0/16", "target": "10.9.0.0/16", "gateway": "10.9.0.1",
                   "dns": ["10.9.0.53"]}],
        test_mappings=[{"source": "10.0.0.0/16", "target": "192.168.0.0/16"}],
        vms=[{"vm": "db-1", "addresses": ["10.9.0.200/16"],
              "test": {"addresses": ["192.168.77.9/24"], "gateway": "192.168.77.1"}}],
    )  # fmt: skip
    plan = plan.model_copy(update={"groups": [["db-1"]]})
    failover = target_for(plan, DrRunKind.FAILOVER, VM, "db-1", [nic("10.0.0.5/16")])
    assert failover.interfaces[0].addresses == ["10.9.0.200/16"]
    assert failover.interfaces[0].gateways == ["10.9.0.1"]  # from the rule covering it
    assert failover.dns == ["10.9.0.53"]
    test = target_for(plan, DrRunKind.TEST, VM, "db-1", [nic("10.0.0.5/16")])
    assert test.interfaces[0].addresses == ["192.168.77.9/24"]
    assert test.interfaces[0].gateways == ["192.168.77.1"] and test.dns == []
    other = target_for(plan, DrRunKind.TEST, "0c4b…", "web-1", [nic("10.0.0.6/16")])
    assert other.interfaces[0].addresses == ["192.168.0.6/16"]


def test_a_vm_the_plan_gives_nothing_fails_with_its_addresses_named() -> None:
    plan = make(mappings=[{"source": "10.0.0.0/16", "target": "10.9.0.0/16"}])
    with pytest.raises(MappingError, match=r"no mapping rule matches .*eth0 172\.16\.0\.4/24"):
        target_for(plan, DrRunKind.FAILOVER, VM, None, [nic("172.16.0.4/24")])


def test_unmatched_interfaces_are_kept_and_noted() -> None:
    plan = make(mappings=[{"source": "10.0.0.0/16", "target": "10.9.0.0/16"}])
    got = target_for(
        plan, DrRunKind.FAILOVER, VM, None,
        [nic("10.0.0.5/16"), nic("172.16.0.4/24", name="eth1", mac="52:54:00:aa:bb:cd")],
    )  # fmt: skip
    assert [i.name for i in got.interfaces] == ["eth0"]
    assert any("eth1" in n and "unchanged" in n for n in got.notes)


def test_overrides_and_groups_are_checked() -> None:
    found = problems(
        groups=[["a", "b"], ["a"], []],
        vms=[
            {"vm": "c", "addresses": ["10.9.0.5/16"]},
            {"vm": "a", "addresses": ["10.9.0.5"], "gateway": "10.8.0.1"},
            {"vm": "b", "addresses": ["10.9.0.7/16", "10.9.0.7/16"]},
        ],
        timeouts={"apply": 10, "gateway": 10},
    )
    text = "\n".join(found)
    assert "groups[1][0]: VM 'a' is already in groups[0]" in text
    assert "groups[2]: empty group" in text
    assert "vms[0]: VM 'c' has overrides but is in no group" in text
    assert "vms[1].addresses[0]: '10.9.0.5' needs a prefix length" in text
    assert "10.9.0.7 is also given to" not in text  # the same VM may repeat itself
    assert "timeouts.gateway (10 s) must be shorter than timeouts.apply (10 s)" in text
    warnings = check_plan(make(vms=[{"vm": VM, "addresses": ["10.9.0.5/16"]}])).warnings
    assert any("gets no default route" in w for w in warnings)
    assert any("no test_mappings" in w for w in warnings)


ISSUE_EXAMPLE = """
name: site-b
mappings:                      # ordered; first match wins; offset mapping keeps the host part
  - {source: 10.0.0.0/24, target: 10.9.0.0/24, gateway: 10.9.0.1, dns: [10.9.0.53]}
test_mappings:
  - {source: 10.0.0.0/24, target: 192.168.77.0/24, gateway: 192.168.77.1}
vms:                           # per-VM overrides
  - {vm: %s, addresses: [10.9.0.200/24]}
groups: [[vm-a, vm-b], [vm-c]] # start order
script: true
timeouts: {link: 300, apply: 60, script: 300}
"""


def test_the_plan_example_of_the_design_still_validates_and_maps() -> None:
    """The example plan operators were promised keeps working (the elided uuid filled in)."""
    plan = DrPlan.model_validate(yaml_plan(ISSUE_EXAMPLE % VM))
    assert check_plan(plan).problems == []
    assert (plan.name, plan.groups, plan.script) == ("site-b", [["vm-a", "vm-b"], ["vm-c"]], True)
    custom = target_for(plan, DrRunKind.FAILOVER, VM, None, [nic("10.0.0.9/24")])
    assert custom.interfaces[0].addresses == ["10.9.0.200/24"]
    offset = target_for(plan, DrRunKind.FAILOVER, "vm-b-uuid", "vm-b", [nic("10.0.0.17/24")])
    assert offset.interfaces[0].addresses == ["10.9.0.17/24"]
    assert offset.interfaces[0].gateways == ["10.9.0.1"]
    test = target_for(plan, DrRunKind.TEST, "vm-b-uuid", "vm-b", [nic("10.0.0.17/24")])
    assert test.interfaces[0].addresses == ["192.168.77.17/24"]


def test_overrides_by_uuid_for_groups_by_name_are_checked_once_names_resolve() -> None:
    plan = DrPlan.model_validate(yaml_plan(ISSUE_EXAMPLE % VM))
    # the registry says vm-a is VM: the override belongs to a group member
    assert orphan_overrides(plan, [[VM, "u-b"], ["u-c"]], {VM: "vm-a"}) == []
    # it names none of the resolved VMs: refused at the run start
    assert orphan_overrides(plan, [["u-a", "u-b"], ["u-c"]], {"u-a": "vm-a"}) == [
        f"vms[0]: VM {VM!r} has overrides but is in no group"
    ]


def yaml_plan(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)
