"""The backend interface: one class per backend type, registered by name.

Every backend is a peer-set backend: it holds ``peers`` (``Lease.peer_id`` → Lease: the remote
leases it has applied, shown by ``/peers``) and makes its data plane (kernel entries, forwarder
routes, a cloud route table) match them. Life cycle, driven by the daemon's converger (:mod:`pyflanneld.converge`),
all on the daemon's asyncio loop:

1. ``Backend(ctx)`` — no side effects.
2. ``await register()`` → :class:`BackendInfo` (MTU, lease BackendType, BackendData). Runs before
   the lease is written, so e.g. vxlan creates its device here to know its MAC. Runs again when
   the external interface changed (``ctx.ext`` is then the new one): it must be idempotent.
3. ``await start(own_lease)`` — the lease is ours; finish local setup (device address, …). Runs
   again when the own subnet or the external interface changed.
4. ``await update_peers(changed, removed, resync=…)`` — one batch of peer-set changes (the
   converger coalesces whatever arrived while it was busy). Few changes go peer by peer
   (``ensure_peer``/``drop_peer``, upstream's order); many, or ``resync=True``, go as one full pass
   (``resync``) that makes the data plane equal to ``peers`` — removing stale entries too. A
   backend without ``resync`` gets every change peer by peer, and ``reconcile()`` after a
   ``resync=True`` batch (the converger's relists and safety-net passes).
   ``set_peers``, ``add_peer`` and ``remove_peer`` are the same for a snapshot or one event.
5. ``await reconcile()`` — the safety-net full pass, every ``reconcile_interval`` seconds (0:
   only with relists). ``readiness()`` feeds /readyz at any time.
6. ``await close()`` on shutdown: stop background work; kernel state and leases stay.

``lock`` serialises all of this with the backend's own repair work: the public methods take it
themselves; the converger holds it (``async with backend.lock``) around ``register`` and ``start``.
A subclass implements ``register`` and, when peers need programming, ``ensure_peer``/``drop_peer``
and ``resync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar

import structlog

from ..config import ConfigError, NetworkConfig
from ..subnet.lease import Lease, LeaseAttrs

log = structlog.get_logger()

# Batches with more changes than this are applied as one full pass (batched kernel writes) rather
# than peer by peer: 5,000 joins become three dumps and a few large netlink batches.
BATCH_THRESHOLD = 16


class BackendError(Exception):
    """A user-facing backend failure: the message names the cause and the fix."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface the overlay runs over, as resolved from --iface/--iface-regex/... now.

    One address per IP family the network runs: ``ip``/``public_ip`` are None with IPv4 off
    (IPv6-only), ``ip6``/``public_ipv6`` None with IPv6 off."""

    name: str
    index: int
    ip: IPv4Address | None  # the interface's own IPv4 address
    public_ip: IPv4Address | None  # what peers use (= ip unless --public-ip)
    mtu: int
    ip6: IPv6Address | None = None  # the interface's global IPv6 address
    public_ipv6: IPv6Address | None = None  # what peers use over IPv6 (= ip6 unless --public-ipv6)
    # the prefixes of the interface's addresses (iface.underlay_networks): never a flannel subnet here
    networks: tuple = ()


@dataclass
class BackendContext:
    """What a backend is built from. ``ext`` is replaced when the external interface changes;
    ``previous_network`` is FLANNEL_NETWORK of the last run's subnet.env when it differs from
    the current Network (its leftovers are ours to remove), else None; ``previous_network6`` the
    same for FLANNEL_IPV6_NETWORK and IPv6Network."""

    config: NetworkConfig
    backend_config: dict[str, Any]  # the "Backend" object, keys as given
    ext: ExternalInterface
    options: Any  # pyflanneld.options.Options
    previous_network: IPv4Network | None = None
    previous_network6: IPv6Network | None = None


@dataclass(frozen=True)
class BackendInfo:
    """What a backend's ``register()`` returns: the MTU for subnet.env (bytes), the lease's BackendType,
    and the BackendData (and IPv6 half's BackendV6Data) published in the lease, as JSON values."""
    mtu: int
    backend_type: str  # goes into the lease's BackendType ("" for udp/alloc, as upstream)
    backend_data: Any = None
    backend_v6_data: Any = None  # the IPv6 half's data (vxlan: flannel-v6.<VNI>'s VNI and VtepMAC)


# PublicIP of a lease when IPv4 is off: upstream's zero IP4 (the key's IPv4 part is 0.0.0.0-0).
NO_PUBLIC_IP = IPv4Address(0)


def lease_attrs(ext: ExternalInterface, info: BackendInfo) -> LeaseAttrs:
    """What this host publishes in its lease (upstream's LeaseAttrs from the backend's
    RegisterNetwork): PublicIP (0.0.0.0 with IPv4 off), PublicIPv6 (with IPv6 on), the backend's
    type and data."""
    return LeaseAttrs(public_ip=ext.public_ip if ext.public_ip is not None else NO_PUBLIC_IP,
                      backend_type=info.backend_type, backend_data=info.backend_data,
                      public_ipv6=ext.public_ipv6, backend_v6_data=info.backend_v6_data)


def check_ip_families(cls: type[Backend], cfg: NetworkConfig) -> None:
    """Can backend ``cls`` run the config's IP families? BackendError (one line) for IPv6
    (EnableIPv6, dual stack or IPv6-only) with a backend that carries IPv4 only."""
    if cfg.enable_ipv6 and not cls.ipv6:
        raise BackendError(
            f"the {cls.type_name} backend carries IPv4 only and cannot run EnableIPv6 (dual stack or IPv6-only); "
            "use vxlan, host-gw or alloc for IPv6, or set EnableIPv6 to false")


PeerId = IPv4Network | IPv6Network  # Lease.peer_id: a peer's key in Backend.peers


def diff_peers(have: Mapping[PeerId, Lease], want: Iterable[Lease]) -> tuple[list[Lease], list[Lease]]:
    """(changed, removed) that turn ``have`` into ``want``: new or different leases, and the
    leases of ``have`` whose subnet is not wanted any more. O(len(have) + len(want))."""
    wanted: dict[PeerId, Lease] = {}
    changed = []
    for le in want:
        wanted[le.peer_id] = le
        old = have.get(le.peer_id)
        if old is not le and old != le:
            changed.append(le)
    removed = [le for sn, le in have.items() if sn not in wanted]
    return changed, removed


async def in_daemon_thread(fn: Any, *args: Any, name: str | None = None) -> Any:
    """Run the blocking call ``fn(*args)`` in a daemon thread (named ``name``, default fn's name)
    and await its result; what it raises is raised here. Unlike ``asyncio.to_thread`` (the loop's
    executor, whose threads ``asyncio.run`` waits for at exit), a call that hangs never delays the
    daemon's exit. Used for the udp forwarder's stop and the cloud SDK calls."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return  # the caller was cancelled meanwhile
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def work() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name=name or getattr(fn, "__name__", "blocking"), daemon=True).start()
    return await fut


class Backend:
    """Base of every backend: the peer set, its batching, and no-op hooks (see the module docstring)."""

    type_name: ClassVar[str] = ""
    reconcile_interval: ClassVar[float] = 0.0
    # Does it carry IPv6 (EnableIPv6: dual stack and IPv6-only)? Upstream's etcd mode gives every
    # backend an IPv6 subnet then, but only vxlan and host-gw route it (its kube mode forces the
    # others' leases IPv4-only): here the others refuse such a config (check_ip_families).
    ipv6: ClassVar[bool] = False

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.own_lease: Lease | None = None
        self.peers: dict[PeerId, Lease] = {}  # Lease.peer_id → lease
        self.lock = asyncio.Lock()
        self.have_snapshot = False  # a full peer set was given at least once (resync may remove entries)
        # True while a full pass runs that applies no lease change (the safety net, a relist that
        # changed nothing, a repair after a netlink event): whatever it changes had drifted.
        self.repairing = True

    @property
    def network(self) -> IPv4Network:
        """The IPv4 Network (None with IPv4 off: only backends with ``ipv6`` see that)."""
        return self.ctx.config.network  # type: ignore[return-value]

    # --- what a backend implements -----------------------------------------------------------
    async def register(self) -> BackendInfo:
        """MTU and lease data for the current ``ctx.ext``; idempotent. Raises BackendError."""
        raise NotImplementedError

    async def start(self, own_lease: Lease) -> None:
        """Set up for the own lease (again after a subnet or interface change). Raises BackendError."""
        self.own_lease = own_lease

    async def ensure_peer(self, lease: Lease) -> None:
        """Program one remote lease (idempotent). Errors are logged by the caller, never raised on."""

    async def drop_peer(self, lease: Lease) -> None:
        """Undo ``ensure_peer`` for a lease that left (or changed)."""

    async def resync(self, reason: str) -> None:
        """Make the whole data plane match ``peers`` (called with ``lock`` held); default: nothing."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz, beyond the lease: e.g. a cloud route not yet in place."""
        return True, ""

    async def close(self) -> None:
        """Stop background work; kernel state and leases stay."""

    async def forwarder_counters(self) -> dict[str, int]:
        """A userspace forwarder's packet counters for /metrics (udp: its workers' Stats summed,
        see :func:`pyflanneld.metrics.forwarder_families`); {} for a kernel data plane."""
        return {}

    # --- the peer set (called by the daemon; take the lock) -----------------------------------
    async def update_peers(self, changed: Sequence[Lease], removed: Sequence[Lease], *,
                           resync: bool = False, reason: str = "peers") -> None:
        """Apply one batch: ``changed`` leases are new or differ from what ``peers`` holds (an old
        lease of the same subnet is dropped first), ``removed`` are gone. ``resync``: the batch
        completes a full snapshot — follow it with a full pass, which also removes stale entries."""
        async with self.lock:
            stale = []
            for le in removed:
                old = self.peers.pop(le.peer_id, None)
                stale.append(old or le)
            for le in changed:
                old = self.peers.get(le.peer_id)
                if old is not None and (old.attrs != le.attrs or old.key != le.key):
                    stale.append(old)
                self.peers[le.peer_id] = le
            if resync:
                self.have_snapshot = True
            if self._full_pass and self.needs_full_pass(len(changed) + len(removed), resync):
                self.repairing = not (changed or removed)
                await self.resync(reason if resync else "batch")
                return
            await self.apply_peers(stale, changed)
        if resync and not self._full_pass:
            await self.reconcile()  # a backend without a full pass has its own safety net

    def needs_full_pass(self, changes: int, resync: bool) -> bool:
        """Is a batch of ``changes`` applied by a full pass (``resync``) rather than peer by peer?
        Default: snapshots, and batches larger than :data:`BATCH_THRESHOLD`."""
        return resync or changes > BATCH_THRESHOLD

    async def apply_peers(self, stale: Sequence[Lease], changed: Sequence[Lease]) -> None:
        """Program one batch peer by peer (the lock is held): ``drop_peer`` for each stale lease,
        then ``ensure_peer`` for each changed one (upstream's way); a failure is logged and skipped."""
        for old in stale:
            await self._safe(self.drop_peer, old)
        for le in changed:
            await self._safe(self.ensure_peer, le)

    @property
    def _full_pass(self) -> bool:
        """Does this backend implement ``resync`` (a full pass over ``peers``)?"""
        return type(self).resync is not Backend.resync

    async def set_peers(self, leases: Sequence[Lease]) -> None:
        """The full peer set (a snapshot): apply the difference, then a full pass."""
        changed, removed = diff_peers(self.peers, leases)
        await self.update_peers(changed, removed, resync=True, reason="set_peers")

    async def add_peer(self, lease: Lease) -> None:
        """One lease added or changed."""
        await self.update_peers([lease], [])

    async def remove_peer(self, lease: Lease) -> None:
        """One lease removed."""
        await self.update_peers([], [lease])

    async def reconcile(self) -> None:
        """The safety-net full pass."""
        async with self.lock:
            self.repairing = True
            await self.resync("timer")

    async def _safe(self, fn, lease: Lease) -> None:
        """One bad peer never stops the others: log and carry on (the next full pass retries)."""
        try:
            await fn(lease)
        except Exception as e:  # noqa: BLE001
            log.warning("peer programming failed", subnet=str(lease.subnet),
                        public_ip=str(lease.attrs.public_ip), fn=fn.__name__, error=str(e))


class PeerSetBackend(Backend):
    """A backend that programs something per peer: implement ``ensure_peer`` and ``drop_peer``."""

    async def ensure_peer(self, lease: Lease) -> None:
        raise NotImplementedError

    async def drop_peer(self, lease: Lease) -> None:
        raise NotImplementedError


_REGISTRY: dict[str, type[Backend]] = {}

# Backend.Type (lower case) → the module of this package that defines it. Only the configured
# type's module is imported (a module registers its class on import): the others would cost
# memory and start-up time for nothing (the cloud backends bring httpx, udp its supervisor, …;
# ~7 MiB resident in all). A new backend adds its line here.
BACKEND_MODULES: dict[str, str] = {
    "alloc": "alloc",
    "vxlan": "vxlan",
    "host-gw": "hostgw",
    "udp": "udp",
    "aws-vpc": "awsvpc",
    "gce": "gce",
    "extension": "extension",
    "wireguard": "wireguard",
    "ipip": "ipip",
    "ipsec": "ipsec",
}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` the backend for ``cls.type_name`` (case-insensitive)."""
    _REGISTRY[cls.type_name.lower()] = cls
    return cls


def backend_class(type_name: str) -> type[Backend]:
    """The backend class for a config's Backend.Type (its module imported now); BackendError when
    unknown."""
    name = type_name.lower()
    if name not in _REGISTRY and name in BACKEND_MODULES:
        importlib.import_module(f"{__package__}.{BACKEND_MODULES[name]}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend type: {type_name}") from None


def registered_types() -> list[str]:
    """The known Backend.Type names, sorted (without importing their modules)."""
    return sorted(BACKEND_MODULES.keys() | _REGISTRY.keys())


def check_config(cfg: NetworkConfig) -> type[Backend]:
    """What flannel checks of a parsed config beyond its own fields (upstream: the backend
    manager's lookup in ``main.go`` plus the IP-family checks of the backends): ``cfg``'s
    Backend.Type is a known backend that carries the config's IP families. Returns that
    backend's class; raises ConfigError (one line; an unknown type lists the known ones). Used
    by the daemon (Daemon.get_config) and by ``pyflanneld config validate|set``."""
    try:
        cls = backend_class(cfg.backend_type)
    except BackendError as e:
        raise ConfigError(f"{e}; known types: {', '.join(registered_types())}") from None
    try:
        check_ip_families(cls, cfg)
    except BackendError as e:
        raise ConfigError(str(e)) from None
    return cls
