"""Choosing the external interface the way upstream does (pkg/ip/iface.go, pkg/ipmatch LookupExtIface).

Order: each --iface (name or IP), then each --iface-regex (Go/RE2 syntax; against IPs first, then
names), then --iface-can-reach (the interface `ip route get` would use), else the default route's
interface.

IPv6 (``select(..., ipv6=True)``; ``ipv4=False`` for IPv6-only): the interface's global IPv6
address (a ULA counts, link-local never: it cannot carry the overlay between hosts) is found by the
same rules: an ``--iface`` IPv6 address names its interface, a regex matches IPv6 addresses too (in
dual stack, like upstream, an interface whose IPv4 *and* IPv6 addresses match comes first), an
IPv6 ``--iface-can-reach`` target asks the IPv6 route, and without flags the default IPv6 route
decides (in dual stack it must use the IPv4 default route's interface, upstream's rule). Whatever
selected the interface, each enabled family's address is the interface's best one unless the
selector named it (an IP literal, the regex's match, the route's source); upstream leaves some of
these combinations without an IPv6 (or IPv4) address. A host without a usable global IPv6 address
or default IPv6 route is one line naming the fix.
The host is read through :class:`pyflanneld.netlink.HostView`, which blocks: the daemon calls
:func:`select` in a thread.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from .netlink import HostAddress, HostView, NetlinkError

IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE, IFA_F_PERMANENT = 0x08, 0x20, 0x40, 0x80


class InterfaceError(Exception):
    """No usable interface; the message says which flag to use."""


@dataclass(frozen=True)
class Iface:
    """The external interface: ``ip`` its IPv4 address (None with IPv4 off), ``ip6`` its global
    IPv6 address (None unless IPv6 was asked for), ``mtu`` in bytes."""

    name: str
    index: int
    ip: IPv4Address | None
    mtu: int
    ip6: IPv6Address | None = None


def _addrs(found: list[HostAddress]) -> dict[int, list[IPv4Address]]:
    """IPv4 addresses per ifindex, best first: global before link-local, permanent before dynamic."""
    out: dict[int, list[tuple[tuple, IPv4Address]]] = {}
    for a in found:
        ip, flags = a.ip, a.flags
        if not isinstance(ip, IPv4Address) or ip.is_loopback:
            continue
        key = (a.scope != 0, ip.is_link_local, not (flags & IFA_F_PERMANENT), bool(flags & IFA_F_DEPRECATED))
        if flags & IFA_F_DEPRECATED:
            continue
        out.setdefault(a.index, []).append((key, ip))
    return {i: [ip for _k, ip in sorted(v, key=lambda t: t[0])] for i, v in out.items()}


def _addrs6(found: list[HostAddress]) -> tuple[dict[int, list[IPv6Address]], set[int]]:
    """Global IPv6 addresses per ifindex (ULA included), best first: permanent before dynamic,
    settled before tentative; deprecated and failed-DAD ones left out. Also the ifindexes that
    have a link-local address only (for the error message)."""
    out: dict[int, list[tuple[tuple, IPv6Address]]] = {}
    link_local: set[int] = set()
    for a in found:
        ip, flags = a.ip, a.flags
        if not isinstance(ip, IPv6Address) or ip.is_loopback or ip.is_multicast or ip.is_unspecified \
                or flags & (IFA_F_DEPRECATED | IFA_F_DADFAILED):
            continue
        if ip.is_link_local:
            link_local.add(a.index)
            continue
        key = (not (flags & IFA_F_PERMANENT), bool(flags & IFA_F_TENTATIVE))
        out.setdefault(a.index, []).append((key, ip))
    return {i: [ip for _k, ip in sorted(v, key=lambda t: t[0])] for i, v in out.items()}, link_local - set(out)


class _Host:
    """The host's links and addresses, read once, and the families the overlay needs."""

    def __init__(self, view: HostView, ipv4: bool, ipv6: bool) -> None:
        self.view = view
        self.ipv4, self.ipv6 = ipv4, ipv6
        self.links = view.links()
        self.by_name = {name: idx for idx, (name, _m) in self.links.items()}
        self.addrs = _addrs(view.addresses(socket.AF_INET))
        self.addrs6, self.link_local_only = _addrs6(view.addresses(socket.AF_INET6)) if ipv6 else ({}, set())

    def make(self, index: int, ip: IPv4Address | None = None, ip6: IPv6Address | None = None) -> Iface:
        """The Iface of ``index``: each enabled family's address is the given one, else the
        interface's best. Raises InterfaceError (without the flag: callers prefix it) when an
        enabled family has none."""
        if index not in self.links:
            raise InterfaceError(f"interface {index} vanished")
        name, mtu = self.links[index]
        if self.ipv4 and ip is None:
            ips = self.addrs.get(index, [])
            if not ips:
                raise InterfaceError(f"the interface {name} has no IPv4 address")
            ip = ips[0]
        if self.ipv6 and ip6 is None:
            ips6 = self.addrs6.get(index, [])
            if not ips6:
                only = " (only link-local)" if index in self.link_local_only else ""
                raise InterfaceError(f"the interface {name} has no global IPv6 address{only}: add one "
                                     f"(ip -6 addr add ... dev {name}) or pick another interface")
            ip6 = ips6[0]
        return Iface(name=name, index=index, ip=ip if self.ipv4 else None, mtu=mtu,
                     ip6=ip6 if self.ipv6 else None)

    def owner(self, ip: IPv4Address | IPv6Address) -> int | None:
        """The ifindex that has address ``ip``."""
        table = self.addrs if ip.version == 4 else self.addrs6
        return next((idx for idx, ips in table.items() if ip in ips), None)


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


