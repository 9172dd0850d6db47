"""Tier 1: a CIDR list is judged by the union of the public space it reaches, IPv6 forms that
carry IPv4 included; the VNet is private, so the unit's IPAddressAllow stays closed."""

from __future__ import annotations

import pytest

from serving.render import proxy_unit, systemd_unit
from serving.stack import layout, networks, stackfile
from serving.stack.errors import SpecError
from tests.stack.test_spec import GOOD_VM

INTERNET_IN_PIECES: dict[str, list[str]] = {
    "ipv4-halves": ["0.0.0.0/1", "128.0.0.0/1"],
    "ipv4-quarters": ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2"],
    "ipv4-one-half": ["128.0.0.0/1"],
    "ipv4-two-slash-7": ["8.0.0.0/7", "198.51.100.0/24"],
    "ipv6-halves": ["::/1", "8000::/1"],
    "ipv6-global-unicast": ["2000::/3"],
    "ipv6-a-slash-16": ["2a00::/16"],
    "ipv4-mapped": ["::ffff:0:0/96"],
    "ipv4-mapped-halves": ["::ffff:0.0.0.0/97", "::ffff:128.0.0.0/97"],
    "ipv4-mapped-plus-ipv4-half": ["::ffff:0.0.0.0/97", "128.0.0.0/1"],
    "ipv4-compatible": ["::/96"],
    "nat64-well-known": ["64:ff9b::/96"],
    "nat64-local-use": ["64:ff9b:1::/48"],
    "6to4": ["2002::/16"],
    "6to4-halves": ["2002::/17", "2002:8000::/17"],
    "teredo": ["2001::/32"],
    "many-slash-8s": [f"{n}.0.0.0/8" for n in (11, 12, 13)],
}
NAMED_NETWORKS: dict[str, list[str]] = {
    "documentation": ["203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32"],
    "office-and-vpn": ["81.2.69.0/24", "81.2.70.0/23", "2a02:1234::/48"],
    "one-slash-8": ["11.0.0.0/8"],
    "private-is-not-public": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
    "mapped-small": ["::ffff:81.2.69.0/120"],
    "6to4-small": ["2002:5102:4500::/40"],
    "isp-slash-32": ["2a02:1200::/32"],
}


def problems(**changes: object) -> list[str]:
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, **changes}, stack="t", where="Pulumi.t.yaml")
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("key", ["sshCidrs", "apiCidrs"])
@pytest.mark.parametrize("cidrs", list(INTERNET_IN_PIECES.values()),
                         ids=list(INTERNET_IN_PIECES))
def test_the_internet_in_pieces_is_refused(key: str, cidrs: list[str]) -> None:
    lines = problems(**{key: cidrs})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Pulumi.t.yaml: exaone-serving:{key}: ")
    assert "allowed: named networks" in lines[0]


@pytest.mark.parametrize("cidrs", list(NAMED_NETWORKS.values()), ids=list(NAMED_NETWORKS))
def test_named_networks_pass(cidrs: list[str]) -> None:
    assert networks.internet_problem(cidrs) is None
    spec = stackfile.from_values({**GOOD_VM, "sshCidrs": cidrs, "apiCidrs": cidrs}, stack="t")
    assert len(spec.network.api_cidrs) == len(cidrs)


def test_reach_counts_the_union_not_the_entries() -> None:
    v4, _ = networks.public_reach(["11.0.0.0/8", "11.0.0.0/9", "::ffff:11.0.0.0/104"])
    assert v4 == 2**24  # the same /8 three times is one /8


@pytest.mark.parametrize("vnet", ["0.0.0.0/0", "0.0.0.0/1", "8.0.0.0/8", "fd00::/8",
                                  "::ffff:10.0.0.0/104", "203.0.113.0/24"])
def test_a_vnet_outside_private_ipv4_is_refused(vnet: str) -> None:
    lines = problems(vnetCidr=vnet)
    assert any("exaone-serving:vnetCidr: " in line and "private IPv4" in line
               for line in lines), lines


@pytest.mark.parametrize("vnet", ["10.40.0.0/16", "172.20.0.0/16", "192.168.8.0/22",
                                  "100.64.0.0/16"])
def test_the_units_allow_only_what_the_spec_names(vnet: str) -> None:
    """vLLM's unit admits loopback alone (the API proxy in front of it is what clients reach);
    the proxy's unit admits the API networks and the VNet, and together they are no piece of
    the Internet."""
    spec = stackfile.from_values({**GOOD_VM, "vnetCidr": vnet}, stack="t")
    assert systemd_unit.unit_context(spec, layout.VM)["ip_address_allow"] == ["localhost"]
    allowed = proxy_unit.ip_address_allow(spec)
    assert allowed == ["localhost", "198.51.100.0/24", vnet]
    assert networks.internet_problem([a for a in allowed if a != "localhost"]) is None
