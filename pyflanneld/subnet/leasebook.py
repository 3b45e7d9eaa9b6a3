"""The validation gate: which records under ``<prefix>/subnets/`` are peers this host may program.

Everything read from etcd is untrusted. A key anyone can write must not reach the kernel unless it
is a lease a flannel host could have written and does not collide with what is already in use:

Per lease (its record alone, plus the network config):
  * the key parses (``10.5.1.0-24``, dual stack ``10.5.1.0-24&fd80:0:0:1::-64``), the value decodes
    (bounded JSON), PublicIP is an IPv4 string (missing, a number or a boolean are refused, as
    upstream's ip.IP4 decoder refuses them), BackendType is a string;
  * the subnet lies inside Network and is smaller than it (the IPv6 subnet inside IPv6Network once
    IPv6 is configured); PublicIP is a unicast address (not 0.0.0.0, loopback or multicast);
  * BackendType is a registered backend's name, or "" (udp and alloc leases carry none);
  * BackendData is valid for that backend (lease.check_backend_data; vxlan: a unicast, non-zero
    6-byte VtepMAC and a 16-bit VNI).

Against the others (the set of valid leases, "candidates"):
  * no overlap with this host's own subnet, and no VtepMAC equal to this host's own;
  * no overlap with, and no VtepMAC of, another accepted lease. Of two conflicting leases a lease
    the network config could have handed out (``NetworkConfig.contains_subnet``; no IPv6 part in an
    IPv4-only network) wins over one it could not; among equals the one created first wins: lower
    ``Record.create_revision``, then the key. Flannel hosts never write conflicting leases of the
    config's shape (they would be the same key), so the config rule decides every overlap between a
    host's lease and a stray one for all hosts alike, even when the host's key has a newer
    create_revision than the stray's (etcd v2 gives a key a new createdIndex on every plain set,
    which is how upstream v0.17 renews). The result is a function of the candidates alone (greedy
    in that order), so it does not depend on the order events arrive in, and a relist gives the
    same answer as the events did. When a winner goes, its losers are evaluated again (and may win).

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
from ipaddress import IPv4Network
from types import MappingProxyType

import structlog

from ..config import NetworkConfig
from .lease import Lease, LeaseFormatError, check_backend_data, lease_from_record, log_key, vtep_mac
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


@dataclass(eq=False)
class _Cand:
    """A lease that passed the per-lease checks, with what the set checks need."""

    key: str
    lease: Lease
    order: tuple[bool, int, str]  # (not of the config's shape, create_revision, key): lower wins
    start: int  # first and last IPv4 address of the subnet, as ints
    end: int
    plen: int
    mac: str | None  # normalised VtepMAC (vxlan leases only)
    revision: int  # mod revision: one warning per change


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


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
        self._net_span = _span(cfg.network)
        self._own: Lease | None = None
        self._own_mac: str | None = None
        self._records: dict[str, Record] = {}
        self._cands: dict[str, _Cand] = {}
        self._by_cidr: dict[tuple[int, int], set[str]] = {}  # (start, prefix length) → keys
        self._starts: list[tuple[int, int, str]] = []  # (start, prefix length, key), sorted
        self._plens: dict[int, int] = {}  # prefix length → number of candidates with it
        self._by_mac: dict[str, set[str]] = {}
        self._accepted: dict[str, Lease] = {}
        self._rejected: dict[str, str] = {}
        self._warned: dict[str, tuple[int, str]] = {}  # key → (mod revision, reason) last warned
        self._before: dict[str, Lease | None] = {}  # accepted state of keys touched by this operation
        self.accepted: Mapping[str, Lease] = MappingProxyType(self._accepted)
        self.rejected: Mapping[str, str] = MappingProxyType(self._rejected)

    # -- public operations ---------------------------------------------------------------------
    @property
    def own(self) -> Lease | None:
        return self._own

    def set_own(self, lease: Lease | None) -> Changes:
        """This host's lease (None: none yet). Its key is never a peer; a former own key that is
        still in the book becomes a candidate like any other."""
        old = self._own
        self._own = lease
        self._own_mac = _mac_of(lease) if lease is not None else None
        dirty: set[str] = set()
        for o in (old, lease):
            if o is not None:
                start, end = _span(o.subnet)
                dirty |= self._conflicting(start, end, o.subnet.prefixlen, _mac_of(o), None)
        for key in {o.key for o in (old, lease) if o is not None}:
            dirty |= self._evaluate(key)
        self._settle(dirty)
        return self._finish()

    def reset(self, records: Iterable[Record]) -> Changes:
        """Replace everything with a relist's records."""
        before = dict(self._accepted)
        self._records = {r.key: r for r in records}
        self._cands.clear()
        self._by_cidr.clear()
        self._starts.clear()
        self._plens.clear()
        self._by_mac.clear()
        self._accepted.clear()
        self._warned = {k: v for k, v in self._warned.items() if k in self._records}
        old_rejected = dict(self._rejected)
        self._rejected.clear()
        for key in self._records:
            self._evaluate(key, bulk=True)
        self._starts.sort()
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
        sn, net = lease.subnet, self.cfg.network
        start, end = _span(sn)
        if not (self._net_span[0] <= start and end <= self._net_span[1]):
            return f"subnet {sn} is outside the flannel Network {net}"
        if sn.prefixlen <= net.prefixlen:
            return f"subnet {sn} is the whole flannel Network, not one host's part of it"
        # IPv6 (phase 2): with an IPv6Network configured, the IPv6 subnet must lie inside it.
        net6 = self.cfg.ipv6_network
        if lease.subnet6 is not None and net6 is not None and not lease.subnet6.subnet_of(net6):
            return f"IPv6 subnet {lease.subnet6} is outside the flannel IPv6Network {net6}"
        pub = lease.attrs.public_ip
        if pub.is_unspecified or pub.is_loopback or pub.is_multicast or int(pub) == 0xFFFFFFFF:
            return f"PublicIP: {pub} cannot be another host's address"
        bt = lease.attrs.backend_type
        if bt and bt not in self._types:
            return f"BackendType: unknown backend type {bt[:40]!r} (known: {', '.join(sorted(self._types))})"
        problem = check_backend_data(bt, lease.attrs.backend_data)
        if problem:
            return problem
        odd = not self.cfg.contains_subnet(sn) or (lease.subnet6 is not None and not self.cfg.enable_ipv6)
        return _Cand(key=rec.key, lease=lease, order=(odd, rec.create_revision, rec.key), start=start,
                     end=end, plen=sn.prefixlen, mac=_mac_of(lease), revision=rec.revision)

    def _evaluate(self, key: str, bulk: bool = False) -> set[str]:
        """Re-run the per-lease checks of ``key``'s record (gone: drop it). Returns the keys whose
        status may change: the key and every candidate conflicting with its old or new version.
        ``bulk`` (reset): index without keeping ``_starts`` sorted and without looking for
        conflicts; the caller sorts and settles everything."""
        dirty: set[str] = set()
        old = self._cands.pop(key, None)
        if old is not None:
            self._unindex(old)
            dirty |= self._conflicting(old.start, old.end, old.plen, old.mac, key)
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
            dirty |= self._conflicting(c.start, c.end, c.plen, c.mac, key)
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
            others = [self._cands[k] for k in self._conflicting(c.start, c.end, c.plen, c.mac, key)]
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
        own = self._own
        if own is None:
            return None
        if c.lease.subnet.overlaps(own.subnet):
            return f"subnet {c.lease.subnet} overlaps this host's own subnet {own.subnet}"
        if c.mac is not None and c.mac == self._own_mac:
            return f"BackendData.VtepMAC {c.mac} is this host's own VtepMAC"
        return None

    @staticmethod
    def _conflict_reason(c: _Cand, first: _Cand) -> str:
        fits = "which fits the network config (SubnetLen, SubnetMin..SubnetMax) and this one does not"
        created_first = first.order[1:] < c.order[1:]
        if c.start <= first.end and first.start <= c.end:
            why = "which was created first" if created_first else fits
            return f"subnet {c.lease.subnet} overlaps the lease {first.key}, {why}"
        why = "created first" if created_first else fits
        return f"BackendData.VtepMAC {c.mac} is already the VtepMAC of the lease {first.key}, {why}"

    def _conflicting(self, start: int, end: int, plen: int, mac: str | None, exclude: str | None) -> set[str]:
        """Keys of the candidates whose subnet overlaps [start, end] (a /plen) or whose VtepMAC is
        ``mac``. Two CIDR blocks overlap iff one contains the other: the containing ones are found
        by their (start, length), the contained ones by their start."""
        out: set[str] = set()
        for p in self._plens:
            if p < plen:
                out |= self._by_cidr.get((start & _mask(p), p), set())
        i = bisect_left(self._starts, (start,))
        while i < len(self._starts) and self._starts[i][0] <= end:
            out.add(self._starts[i][2])
            i += 1
        if mac is not None:
            out |= self._by_mac.get(mac, set())
        out.discard(exclude)
        return out

    # -- bookkeeping -----------------------------------------------------------------------------
    def _index(self, c: _Cand, bulk: bool = False) -> None:
        self._by_cidr.setdefault((c.start, c.plen), set()).add(c.key)
        if bulk:
            self._starts.append((c.start, c.plen, c.key))
        else:
            insort(self._starts, (c.start, c.plen, c.key))
        self._plens[c.plen] = self._plens.get(c.plen, 0) + 1
        if c.mac is not None:
            self._by_mac.setdefault(c.mac, set()).add(c.key)

    def _unindex(self, c: _Cand) -> None:
        keys = self._by_cidr[(c.start, c.plen)]
        keys.discard(c.key)
        if not keys:
            del self._by_cidr[(c.start, c.plen)]
        del self._starts[bisect_left(self._starts, (c.start, c.plen, c.key))]
        self._plens[c.plen] -= 1
        if not self._plens[c.plen]:
            del self._plens[c.plen]
        if c.mac is not None:
            macs = self._by_mac[c.mac]
            macs.discard(c.key)
            if not macs:
                del self._by_mac[c.mac]

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


def _subnet_order(le: Lease) -> tuple[int, int, str]:
    return int(le.subnet.network_address), le.subnet.prefixlen, le.key


def _span(sn: IPv4Network) -> tuple[int, int]:
    """First and last address of a subnet, as ints."""
    start = int(sn.network_address)
    return start, start | (~_mask(sn.prefixlen) & 0xFFFFFFFF)


def _mac_of(lease: Lease) -> str | None:
    """The VtepMAC that a vxlan lease claims (other types claim none)."""
    return vtep_mac(lease.attrs.backend_data) if lease.attrs.backend_type == "vxlan" else None


__all__ = ["Changes", "LeaseBook"]