def _by_spec(host: _Host, spec: str) -> Iface:
    """``--iface SPEC``: an IPv4 or IPv6 address names the interface that has it (and is that
    family's address), anything else is an interface name."""
    try:
        ip = ip_address(spec)
    except ValueError:
        ip = None
    try:
        if ip is not None:
            if ip.version == 6 and ip.is_link_local:
                raise InterfaceError("a link-local address cannot carry the overlay; use the interface's name "
                                     "or a global address")
            idx = host.owner(ip) if ip.version == 4 or host.ipv6 else _owner6_any(host, ip)
            if idx is None:
                raise InterfaceError("no interface has this address")
            return host.make(idx, ip if ip.version == 4 else None, ip if ip.version == 6 else None)
        if spec not in host.by_name:
            raise InterfaceError("no such interface")
        return host.make(host.by_name[spec])
    except InterfaceError as e:
        raise InterfaceError(f"--iface {spec}: {e}") from None


def _owner6_any(host: _Host, ip: IPv6Address) -> int | None:
    """IPv4-only overlay, ``--iface`` given as an IPv6 address: the interface that has it (its
    IPv4 address is used; upstream refuses an IPv6 literal then)."""
    addrs6, _ = _addrs6(host.view.addresses(socket.AF_INET6))
    return next((idx for idx, ips in addrs6.items() if ip in ips), None)


def _by_regex(host: _Host, rx: str, pat) -> Iface:
    """Upstream's order: the first interface with an address of each enabled family that the regex
    matches (in dual stack both must match on one interface), then the first whose name matches."""
    for idx in sorted(host.links):
        found: dict[int, IPv4Address | IPv6Address] = {}
        for version, enabled, table in ((4, host.ipv4, host.addrs), (6, host.ipv6, host.addrs6)):
            if enabled:
                hit = next((ip for ip in table.get(idx, []) if pat.search(str(ip))), None)
                if hit is not None:
                    found[version] = hit
        if len(found) == host.ipv4 + host.ipv6:
            return host.make(idx, found.get(4), found.get(6))  # type: ignore[arg-type]
    reasons = []
    for idx in sorted(host.links):
        if pat.search(host.links[idx][0]):
            try:
                return host.make(idx)
            except InterfaceError as e:
                reasons.append(str(e))
    raise InterfaceError(f"no interface matches --iface-regex {rx}" + (f" ({'; '.join(reasons)})" if reasons else ""))


def _by_route(host: _Host, target: str) -> Iface:
    """``--iface-can-reach TARGET`` (IPv4 or IPv6): the interface of the route to it, with the
    route's source address as that family's address."""
    try:
        dst = ip_address(target)
        oif, src_ip = host.view.route_to(dst)
    except (ValueError, NetlinkError) as e:
        raise InterfaceError(f"--iface-can-reach {target}: no route ({e})") from None
    if src_ip is not None and src_ip.version == 6 and (src_ip.is_link_local or not host.ipv6):
        src_ip = None
    try:
        return host.make(oif, src_ip if dst.version == 4 else None,
                         src_ip if dst.version == 6 else None)  # type: ignore[arg-type]
    except InterfaceError as e:
        raise InterfaceError(f"--iface-can-reach {target}: {e}") from None


