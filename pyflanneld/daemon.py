"""The daemon: one asyncio loop from start to ready to shutdown (upstream main.go's order).

options → datastore + network config → interface → backend.register (MTU, BackendData) → lease →
backend.start → traffic rules → [keep the lease; watch → book; converge → backend, subnet.env,
readiness → READY=1; interface monitor; iptables resync]. See :mod:`pyflanneld.converge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import Any, NamedTuple

import structlog

from . import __version__, iface, metrics, sdnotify, subnetenv
from .backend import Backend, BackendContext, BackendError, ExternalInterface, backend_class
from .backend.base import check_config, lease_attrs
from .config import ConfigError, NetworkConfig, parse_config
from .converge import Converger
from .health import HealthServer, Response
from .iptables_hints import IptablesHints
from .options import Options
from .subnet.etcd_common import EtcdSettings
from .subnet.etcdv3 import EtcdV3Store
from .subnet.lease import Lease, log_key
from .subnet.manager import HOW_TO_SET, SubnetManager
from .subnet.store import Store, StoreError, find_config
from .trafficmngr import RulesError, TrafficManager, traffic_manager

log = structlog.get_logger()


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (tuning/tests), else default."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


# Seconds between runtime checks of <prefix>/config (upstream never re-reads it);
# PYFLANNELD_CONFIG_RECHECK overrides it (the fault tests use 1 s).
CONFIG_RECHECK = _env_seconds("PYFLANNELD_CONFIG_RECHECK", 30.0)
# The converger's safety-net period for backends without a reconcile interval (alloc, cloud).
SAFETY_NET_PERIOD = 10.0


class FatalError(Exception):
    """Setup failed in a way retrying cannot fix: exit 1 with this one line."""


class Daemon:
    """pyflanneld's life: :meth:`run` starts (config, interface, backend, lease), then keeps the
    lease, the book of leases and the converger running until a signal."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.not_ready_reason = "starting"
        self.store: Store | None = None
        self.manager: SubnetManager | None = None
        self.backend: Backend | None = None
        self.rules: TrafficManager | None = None
        self.converger: Converger | None = None
        self.config: NetworkConfig | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._factories: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self.started = time.monotonic()

    # -- helpers -------------------------------------------------------------------------------
    def settings(self) -> EtcdSettings:
        """The etcd connection settings from the options; FatalError on bad endpoints."""
        try:
            return EtcdSettings.from_flags(
                endpoints=self.o.etcd_endpoints, prefix=self.o.etcd_prefix, cafile=self.o.etcd_cafile,
                certfile=self.o.etcd_certfile, keyfile=self.o.etcd_keyfile,
                username=self.o.etcd_username, password=self.o.etcd_password)
        except ValueError as e:
            raise FatalError(f"--etcd-endpoints: {e}") from None

    def readiness(self) -> tuple[bool, str]:
        """(ready, detail) for /readyz. Not ready: the first false fact (before the converger runs,
        the startup phase's reason). Ready: rejected lease entries, if any (they are someone else's
        problem and never programmed, so they do not make this host unready)."""
        if self.converger is None:
            return False, self.not_ready_reason
        ok, why = self.converger.readiness()
        if not ok or self.manager is None or not self.manager.book.rejected:
            return ok, why
        return True, rejected_summary(self.manager.book.subnets_path, self.manager.book.rejected)

    def peers(self) -> list[dict]:
        """/peers: the remote leases the backend has applied, sorted by subnet."""
        known = self.backend.peers.values() if self.backend is not None else ()
        return [peer_json(le) for le in sorted(known, key=lambda le: le.peer_id)]

    def metrics_state(self) -> metrics.State:
        """What the /metrics gauges show now (readiness as /readyz, the applied peers, the own lease)."""
        lease = self.manager.lease if self.manager is not None else None
        backend = self.backend
        return metrics.State(
            ready=self.readiness()[0], backend=backend.type_name if backend is not None else "",
            peers=len(backend.peers) if backend is not None else 0,
            subnet=str(lease.subnet) if lease is not None else "",
            public_ip=str(lease.attrs.public_ip) if lease is not None else "",
            lease_expiry_s=lease.expiration if lease is not None and not lease.reserved else None)

    async def serve_metrics(self) -> Response:
        """/metrics: Prometheus text format (see :mod:`pyflanneld.metrics`)."""
        forwarder = await self.backend.forwarder_counters() if self.backend is not None else {}
        return Response(200, metrics.render(self.metrics_state(), forwarder), metrics.CONTENT_TYPE)

    def _notify(self, full: bool) -> None:
        if self.converger is not None:
            self.converger.wake(full=full)

    # -- startup phases ------------------------------------------------------------------------
    async def get_config(self, settings: EtcdSettings) -> tuple[Store, NetworkConfig]:
        """Find the config (v3 first, then v2 under --etcd-api auto); retry every second, log on change."""
        api = self.o.etcd_api.lower()
        if api not in ("auto", "v3", "v2"):
            raise FatalError(f"--etcd-api {self.o.etcd_api!r}: use auto, v3 or v2")
        v3 = EtcdV3Store(settings) if api in ("auto", "v3") else None
        v2 = None

        def stores():
            nonlocal v2
            if v3 is not None:
                yield v3
            if api in ("auto", "v2"):
                if v2 is None:  # imported on demand: httpx costs memory a v3 cluster never needs
                    from .subnet.etcdv2 import EtcdV2Store
                    v2 = EtcdV2Store(settings)
                yield v2

        async def fetch() -> tuple[Store, NetworkConfig] | str:
            """The store and its checked config, or the problem (one line) to retry on."""
            try:
                store, raw = await find_config(stores())
            except StoreError as e:
                metrics.DATASTORE_ERRORS.labels("config").inc()
                # each store's message names its API ("etcd v3 API at …"): find_config keeps both
                return f"cannot read the network config: {e}"
            if raw is None:
                apis = "v3 or v2 API" if api == "auto" else f"{api} API"
                return (f"network config not found at {settings.prefix}/config ({apis}); create it with "
                        + HOW_TO_SET.format(prefix=settings.prefix))
            try:
                cfg = parse_config(raw)
                check_config(cfg)
            except ConfigError as e:
                return (f"invalid network config at {settings.prefix}/config (etcd {store.api}): {e}; "
                        f"fix it with {HOW_TO_SET.format(prefix=settings.prefix)}")
            return store, cfg

        last, last_at = "", 0.0
        while True:
            found = await fetch()
            if not isinstance(found, str):
                store, cfg = found
                for other in (v3, v2):
                    if other is not None and other is not store:
                        await other.close()
                log.info("found network config", backend_type=cfg.backend_type, network=str(cfg.network),
                         etcd_api=store.api, subnet_len=cfg.subnet_len,
                         **({"ipv6_network": str(cfg.ipv6_network), "ipv6_subnet_len": cfg.ipv6_subnet_len}
                            if cfg.enable_ipv6 else {}))
                return found
            problem = found
            self.not_ready_reason = problem
            if problem != last or time.monotonic() - last_at > 30:
                log.error("couldn't fetch network config, retrying every second", error=problem)
                last, last_at = problem, time.monotonic()
            else:  # -v 1 shows each of the silent retries
                log.debug("network config still not fetched; retrying", error=problem)
            await asyncio.sleep(1)

    async def resolve_interface(self) -> ExternalInterface:
        """The external interface by the operator's rule, now (upstream LookupExtIface order);
        raises iface.InterfaceError naming the flag when nothing matches."""
        assert self.config is not None
        # iface.select reads the host through netlink.HostView, which blocks: keep it off our loop.
        found = await asyncio.to_thread(functools.partial(
            iface.select, self.o.iface, self.o.iface_regex, self.o.iface_can_reach,
            ipv4=self.config.enable_ipv4, ipv6=self.config.enable_ipv6))
        public, public6 = iface.public_addresses(found, self.o.public_ip, self.o.public_ipv6)
        networks = await asyncio.to_thread(iface.underlay_networks, found.index)
        return ExternalInterface(name=found.name, index=found.index, ip=found.ip, public_ip=public, mtu=found.mtu,
                                 ip6=found.ip6, public_ipv6=public6, networks=networks)

    async def external_interface(self) -> ExternalInterface:
        """The interface at startup: no match is fatal (the flags are wrong), as upstream."""
        try:
            ext = await self.resolve_interface()
        except iface.InterfaceError as e:
            raise FatalError(str(e)) from None
        log.info("using interface", name=ext.name, mtu=ext.mtu, **({"address": str(ext.ip)} if ext.ip else {}),
                 **({"address6": str(ext.ip6)} if ext.ip6 else {}))
        if not self.o.public_ip and ext.ip is not None:
            log.info("defaulting external address to interface address", public_ip=str(ext.public_ip))
        if not self.o.public_ipv6 and ext.ip6 is not None:
            log.info("defaulting external v6 address to interface address", public_ipv6=str(ext.public_ipv6))
        return ext

    async def _setup_rules(self, lease: Lease, prev: Previous) -> None:
        """iptables or nftables rules (EnableNFTables) for every enabled family, installed;
        RulesError if that mode cannot work."""
        assert self.config is not None
        cfg = self.config
        self.rules = traffic_manager(cfg, self.o, lease.subnet if cfg.enable_ipv4 else None, prev.network,
                                     prev.subnet, own_subnet6=lease.subnet6, prev_network6=prev.network6,
                                     prev_subnet6=prev.subnet6)
        await self.rules.setup()

    async def _on_subnet(self, lease: Lease, previous: Lease | None) -> None:
        """The converger moved the backend to a new own subnet: the rules follow (the blackhole
        loop follows ``converger.applied`` by itself)."""
        if self.rules is None:
            return
        assert self.config is not None
        with contextlib.suppress(Exception):
            await self.rules.close()
        cfg = self.config
        prev = Previous(cfg.network, previous.subnet if previous else None,
                        cfg.ipv6_network, previous.subnet6 if previous else None)
        try:
            await self._setup_rules(lease, prev)
        except RulesError as e:
            log.error("cannot install the rules for the new subnet", error=str(e))
        self._spawn("iptables-resync", self.rules.run)

    def _on_ready(self) -> None:
        assert self.converger is not None and self.converger.applied is not None and self.config is not None
        assert self.backend is not None
        elapsed = time.monotonic() - self.started
        ext = self.backend.ctx.ext
        log.info("flannel is ready", subnet=str(self.converger.applied), backend=self.config.backend_type,
                 public_ip=str(ext.public_ip if ext.public_ip is not None else ext.public_ipv6),
                 seconds=round(elapsed, 3))
        with contextlib.suppress(OSError):
            sdnotify.notify("READY=1")

    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task:
        """Run a restartable background loop; `factory()` makes a fresh coroutine (see _watch_tasks)."""
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()
        self._factories[name] = factory
        t = asyncio.create_task(factory(), name=name)
        self._tasks[name] = t
        return t

    async def _interface_monitor(self) -> None:
        """Link and address changes (a NIC deleted and re-created, an address moved): the converger
        resolves the interface again. Our own devices (flannel*) are not news."""
        from .netlink import NetlinkMonitor

        ipv6 = self.config is not None and self.config.enable_ipv6
        mon = NetlinkMonitor(rcvbuf=1024 * 1024, groups=NetlinkMonitor.LINKS_AND_ADDRESSES
                             | (NetlinkMonitor.IPV6_ADDRESSES if ipv6 else 0))
        try:
            async for ev in mon.events():
                if ev.kind == "link" and (ev.name or "").startswith("flannel"):
                    continue
                if self.converger is not None:
                    # The kernel drops the routes through a NIC that goes down (or loses an address)
                    # without an RTM_DELROUTE: a full pass puts ours back as soon as it is usable
                    # again, not at the next timer.
                    ext = self.backend.ctx.ext if self.backend is not None else None
                    self.converger.wake(full=ext is not None and ev.ifindex == ext.index, iface=True)
        finally:
            mon.close()

    async def _blackhole_loop(self) -> None:
        """--ip-blackhole-route: keep `blackhole <own subnet>` (each enabled family's) in place
        (checked every resync period); after a subnet change the old subnet's blackhole route goes."""
        from .netlink import Netlink, NetlinkError

        nl = Netlink()
        current: list[IPv4Network | IPv6Network] = []
        try:
            while True:
                applied = self.converger.applied if self.converger is not None else None
                want = own_subnets(applied, self.config) if applied is not None else []
                try:
                    for sn in current:
                        if sn not in want:
                            await nl.delete_blackhole(sn)
                            log.info("blackhole route removed", subnet=str(sn))
                    repairing = [sn for sn in want if sn in current]  # in place before
                    current = want
                    for sn in want:
                        if await nl.ensure_blackhole(sn):
                            log.info("blackhole route added", subnet=str(sn))
                            if sn in repairing:
                                metrics.KERNEL_REPAIRS.labels("route").inc()
                except NetlinkError as e:
                    log.warning("cannot set the blackhole route", subnet=" ".join(map(str, want)), error=str(e))
                await asyncio.sleep(self.o.iptables_resync_s)
        finally:
            await nl.close()

    async def _config_recheck_loop(self) -> None:
        assert self.store is not None and self.config is not None
        warned = self.config.raw
        while True:
            await asyncio.sleep(CONFIG_RECHECK)
            try:
                raw = await self.store.get_config()
            except StoreError:
                metrics.DATASTORE_ERRORS.labels("config").inc()
                continue
            text = (raw or b"").decode("utf-8", "replace")
            log.debug("network config rechecked", running=text == self.config.raw)
            if text == self.config.raw or text == warned:
                continue
            warned = text
            try:
                if raw is None:
                    raise ConfigError("the key was deleted")
                parse_config(raw)
                log.warning("network config changed in etcd; restart pyflanneld to apply it (keeping the running config)")
            except ConfigError as e:
                log.warning("network config in etcd is now invalid; keeping the running config", error=str(e))

    async def start(self) -> None:
        """Config, interface, backend, lease (retried until they come), then the background work;
        READY=1 follows from the converger once every readiness fact holds."""
        settings = self.settings()
        self.store, self.config = await self.get_config(settings)
        cfg = self.config
        ext = await self.external_interface()
        if os.geteuid() != 0 and cfg.backend_type.lower() != "alloc":
            raise FatalError("pyflanneld must run as root to program the kernel (devices, routes); "
                             "run it as root or as the systemd service")
        prev = Previous(*subnetenv.previous(self.o.subnet_file), *subnetenv.previous_ipv6(self.o.subnet_file))
        cls = backend_class(cfg.backend_type)
        ctx = BackendContext(config=cfg, backend_config=cfg.backend, ext=ext, options=self.o,
                             previous_network=prev.network if prev.network != cfg.network else None,
                             previous_network6=prev.network6 if prev.network6 != cfg.ipv6_network else None)
        try:
            self.backend = backend = cls(ctx)
            info = await backend.register()
        except BackendError as e:
            raise FatalError(f"{cfg.backend_type} backend: {e}") from None

        self.manager = manager = SubnetManager(
            self.store, cfg, ttl_s=int(self.o.subnet_lease_ttl_s),
            renew_margin_s=self.o.subnet_lease_renew_margin_s,
            prev_subnet=prev.subnet, prev_subnet6=prev.subnet6,
            renew_retry_s=min(60.0, max(1.0, self.o.subnet_lease_ttl_s / 10)), prefix=settings.prefix,
            notify=self._notify,
        )

        for net in (cfg.network, cfg.ipv6_network):
            under = [str(n) for n in ext.networks if net is not None and n.version == net.version and n.overlaps(net)]
            if under:
                log.warning("the flannel network overlaps this host's underlay; no subnet there is leased or "
                            "programmed on this host (give flannel a network apart from the hosts')",
                            network=str(net), underlay=",".join(under), interface=ext.name)
        manager.book.set_host_networks(ext.networks)

        def not_ready(msg: str) -> None:
            self.not_ready_reason = msg

        lease = await manager.acquire(lease_attrs(ext, info), on_error=not_ready)
        try:
            async with backend.lock:
                await backend.start(lease)
        except BackendError as e:
            raise FatalError(f"{cfg.backend_type} backend: {e}") from None
        try:
            await self._setup_rules(lease, prev)
        except RulesError as e:
            raise FatalError(str(e)) from None
        self.converger = Converger(
            manager, backend, info, network=cfg.network, network6=cfg.ipv6_network, subnet_file=self.o.subnet_file,
            ip_masq=self.o.ip_masq, period_s=backend.reconcile_interval or SAFETY_NET_PERIOD,
            resolve_ext=self.resolve_interface, on_subnet=self._on_subnet, on_ready=self._on_ready)
        self.converger.started(lease)
        self._spawn("converge", self.converger.run)
        self._spawn("watch", manager.watch)
        self._spawn("lease", manager.keep_lease)
        self._spawn("interface", self._interface_monitor)
        if self.rules is not None:
            self._spawn("iptables-resync", self.rules.run)
        self._spawn("config-recheck", self._config_recheck_loop)
        if cfg.network is not None:  # the hints are about iptables (IPv4) only
            self._spawn("iptables-hints", IptablesHints(cfg.network, self.o.iptables_forward_rules,
                                                        nftables=cfg.enable_nftables).run)
        if self.o.ip_blackhole_route:
            self._spawn("blackhole", self._blackhole_loop)
        log.info("running backend", backend=cfg.backend_type)

    async def run(self) -> int:
        """The daemon's whole life on the running loop: signal handlers, the health server, :meth:`start`,
        then the long-running tasks (restarted when one dies of an unexpected error) until SIGTERM or
        SIGINT. Returns the exit status: 0 after a signal, 1 after a FatalError (logged as one line);
        SIGHUP is logged and ignored. Shutdown (:meth:`shutdown`) runs either way."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        def on_signal(sig: signal.Signals) -> None:
            log.info("signal received, shutting down", signal=sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        # SIGHUP (a unit's reload, a closed terminal) used to kill the daemon without a word. There is
        # nothing to reload: flags are fixed and the network config is re-checked on its own.
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
            "SIGHUP received: nothing to reload, pyflanneld keeps running; restart it to apply changed "
            "flags or network config"))
        health = None
        code = 0
        try:
            if self.o.healthz_port:
                health = HealthServer(self.o.healthz_ip, self.o.healthz_port, self.readiness, self.peers)
                health.add_route("/metrics", self.serve_metrics)
                try:
                    await health.start()
                except OSError as e:
                    raise FatalError(f"cannot listen on --healthz-ip {self.o.healthz_ip} --healthz-port "
                                     f"{self.o.healthz_port}: {e.strerror}") from None
            main = asyncio.create_task(self.start(), name="start")
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()  # raises FatalError
                watchdog = asyncio.create_task(self._watch_tasks(), name="watchdog")
                await asyncio.wait({stopper, watchdog}, return_when=asyncio.FIRST_COMPLETED)
                watchdog.cancel()
            else:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await main
            stopper.cancel()
        except FatalError as e:
            log.error("fatal", error=str(e))
            code = 1
        finally:
            await self.shutdown(health)
        if code == 0:
            log.info("exiting cleanly")
        return code

    async def _watch_tasks(self) -> None:
        """A background loop that dies of an unexpected error, or ends cancelled though nothing
        cancelled it (a library raising CancelledError from inside), is logged and started again.
        (A loop replaced by ``_spawn`` is no longer in ``_tasks``; at shutdown this watchdog is
        cancelled first.)"""
        while True:
            await asyncio.sleep(1)
            for name, t in list(self._tasks.items()):
                if not t.done():
                    continue
                if t.cancelled():
                    log.error("background task ended cancelled; restarting it", task=name)
                elif t.exception() is not None:
                    log.error("background task failed; restarting it", task=name, error=repr(t.exception()))
                else:
                    continue
                self._spawn(name, self._factories[name])

    async def shutdown(self, health: HealthServer | None) -> None:
        """Stop everything at once, bounded to ~1 s; leases, kernel state and rules are kept."""
        t0 = time.monotonic()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1)

        async def bounded(coro, timeout: float) -> None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(coro, timeout)

        closing = [bounded(x.close(), 1) for x in (self.backend, self.rules, self.store, health) if x is not None]
        await asyncio.gather(*closing)
        log.debug("shut down", seconds=round(time.monotonic() - t0, 3))


class Previous(NamedTuple):
    """What the previous run's subnet.env says (each None when absent or unreadable):
    FLANNEL_NETWORK, FLANNEL_SUBNET's subnet, FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET's subnet."""

    network: IPv4Network | None
    subnet: IPv4Network | None
    network6: IPv6Network | None
    subnet6: IPv6Network | None


def own_subnets(lease: Lease, cfg: NetworkConfig | None) -> list[IPv4Network | IPv6Network]:
    """The own lease's subnet of each family the network runs (IPv4 first)."""
    out: list[IPv4Network | IPv6Network] = []
    if cfg is None or cfg.enable_ipv4:
        out.append(lease.subnet)
    if lease.subnet6 is not None:
        out.append(lease.subnet6)
    return out


