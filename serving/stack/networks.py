"""What a list of CIDRs reaches: judged as a union, by what each range means.

A list that opens a port is refused when, taken together, it covers more of the public
Internet than one organisation could name: more public IPv4 addresses than a /8 holds, or
more public IPv6 addresses than a /32 (an ISP's whole allocation) holds. Halves and quarters
(``0.0.0.0/1`` + ``128.0.0.0/1``) add up; IPv6 ranges that carry IPv4 addresses inside them
(IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``, NAT64 ``64:ff9b::/96`` and
``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo ``2001::/32``) count as the IPv4 space they
reach. Private, shared, loopback, link-local, documentation and multicast ranges are not
public and never count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPv4 = ipaddress.IPv4Network
IPv6 = ipaddress.IPv6Network

# The most public space one list may reach (a /8 of IPv4, a /32 of IPv6).
MAX_PUBLIC_V4_PREFIX = 8
MAX_PUBLIC_V6_PREFIX = 32
_MAX_V4 = 2 ** (32 - MAX_PUBLIC_V4_PREFIX)
_MAX_V6 = 2 ** (128 - MAX_PUBLIC_V6_PREFIX)

# IPv4 ranges that are not reachable from the Internet (RFC 6890 and its updates).
_NOT_PUBLIC_V4 = tuple(
    ipaddress.collapse_addresses(
        IPv4(n)
        for n in (
            "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
            "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16",
            "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4",
            "240.0.0.0/4",
        )
    )
)
# Public IPv6 is global unicast, less documentation; the ranges that embed IPv4 are judged
# by the IPv4 they reach instead (below).
_GLOBAL_V6 = IPv6("2000::/3")
_NOT_PUBLIC_V6 = (IPv6("2001:db8::/32"), IPv6("3fff::/20"))

# IPv6 prefixes that carry an IPv4 address at bit offset ``at`` (RFC 4291, 6052, 3056, 4380).
# Teredo stores the client's address inverted in the last 32 bits.
_EMBEDS_V4: tuple[tuple[IPv6, int, bool], ...] = (
    (IPv6("::ffff:0:0/96"), 96, False),  # IPv4-mapped
    (IPv6("::/96"), 96, False),  # IPv4-compatible (deprecated, still parsed)
    (IPv6("64:ff9b::/96"), 96, False),  # NAT64 well-known prefix
    (IPv6("64:ff9b:1::/48"), 96, False),  # NAT64 local use (RFC 8215), /96 form
    (IPv6("2002::/16"), 16, False),  # 6to4
    (IPv6("2001::/32"), 96, True),  # Teredo
)
_ALL_V4 = IPv4("0.0.0.0/0")


def _v4_reached(net: IPv6) -> list[IPv4]:
    """The IPv4 ranges an IPv6 range reaches through a translation prefix."""
    reached: list[IPv4] = []
    for prefix, at, inverted in _EMBEDS_V4:
        if not net.overlaps(prefix):
            continue
        if net.prefixlen <= at:
            # The range leaves every bit of the embedded IPv4 address free: all of IPv4.
            reached.append(_ALL_V4)
            continue
        bits = min(net.prefixlen - at, 32)
        value = (int(net.network_address) >> (128 - at - 32)) & 0xFFFFFFFF
        if inverted:
            value ^= 0xFFFFFFFF
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        reached.append(IPv4((value & mask, bits)))
    return reached


def _public_count(nets: Iterable[IPv4] | Iterable[IPv6], outside: tuple, within=None) -> int:
    """Addresses of the collapsed ``nets`` that lie in ``within`` (if given) and not in any
    of ``outside``."""
    total = 0
    for net in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
        if within is not None:
            if net.subnet_of(within):
                pass
            elif within.subnet_of(net):
                net = within
            else:
                continue
        if any(net.subnet_of(o) for o in outside):
            continue
        size = net.num_addresses
        size -= sum(o.num_addresses for o in outside if o.subnet_of(net))
        total += size
    return total


def public_reach(cidrs: Iterable[str]) -> tuple[int, int]:
    """(public IPv4 addresses, public IPv6 addresses) the union of ``cidrs`` reaches."""
    v4: list[IPv4] = []
    v6: list[IPv6] = []
    for text in cidrs:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, IPv4):
            v4.append(net)
        else:
            v6.append(net)
            v4.extend(_v4_reached(net))
    embedded = tuple(prefix for prefix, _, _ in _EMBEDS_V4 if prefix.subnet_of(_GLOBAL_V6))
    v6_count = _public_count(v6, _NOT_PUBLIC_V6 + embedded, within=_GLOBAL_V6)
    return _public_count(v4, _NOT_PUBLIC_V4), v6_count


def internet_problem(cidrs: Iterable[str]) -> str | None:
    """Why the list opens too much of the Internet, or None. ``cidrs`` are valid networks."""
    cidrs = list(cidrs)
    v4, v6 = public_reach(cidrs)
    if v4 > _MAX_V4:
        share = v4 / 2**32
        return (
            f"together reach {share:.1%} of the IPv4 Internet (IPv6 forms that carry IPv4 "
            f"included); allowed: named networks, at most a /{MAX_PUBLIC_V4_PREFIX} of public "
            "space in all"
        )
    if v6 > _MAX_V6:
        return (
            "together reach more of the public IPv6 Internet than a "
            f"/{MAX_PUBLIC_V6_PREFIX}; allowed: named networks, at most a "
            f"/{MAX_PUBLIC_V6_PREFIX} in all"
        )
    return None


PRIVATE_V4 = tuple(
    IPv4(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


def private_v4_problem(cidr: str) -> str | None:
    """Why ``cidr`` is not a private IPv4 range (a VNet's address space), or None."""
    net = ipaddress.ip_network(cidr, strict=False)
    if isinstance(net, IPv4) and any(net.subnet_of(p) for p in PRIVATE_V4):
        return None
    return (
        f"{cidr} is not a private IPv4 range (the VNet's addresses are allowed to reach the "
        "API); allowed: a range inside " + ", ".join(str(p) for p in PRIVATE_V4)
    )
