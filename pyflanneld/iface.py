"""Choosing the external interface the way upstream does (pkg/ip/iface.go, main.go LookupExtIface).

Order: each --iface (name or IP), then each --iface-regex (Go/RE2 syntax; against IPs first, then
names), then --iface-can-reach (the interface `ip route get` would use), else the default route's
interface.
Runs before the asyncio loop, so it uses pyroute2's synchronous IPRoute.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class InterfaceError(Exception):
    """No usable interface; the message says which flag to use."""


@dataclass(frozen=True)
class Iface:
    name: str
    index: int
    ip: IPv4Address
    mtu: int


def address_of(msg) -> str:
    """The host's own address in an RTM_NEWADDR message: IFA_LOCAL, else IFA_ADDRESS.

    For a point-to-point address (``ip addr add 10.99.0.2 peer 10.99.0.254/32``) IFA_ADDRESS is the
    *peer's* address; IFA_LOCAL is ours (vishvananda/netlink's AddrList, which upstream uses, reads
    it the same way). For other IPv4 addresses both are equal.
    """
    return msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")


def _addrs(ipr: IPRoute) -> dict[int, list[IPv4Address]]:
    """IPv4 addresses per ifindex, best first: global before link-local, permanent before dynamic."""
    out: dict[int, list[tuple[tuple, IPv4Address]]] = {}
    for a in ipr.get_addr(family=socket.AF_INET):
        ip = IPv4Address(address_of(a))
        flags = a.get_attr("IFA_FLAGS") or a["flags"]
        if ip.is_loopback:
            continue
        key = (a["scope"] != 0, ip.is_link_local, not (flags & 0x80), bool(flags & 0x20))  # 0x80 PERMANENT, 0x20 DEPRECATED
        if flags & 0x20:
            continue
        out.setdefault(a["index"], []).append((key, ip))
    return {i: [ip for _k, ip in sorted(v, key=lambda t: t[0])] for i, v in out.items()}


def _links(ipr: IPRoute) -> dict[int, tuple[str, int]]:
    return {ln["index"]: (ln.get_attr("IFLA_IFNAME"), ln.get_attr("IFLA_MTU")) for ln in ipr.get_links()}


def _make(links, addrs, index: int, ip: IPv4Address | None = None) -> Iface | None:
    if index not in links:
        return None
    ips = addrs.get(index, [])
    if ip is None:
        if not ips:
            return None
        ip = ips[0]
    name, mtu = links[index]
    return Iface(name=name, index=index, ip=ip, mtu=mtu)


def _by_spec(links, addrs, by_name, spec: str) -> Iface:
    try:
        ip = IPv4Address(spec)
    except ValueError:
        ip = None
    if ip is not None:
        for idx, ips in addrs.items():
            if ip in ips:
                return _make(links, addrs, idx, ip)
        raise InterfaceError(f"--iface {spec}: no interface has this address")
    if spec not in by_name:
        raise InterfaceError(f"--iface {spec}: no such interface")
    found = _make(links, addrs, by_name[spec])
    if found is None:
        raise InterfaceError(f"--iface {spec}: the interface has no IPv4 address")
    return found


def compile_regex(rx: str):
    """Compile an ``--iface-regex`` with Go's syntax (RE2, which Go's regexp implements): POSIX
    classes like ``[[:digit:]]``, ``\\z``, no backreferences. Match with ``.search()``, an
    unanchored search like Go's ``regexp.MatchString``.

    Raises InterfaceError (one line naming the flag) for an invalid expression.
    """
    import re2  # only when the flag is given: the engine costs ~2.6 MB of RSS

    options = re2.Options()
    options.log_errors = False  # RE2 would write its own "Error parsing ..." line to stderr
    try:
        return re2.compile(rx, options)
    except re2.error as e:
        why = e.args[0] if e.args else ""
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
        raise InterfaceError(f"--iface-regex {rx!r} is not a valid regular expression (Go/RE2 syntax): "
                             f"{why}") from None


def _by_regex(links, addrs, rx: str, pat) -> Iface:
    """Upstream's order: the first interface with an address the regex matches, then by name."""
    for idx in sorted(addrs):
        for ip in addrs[idx]:
            if pat.search(str(ip)):
                return _make(links, addrs, idx, ip)
    for idx in sorted(links):
        if pat.search(links[idx][0]) and idx in addrs:
            return _make(links, addrs, idx)
    raise InterfaceError(f"no interface matches --iface-regex {rx}")


def _by_route(ipr, links, addrs, target: str) -> Iface:
    try:
        IPv4Address(target)
        routes = ipr.route("get", dst=target)
    except (ValueError, NetlinkError) as e:
        raise InterfaceError(f"--iface-can-reach {target}: no route ({e})") from None
    r = routes[0]
    src = r.get_attr("RTA_PREFSRC")
    found = _make(links, addrs, r.get_attr("RTA_OIF"), IPv4Address(src) if src else None)
    if found is None:
        raise InterfaceError(f"--iface-can-reach {target}: the route's interface has no IPv4 address")
    return found


def select(ifaces: list[str], regexes: list[str], can_reach: str) -> Iface:
    """Upstream's order; with any of the three flags given, the first that matches wins and a
    non-matching one is only noted; none matching is an error listing why each failed.
    An invalid --iface-regex is an error even when an earlier flag matches (upstream notices only
    when it gets that far)."""
    patterns = [compile_regex(rx) for rx in regexes]
    with IPRoute() as ipr:
        links, addrs = _links(ipr), _addrs(ipr)
        by_name = {name: idx for idx, (name, _m) in links.items()}
        if ifaces or regexes or can_reach:
            reasons = []
            attempts = [lambda s=s: _by_spec(links, addrs, by_name, s) for s in ifaces]
            attempts += [lambda r=r, p=p: _by_regex(links, addrs, r, p)
                         for r, p in zip(regexes, patterns, strict=True)]
            if can_reach:
                attempts.append(lambda: _by_route(ipr, links, addrs, can_reach))
            for attempt in attempts:
                try:
                    return attempt()
                except InterfaceError as e:
                    reasons.append(str(e))
            raise InterfaceError("failed to find an interface that matches the interfaces and/or regexes "
                                 f"provided ({'; '.join(reasons)}); check `ip -4 addr`")
        for r in ipr.get_default_routes(family=socket.AF_INET):
            oif = r.get_attr("RTA_OIF")
            if oif is None:
                continue
            found = _make(links, addrs, oif)
            if found is not None:
                return found
        raise InterfaceError("no default route to pick the interface from; pass --iface <name or IP> "
                             "(or --iface-regex / --iface-can-reach)")
