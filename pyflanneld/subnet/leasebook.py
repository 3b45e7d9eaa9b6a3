"""The validation gate: which records under ``<prefix>/subnets/`` are peers this host may program.

Everything read from etcd is untrusted. A key anyone can write must not reach the kernel unless it
is a lease a flannel host could have written and does not collide with what is already in use:

Per lease (its record alone, plus the network config):
  * the key parses (``10.5.1.0-24``, dual stack ``10.5.1.0-24&fd80:0:0:1::-64``, IPv6-only
    ``0.0.0.0-0&fd80:0:0:1::-64``), the value decodes (bounded JSON), PublicIP is an IPv4 string
    (missing, a number or a boolean are refused, as upstream's ip.IP4 decoder refuses them),
    PublicIPv6 null or an IPv6 string, BackendType is a string;
  * BackendType is a registered backend's name, or "" (udp and alloc leases carry none);
  * IPv4 (``EnableIPv4``, the default): the subnet lies inside Network and is smaller than it;
    PublicIP is a unicast address (not 0.0.0.0, loopback or multicast); BackendData is valid for
    the backend (lease.check_backend_data; vxlan: a unicast, non-zero 6-byte VtepMAC and a 16-bit
    VNI). With IPv4 off (IPv6-only) the IPv4 part is not looked at (upstream writes 0.0.0.0-0 and
    PublicIP 0.0.0.0 there);
  * IPv6 (``EnableIPv6``): a lease with an IPv6 subnet has it inside IPv6Network and smaller than
    it, a PublicIPv6 that another host can reach (not ::, loopback, link-local or multicast) and a
    valid BackendV6Data (lease.check_backend_v6_data): upstream skips a lease whose IPv6 half does
    not decode, IPv4 included. A lease without IPv6 subnet is an IPv4-only peer in a dual-stack
    network (kept for IPv4; upstream would crash on it) and no usable lease in an IPv6-only one.
    With IPv6 off the IPv6 part is not looked at.

Against the others (the set of valid leases, "candidates"), per enabled family:
  * no overlap with this host's own subnet (IPv6 subnet), and no VtepMAC equal to this host's own
    (the IPv6 device's VtepMAC: its own namespace, a v4 and a v6 MAC may be equal);
  * no overlap with, and no VtepMAC of, another accepted lease. Of two conflicting leases a lease
    the network config could have handed out (``allocate.lease_compatible``: each enabled family's
    part of the config's shape, no IPv6 part in an IPv4-only network) wins over one it could not;
    among equals the one created first wins: lower ``Record.create_revision``, then the key.
    Flannel hosts never write conflicting leases of the config's shape (they would be the same
    key), so the config rule decides every overlap between a host's lease and a stray one for all
    hosts alike, even when the host's key has a newer create_revision than the stray's (etcd v2
    gives a key a new createdIndex on every plain set, which is how upstream v0.17 renews). The
    result is a function of the candidates alone (greedy in that order), so it does not depend on
    the order events arrive in, and a relist gives the same answer as the events did. When a
    winner goes, its losers are evaluated again (and may win).

Each rejection is one structlog warning per key and change (value or reason), naming the etcd key
and the problem; ``rejected`` keeps the reasons for /readyz. ``put``/``delete``/``reset``/
``set_own`` return :class:`Changes`: which peers to program and which to remove.

Cost: a put or delete is O(prefix lengths in use + log n + conflicts) plus one list insertion
(a memmove); a relist of 5,000 leases costs ~1.5x decoding their records (~0.12 s on the 2-CPU
development machine under load; tests/test_leasebook.py bounds it). No netlink, I/O or asyncio.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Any, NamedTuple

import structlog

from .. import metrics
from ..config import NetworkConfig
from .allocate import lease_compatible
from .lease import (
    Lease,
    LeaseFormatError,
    check_backend_data,
    check_backend_v6_data,
    lease_from_record,
    log_key,
    vtep_mac,
)
from .store import Record

log = structlog.get_logger()


@dataclass
class Changes:
    """What a book operation changed among the accepted peers.

    added: leases newly accepted or accepted with a new value (program them; for a key already
    programmed the backend replaces the old entries). removed: leases no longer accepted (deleted,
    now rejected, or now the own lease), as they were last accepted (remove their entries).
    """

    added: list[Lease] = field(default_factory=list)
    removed: list[Lease] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


Span = tuple[int, int, int]  # (first address, last address, prefix length) of a subnet, as ints


class _Claims(NamedTuple):
    """What a lease holds that no other lease may hold too, per enabled family: its subnets (as
    spans) and the VtepMACs of its vxlan devices. None: not claimed (family off, or not vxlan)."""

    span: Span | None = None
    span6: Span | None = None
    mac: str | None = None
    mac6: str | None = None


@dataclass(eq=False, slots=True)
class _Cand:
    """A lease that passed the per-lease checks, with what the set checks need."""

    key: str
    lease: Lease
    odd: bool  # not of the config's shape (SubnetLen, SubnetMin..SubnetMax)
    created: int  # create_revision
    claims: _Claims
    revision: int  # mod revision: one warning per change

    @property
    def order(self) -> tuple[bool, int, str]:
        """(not of the config's shape, create_revision, key): lower wins a conflict."""
        return self.odd, self.created, self.key


# Indexes map a claim to the key that holds it, or to the set of keys when several do (conflicts
# are rare: a set per entry would cost ~220 bytes per lease).
Index = dict[Any, "str | set[str]"]


def _index_add(index: Index, claim: Any, key: str) -> None:
    have = index.get(claim)
    if have is None:
        index[claim] = key
    elif isinstance(have, set):
        have.add(key)
    elif have != key:
        index[claim] = {have, key}


def _index_remove(index: Index, claim: Any, key: str) -> None:
    have = index.get(claim)
    if isinstance(have, set):
        have.discard(key)
        if len(have) == 1:
            index[claim] = next(iter(have))
    elif have == key:
        del index[claim]


def _index_get(index: Index, claim: Any, out: set[str]) -> None:
    """Add the keys holding ``claim`` to ``out``."""
    have = index.get(claim)
    if isinstance(have, set):
        out |= have
    elif have is not None:
        out.add(have)


class _Spans:
    """The candidates' subnets of one family, for overlap queries: two CIDR blocks overlap iff one
    contains the other; the containing ones are found by their (start, length), the contained ones
    by their start (bisect in a sorted list)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_cidr: Index = {}  # start << 8 | prefix length → key(s)
        self.starts: list[tuple[int, int, str]] = []  # (start, prefix length, key), sorted
        self.plens: dict[int, int] = {}  # prefix length → number of candidates with it

    def clear(self) -> None:
        self.by_cidr.clear()
        self.starts.clear()
        self.plens.clear()

    def add(self, span: Span, key: str, bulk: bool = False) -> None:
        """Index ``key``'s subnet; ``bulk``: append unsorted (call :meth:`sort` after)."""
        start, _end, plen = span
        _index_add(self.by_cidr, start << 8 | plen, key)
        if bulk:
            self.starts.append((start, plen, key))
        else:
            insort(self.starts, (start, plen, key))
        self.plens[plen] = self.plens.get(plen, 0) + 1

    def sort(self) -> None:
        self.starts.sort()

    def remove(self, span: Span, key: str) -> None:
        start, _end, plen = span
        _index_remove(self.by_cidr, start << 8 | plen, key)
        del self.starts[bisect_left(self.starts, (start, plen, key))]
        self.plens[plen] -= 1
        if not self.plens[plen]:
            del self.plens[plen]

    def overlapping(self, span: Span) -> set[str]:
        """Keys whose subnet overlaps ``span``."""
        start, end, plen = span
        out: set[str] = set()
        for p in self.plens:
            if p < plen:
                _index_get(self.by_cidr, (start & _mask(p, self.bits)) << 8 | p, out)
        i = bisect_left(self.starts, (start,))
        while i < len(self.starts) and self.starts[i][0] <= end:
            out.add(self.starts[i][2])
            i += 1
        return out


def _mask(plen: int, bits: int = 32) -> int:
    full = (1 << bits) - 1
    return (full << (bits - plen)) & full


def _registered_types() -> frozenset[str]:
    from ..backend.base import registered_types  # imported late: the backends import this package

    return frozenset(registered_types())


class LeaseBook:
    """Every record under ``<prefix>/subnets/`` and which of them are accepted peers.

    ``LeaseBook(cfg, prefix)``: ``cfg`` the running NetworkConfig, ``prefix`` the etcd prefix (for
    messages). ``backend_types``: the BackendType names accepted besides ""; default: the
    registered backends. Own lease: :meth:`set_own` (never a peer; leases overlapping it, or using
    its VtepMAC, are rejected).

    ``accepted``: key → Lease (read-only view), never the own lease. ``rejected``: key → one-line
    reason (read-only view).
    """

    def __init__(self, cfg: NetworkConfig, prefix: str, *, backend_types: Iterable[str] | None = None) -> None:
        self.cfg = cfg
        self.prefix = prefix
        self.subnets_path = f"{prefix.rstrip('/')}/subnets/"
        self._types = frozenset(backend_types) if backend_types is not None else _registered_types()
        self._v4 = cfg.enable_ipv4 and cfg.network is not None
        self._v6 = cfg.enable_ipv6 and cfg.ipv6_network is not None
        self._net_span = _span(cfg.network) if self._v4 else None
        self._net6_span = _span(cfg.ipv6_network) if self._v6 else None
        self._own: Lease | None = None
        self._own_claims = _Claims()
        self.host_networks: tuple[IPv4Network | IPv6Network, ...] = ()  # see set_host_networks
        self._records: dict[str, Record] = {}
        self._cands: dict[str, _Cand] = {}
        self._spans = _Spans(32)
        self._spans6 = _Spans(128)
        self._by_mac: dict[int, Index] = {4: {}, 6: {}}  # IP version → VtepMAC → key(s)
        self._accepted: dict[str, Lease] = {}
        self._rejected: dict[str, str] = {}
        self._warned: dict[str, tuple[int, str]] = {}  # key → (mod revision, reason) last warned
        self._before: dict[str, Lease | None] = {}  # accepted state of keys touched by this operation
        self.accepted: Mapping[str, Lease] = MappingProxyType(self._accepted)
        self.rejected: Mapping[str, str] = MappingProxyType(self._rejected)

    # -- public operations ---------------------------------------------------------------------
    @property
    def own(self) -> Lease | None:
        """This host's own lease (None before one is acquired); never one of the peers."""
        return self._own

    def set_own(self, lease: Lease | None) -> Changes:
        """This host's lease (None: none yet). Its key is never a peer; a former own key that is
        still in the book becomes a candidate like any other."""
        old = self._own
        self._own = lease
        self._own_claims = self._claims_of(lease) if lease is not None else _Claims()
        dirty: set[str] = set()
        for o in (old, lease):
            if o is not None:
                dirty |= self._conflicting(self._claims_of(o), None)
        for key in {o.key for o in (old, lease) if o is not None}:
            dirty |= self._evaluate(key)
        self._settle(dirty)
        return self._finish()

    def set_host_networks(self, networks: Iterable[IPv4Network | IPv6Network]) -> Changes:
        """The networks this host reaches directly (its external interface's prefixes): a lease
        overlapping one is rejected (its route would replace the host's route to its underlay,
        cutting it off, when the flannel Network contains the hosts' networks)."""
        networks = tuple(networks)
        if networks == self.host_networks:
            return Changes()
        self.host_networks = networks
        return self.reset(list(self._records.values()))

    def _underlay_conflict(self, sn: IPv4Network | IPv6Network) -> str | None:
        hit = next((n for n in self.host_networks if n.version == sn.version and n.overlaps(sn)), None)
        if hit is None:
            return None
        family = "subnet" if sn.version == 4 else "IPv6 subnet"
        return (f"{family} {sn} overlaps this host's underlay network {hit}: its route would replace the "
                "host's own (the flannel network must not contain the hosts' networks)")

    def reset(self, records: Iterable[Record]) -> Changes:
        """Replace everything with a relist's records."""
        before = dict(self._accepted)
        self._records = {r.key: r for r in records}
        self._cands.clear()
        self._spans.clear()
        self._spans6.clear()
        for macs in self._by_mac.values():
            macs.clear()
        self._accepted.clear()
        self._warned = {k: v for k, v in self._warned.items() if k in self._records}
        old_rejected = dict(self._rejected)
        self._rejected.clear()
        for key in self._records:
            self._evaluate(key, bulk=True)
        self._spans.sort()
        self._spans6.sort()
        self._settle(set(self._cands))
        for key in self._accepted.keys() & old_rejected.keys():
            log.info("lease entry accepted", key=self._shown(key))
        self._before = {k: before.get(k) for k in before.keys() | self._accepted.keys()}
        return self._finish()

    def put(self, record: Record) -> Changes:
        """A record was created or changed."""
        self._records[record.key] = record
        self._settle(self._evaluate(record.key))
        return self._finish()

    def delete(self, key: str) -> Changes:
        """A record was deleted (or expired). Deleting a rejected key changes nothing."""
        if self._records.pop(key, None) is None:
            return Changes()
        self._warned.pop(key, None)
        self._settle(self._evaluate(key))
        return self._finish()

    # -- per-lease checks ------------------------------------------------------------------------
    def _check(self, rec: Record) -> _Cand | str:
        """The per-lease checks: a candidate, or the reason the record is no usable lease."""
        try:
            lease = lease_from_record(rec)
        except LeaseFormatError as e:
            return str(e)
        bt = lease.attrs.backend_type
        if bt and bt not in self._types:
            return f"BackendType: unknown backend type {bt[:40]!r} (known: {', '.join(sorted(self._types))})"
        claims = self._claims_of(lease)
        problem = ((self._check_v4(lease, claims.span) if claims.span is not None else None)
                   or (self._check_v6(lease, claims.span6) if self._v6 else None))
        if problem:
            return problem
        odd = not lease_compatible(self.cfg, lease.subnet, lease.subnet6)
        return _Cand(key=rec.key, lease=lease, odd=odd, created=rec.create_revision, claims=claims,
                     revision=rec.revision)

    def _check_v4(self, lease: Lease, span: Span) -> str | None:
        """The IPv4 half: subnet inside Network, PublicIP another host's, BackendData."""
        sn, net = lease.subnet, self.cfg.network
        start, end, _plen = span
        assert self._net_span is not None
        if not (self._net_span[0] <= start and end <= self._net_span[1]):
            return f"subnet {sn} is outside the flannel Network {net}"
        if sn.prefixlen <= self._net_span[2]:
            return f"subnet {sn} is the whole flannel Network, not one host's part of it"
        if under := self._underlay_conflict(sn):
            return under
        pub = lease.attrs.public_ip
        if pub.is_unspecified or pub.is_loopback or pub.is_multicast or int(pub) == 0xFFFFFFFF:
            return f"PublicIP: {pub} cannot be another host's address"
        return check_backend_data(lease.attrs.backend_type, lease.attrs.backend_data)

    def _check_v6(self, lease: Lease, span6: Span | None) -> str | None:
        """The IPv6 half: subnet inside IPv6Network, PublicIPv6 another host's, BackendV6Data."""
        sn6, net6 = lease.subnet6, self.cfg.ipv6_network
        if sn6 is None or span6 is None:
            return None if self._v4 else f"no IPv6 subnet in the key: an IPv4-only lease in the IPv6-only network {net6}"
        start, end, _plen = span6
        assert self._net6_span is not None
        if not (self._net6_span[0] <= start and end <= self._net6_span[1]):
            return f"IPv6 subnet {sn6} is outside the flannel IPv6Network {net6}"
        if sn6.prefixlen <= self._net6_span[2]:
            return f"IPv6 subnet {sn6} is the whole flannel IPv6Network, not one host's part of it"
        if under := self._underlay_conflict(sn6):
            return under
        pub6 = lease.attrs.public_ipv6
        if pub6 is None:
            return f"PublicIPv6: missing, but the lease has the IPv6 subnet {sn6}"
        if pub6.is_unspecified or pub6.is_loopback or pub6.is_multicast or pub6.is_link_local:
            return f"PublicIPv6: {pub6} cannot be another host's address"
        return check_backend_v6_data(lease.attrs.backend_type, lease.attrs.backend_v6_data)

    def _claims_of(self, lease: Lease) -> _Claims:
        """The subnets and VtepMACs ``lease`` claims in this network's enabled families."""
        vxlan = lease.attrs.backend_type == "vxlan"
        v6 = self._v6 and lease.subnet6 is not None
        return _Claims(
            span=_span(lease.subnet) if self._v4 else None,
            span6=_span(lease.subnet6) if v6 else None,  # type: ignore[arg-type]
            mac=vtep_mac(lease.attrs.backend_data) if self._v4 and vxlan else None,
            mac6=vtep_mac(lease.attrs.backend_v6_data) if v6 and vxlan else None,
        )

    def _evaluate(self, key: str, bulk: bool = False) -> set[str]:
        """Re-run the per-lease checks of ``key``'s record (gone: drop it). Returns the keys whose
        status may change: the key and every candidate conflicting with its old or new version.
        ``bulk`` (reset): index without keeping the span lists sorted and without looking for
        conflicts; the caller sorts and settles everything."""
        dirty: set[str] = set()
        old = self._cands.pop(key, None)
        if old is not None:
            self._unindex(old)
            dirty |= self._conflicting(old.claims, key)
        rec = self._records.get(key)
        own = self._own is not None and key == self._own.key
        if rec is None or own:
            self._set_accepted(key, None)
            self._rejected.pop(key, None)
            return dirty
        c = self._check(rec)
        if isinstance(c, str):
            self._set_accepted(key, None)
            self._reject(key, c, rec.revision)
            return dirty
        self._cands[key] = c
        self._index(c, bulk)
        if not bulk:
            dirty |= self._conflicting(c.claims, key)
        dirty.add(key)
        return dirty

    # -- set checks ------------------------------------------------------------------------------
    def _settle(self, dirty: set[str]) -> None:
        """Bring the candidates in ``dirty`` (and whatever their change affects) to the greedy
        result: a candidate is accepted iff it conflicts with neither the own lease nor an accepted
        candidate that comes before it. Processing in (create_revision, key) order settles every
        earlier candidate before a later one looks at it."""
        heap = [(self._cands[k].order, k) for k in dirty if k in self._cands]
        heapq.heapify(heap)
        queued = {k for _, k in heap}
        while heap:
            _, key = heapq.heappop(heap)
            queued.discard(key)
            c = self._cands[key]
            others = [self._cands[k] for k in self._conflicting(c.claims, key)]
            reason = self._own_conflict(c)
            if reason is None:
                firsts = [d for d in others if d.order < c.order and d.key in self._accepted]
                if firsts:
                    reason = self._conflict_reason(c, min(firsts, key=lambda d: d.order))
            was = key in self._accepted
            if reason is None:
                self._set_accepted(key, c.lease)
                if self._rejected.pop(key, None) is not None:
                    log.info("lease entry accepted", key=self._shown(key))
            else:
                self._set_accepted(key, None)
                self._reject(key, reason, c.revision)
            if was != (reason is None):
                for d in others:
                    if d.order > c.order and d.key not in queued:
                        heapq.heappush(heap, (d.order, d.key))
                        queued.add(d.key)

    def _own_conflict(self, c: _Cand) -> str | None:
        own, cl, ocl = self._own, c.claims, self._own_claims
        if own is None:
            return None
        if _overlap(cl.span, ocl.span):
            return f"subnet {c.lease.subnet} overlaps this host's own subnet {own.subnet}"
        if _overlap(cl.span6, ocl.span6):
            return f"IPv6 subnet {c.lease.subnet6} overlaps this host's own IPv6 subnet {own.subnet6}"
        if cl.mac is not None and cl.mac == ocl.mac:
            return f"BackendData.VtepMAC {cl.mac} is this host's own VtepMAC"
        if cl.mac6 is not None and cl.mac6 == ocl.mac6:
            return f"BackendV6Data.VtepMAC {cl.mac6} is this host's own IPv6 VtepMAC"
        return None

    @staticmethod
    def _conflict_reason(c: _Cand, first: _Cand) -> str:
        fits = "which fits the network config (SubnetLen, SubnetMin..SubnetMax) and this one does not"
        created_first = first.order[1:] < c.order[1:]
        why, why_mac = ("which was created first", "created first") if created_first else (fits, fits)
        cl, fcl = c.claims, first.claims
        if _overlap(cl.span, fcl.span):
            return f"subnet {c.lease.subnet} overlaps the lease {first.key}, {why}"
        if _overlap(cl.span6, fcl.span6):
            return f"IPv6 subnet {c.lease.subnet6} overlaps the lease {first.key}, {why}"
        if cl.mac is not None and cl.mac == fcl.mac:
            return f"BackendData.VtepMAC {cl.mac} is already the VtepMAC of the lease {first.key}, {why_mac}"
        return f"BackendV6Data.VtepMAC {cl.mac6} is already the IPv6 VtepMAC of the lease {first.key}, {why_mac}"

    def _conflicting(self, cl: _Claims, exclude: str | None) -> set[str]:
        """Keys of the candidates whose claims intersect ``cl`` (an overlapping subnet of either
        family, or the same VtepMAC on the same family's device)."""
        out: set[str] = set()
        if cl.span is not None:
            out |= self._spans.overlapping(cl.span)
        if cl.span6 is not None:
            out |= self._spans6.overlapping(cl.span6)
        if cl.mac is not None:
            _index_get(self._by_mac[4], cl.mac, out)
        if cl.mac6 is not None:
            _index_get(self._by_mac[6], cl.mac6, out)
        out.discard(exclude)
        return out

    # -- bookkeeping -----------------------------------------------------------------------------
    def _index(self, c: _Cand, bulk: bool = False) -> None:
        cl = c.claims
        if cl.span is not None:
            self._spans.add(cl.span, c.key, bulk)
        if cl.span6 is not None:
            self._spans6.add(cl.span6, c.key, bulk)
        if cl.mac is not None:
            _index_add(self._by_mac[4], cl.mac, c.key)
        if cl.mac6 is not None:
            _index_add(self._by_mac[6], cl.mac6, c.key)

    def _unindex(self, c: _Cand) -> None:
        cl = c.claims
        if cl.span is not None:
            self._spans.remove(cl.span, c.key)
        if cl.span6 is not None:
            self._spans6.remove(cl.span6, c.key)
        if cl.mac is not None:
            _index_remove(self._by_mac[4], cl.mac, c.key)
        if cl.mac6 is not None:
            _index_remove(self._by_mac[6], cl.mac6, c.key)

    def _set_accepted(self, key: str, lease: Lease | None) -> None:
        if key not in self._before:
            self._before[key] = self._accepted.get(key)
        if lease is None:
            self._accepted.pop(key, None)
        else:
            self._accepted[key] = lease

    def _reject(self, key: str, reason: str, revision: int) -> None:
        self._rejected[key] = reason
        if self._warned.get(key) != (revision, reason):
            self._warned[key] = (revision, reason)
            metrics.LEASES_REJECTED.inc()
            log.warning("ignoring bad lease entry in etcd", key=self._shown(key), error=reason)

    def _shown(self, key: str) -> str:
        return self.subnets_path + log_key(key)

    def _finish(self) -> Changes:
        """The Changes of the operation that just ran (accepted before vs now, per touched key),
        each list in subnet order."""
        ch = Changes()
        for key, old in self._before.items():
            new = self._accepted.get(key)
            if old is not None and new is None:
                ch.removed.append(old)
            elif new is not None and new != old:
                ch.added.append(new)
        self._before = {}
        ch.removed.sort(key=_subnet_order)
        ch.added.sort(key=_subnet_order)
        return ch


def _subnet_order(le: Lease) -> tuple[int, int, int, str]:
    return int(le.subnet.network_address), le.subnet.prefixlen, int(le.subnet6.network_address) if le.subnet6 else -1, le.key


def _span(sn: IPv4Network | IPv6Network) -> Span:
    """First and last address of a subnet, as ints, and its prefix length."""
    start, plen = int(sn.network_address), sn.prefixlen
    return start, start | ((1 << (sn.max_prefixlen - plen)) - 1), plen


def _overlap(a: Span | None, b: Span | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


__all__ = ["Changes", "LeaseBook"]