def peer_json(le: Lease) -> dict[str, Any]:
    """One entry of /peers: subnet, PublicIP, BackendType, BackendData; for a lease with an IPv6
    part also IPv6Subnet, PublicIPv6, BackendV6Data (an IPv6-only lease's subnet is 0.0.0.0/0,
    upstream's key)."""
    d: dict[str, Any] = {"subnet": str(le.subnet), "PublicIP": str(le.attrs.public_ip),
                         "BackendType": le.attrs.backend_type, "BackendData": le.attrs.backend_data}
    if le.subnet6 is not None:
        d |= {"IPv6Subnet": str(le.subnet6), "PublicIPv6": str(le.attrs.public_ipv6),
              "BackendV6Data": le.attrs.backend_v6_data}
    return d


def rejected_summary(subnets_path: str, rejected: Mapping[str, str], limit: int = 20) -> str:
    """/readyz detail: the rejected lease entries (at most ``limit``), one ``key: reason`` per line."""
    n = len(rejected)
    lines = [f"{n} lease {'entry' if n == 1 else 'entries'} under {subnets_path} rejected (not programmed; "
             "correct or delete them):"]
    lines += [f"  {log_key(k)}: {why}" for k, why in sorted(rejected.items())[:limit]]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more")
    return "\n".join(lines)


def run(opts: Options) -> int:
    """Run the daemon with parsed and validated ``opts`` (the start-up line logs them, secrets
    masked; FLANNELD_* values that could not be used are warnings) on a new event loop; returns
    the exit status (see :meth:`Daemon.run`)."""
    log.info("starting pyflanneld", version=__version__, pid=os.getpid(), options=opts.redacted())
    for w in opts.env_warnings:
        log.warning(w)
    return asyncio.run(Daemon(opts).run())