def _by_default_route(host: _Host) -> Iface:
    """No flags: the first default route's interface that has the addresses needed (IPv4's
    routes; IPv6-only: IPv6's). In dual stack the default IPv6 route must leave through that
    interface (upstream's rule)."""
    fix = "pass --iface <name or IP> (or --iface-regex / --iface-can-reach)"
    oifs4 = host.view.default_route_oifs(socket.AF_INET) if host.ipv4 else []
    if host.ipv4 and not oifs4:
        raise InterfaceError(f"no default route to pick the interface from; {fix}")
    oifs6 = host.view.default_route_oifs(socket.AF_INET6) if host.ipv6 else []
    if host.ipv6 and not oifs6:
        raise InterfaceError("IPv6 is enabled but there is no default IPv6 route to pick the interface from; "
                             f"add one (ip -6 route add default via ...) or {fix}")
    if oifs4 and oifs6 and oifs6[0] not in oifs4:
        n4, n6 = (host.links.get(i, ("?",))[0] for i in (oifs4[0], oifs6[0]))
        raise InterfaceError(f"v6 default route interface {n6} must be the same with v4 default route interface "
                             f"{n4}; {fix}")
    reasons = []
    for oif in oifs4 if host.ipv4 else oifs6:
        if oifs4 and oifs6 and oif != oifs6[0]:
            continue
        try:
            return host.make(oif)
        except InterfaceError as e:
            reasons.append(str(e))
    raise InterfaceError(f"default route: {'; '.join(reasons)}; or {fix}")


def select(ifaces: list[str], regexes: list[str], can_reach: str, *, ipv4: bool = True,
           ipv6: bool = False) -> Iface:
    """Upstream's order; with any of the three flags given, the first that matches wins and a
    non-matching one is only noted; none matching is an error listing why each failed.
    An invalid --iface-regex is an error even when an earlier flag matches (upstream notices only
    when it gets that far). ``ipv4``/``ipv6``: the families the overlay runs (the config's
    EnableIPv4/EnableIPv6); each needs an address on the chosen interface. Raises
    :class:`InterfaceError` (one line)."""
    patterns = [compile_regex(rx) for rx in regexes]
    with HostView() as view:
        host = _Host(view, ipv4, ipv6)
        if not (ifaces or regexes or can_reach):
            return _by_default_route(host)
        reasons = []
        attempts = [lambda s=s: _by_spec(host, s) for s in ifaces]
        attempts += [lambda r=r, p=p: _by_regex(host, r, p) for r, p in zip(regexes, patterns, strict=True)]
        if can_reach:
            attempts.append(lambda: _by_route(host, can_reach))
        for attempt in attempts:
            try:
                return attempt()
            except InterfaceError as e:
                reasons.append(str(e))
        raise InterfaceError("failed to find an interface that matches the interfaces and/or regexes "
                             f"provided ({'; '.join(reasons)}); check `ip {'' if ipv6 else '-4 '}addr`")


def underlay_networks(index: int) -> tuple[IPv4Network | IPv6Network, ...]:
    """The networks the interface ``index`` reaches directly: the prefix of each of its addresses
    (IPv4 and global IPv6; a point-to-point address: its peer's prefix and its own address). A
    flannel route to one of them would replace the host's route to its own underlay."""
    nets: set[IPv4Network | IPv6Network] = set()
    with HostView() as view:
        for local, net in view.prefixes(index):
            if local.is_link_local or local.is_loopback:
                continue
            nets.add(net)
            if local not in net:
                nets.add(ip_network(local))
    return tuple(sorted(nets, key=lambda n: (n.version, n)))


def public_addresses(found: Iface, public_ip: str = "", public_ipv6: str = "") -> tuple[
        IPv4Address | None, IPv6Address | None]:
    """The addresses to publish in the lease (PublicIP, PublicIPv6): ``--public-ip`` /
    ``--public-ipv6`` when given (already validated, see cli.check_options), else the interface's
    (upstream LookupExtIface's ExtAddr/ExtV6Addr). A family the overlay does not run stays None."""
    pub = IPv4Address(public_ip) if public_ip and found.ip is not None else found.ip
    pub6 = IPv6Address(public_ipv6) if public_ipv6 and found.ip6 is not None else found.ip6
    return pub, pub6
