"""The daemon: one asyncio loop from start to ready to shutdown (upstream main.go's order).

options → datastore + network config → interface → backend.register (MTU, BackendData) → lease →
backend.start → traffic rules → subnet.env → READY=1 → [renew, watch → backend, reconcile, resync].
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

import structlog

from . import __version__, iface, sdnotify, subnetenv
from .backend import BackendContext, BackendError, ExternalInterface, backend_class, registered_types
from .config import ConfigError, NetworkConfig, parse_config
from .health import HealthServer
from .iptables_hints import IptablesHints
from .options import Options
from .subnet.etcd_common import EtcdSettings
from .subnet.etcdv3 import EtcdV3Store
from .subnet.lease import Lease, LeaseAttrs
from .subnet.manager import HOW_TO_SET, SubnetManager, read_config
from .subnet.store import Store, StoreError
from .trafficmngr import RulesError, traffic_manager

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


class FatalError(Exception):
    """Setup failed in a way retrying cannot fix: exit 1 with this one line."""


class _BackendFeeder:
    """The manager's PeerSink: hands lease events to the backend, one call at a time."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def snapshot(self, leases: list[Lease]) -> None:
        log.info("peer leases listed", peers=len(leases))
        await self.d.backend_call("set_peers", leases)

    async def added(self, lease: Lease) -> None:
        log.info("lease added", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip),
                 backend=lease.attrs.backend_type or "-")
        await self.d.backend_call("add_peer", lease)

    async def removed(self, lease: Lease) -> None:
        log.info("lease removed", subnet=str(lease.subnet))
        await self.d.backend_call("remove_peer", lease)


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.ready = False
        self.not_ready_reason = "starting"
        self.store: Store | None = None
        self.manager: SubnetManager | None = None
        self.backend = None
        self.rules = None
        self.config: NetworkConfig | None = None
        self._lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task] = {}
        self._factories: dict[str, object] = {}
        self.started = time.monotonic()

    # -- helpers -------------------------------------------------------------------------------
    def settings(self) -> EtcdSettings:
        try:
            return EtcdSettings.from_flags(
                endpoints=self.o.etcd_endpoints, prefix=self.o.etcd_prefix, cafile=self.o.etcd_cafile,
                certfile=self.o.etcd_certfile, keyfile=self.o.etcd_keyfile,
                username=self.o.etcd_username, password=self.o.etcd_password)
        except ValueError as e:
            raise FatalError(f"--etcd-endpoints: {e}") from None

    def readiness(self) -> tuple[bool, str]:
        """(ready, detail) for /readyz. Not ready: why. Ready: rejected lease entries, if any (they
        are someone else's problem and never programmed, so they do not make this host unready)."""
        if not self.ready:
            return False, self.not_ready_reason
        if self.manager and not self.manager.store_ok:
            return False, f"datastore unreachable: {self.manager.store_error}"
        ok, why = self.backend.readiness()
        if not ok or self.manager is None or not self.manager.book.rejected:
            return ok, why
        return True, rejected_summary(self.manager.book.subnets_path, self.manager.book.rejected)

    def peers(self) -> list[dict]:
        known = getattr(self.backend, "peers", {}) or {}
        return [{"subnet": str(le.subnet), "PublicIP": str(le.attrs.public_ip),
                 "BackendType": le.attrs.backend_type, "BackendData": le.attrs.backend_data}
                for le in sorted(known.values(), key=lambda le: le.subnet)]

    async def backend_call(self, method: str, *args) -> None:
        async with self._lock:
            try:
                await getattr(self.backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - one failing call must not stop the daemon
                log.error("backend call failed", call=method, error=str(e) or type(e).__name__)

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

        last, last_at = "", 0.0
        while True:
            problem = ""
            for store in stores():
                try:
                    cfg = await read_config(store)
                except ConfigError as e:
                    problem = (f"invalid network config at {settings.prefix}/config (etcd {store.api}): {e}; "
                               f"fix it with {HOW_TO_SET.format(prefix=settings.prefix)}")
                    break
                except StoreError as e:
                    if store is v2 and v3 is not None and problem == "":
                        continue  # v3 answered "no config": v2 is only a fallback, its errors don't matter
                    # each store's message names its API ("etcd v3 API at …"): keep both
                    problem = f"{problem}; {e}" if problem else f"cannot read the network config: {e}"
                    continue
                if cfg is None:
                    continue
                try:
                    backend_class(cfg.backend_type)
                except BackendError as e:
                    problem = (f"invalid network config at {settings.prefix}/config: {e}; "
                               f"known types: {', '.join(registered_types())}")
                    break
                if cfg.enable_ipv6:
                    problem = "EnableIPv6 is not supported by pyflanneld yet; set it to false"
                    break
                for other in (v3, v2):
                    if other is not None and other is not store:
                        await other.close()
                log.info("found network config", backend_type=cfg.backend_type, network=str(cfg.network),
                         etcd_api=store.api, subnet_len=cfg.subnet_len)
                return store, cfg
            if not problem:
                apis = "v3 or v2 API" if api == "auto" else f"{api} API"
                problem = (f"network config not found at {settings.prefix}/config ({apis}); create it with "
                           + HOW_TO_SET.format(prefix=settings.prefix))
            self.not_ready_reason = problem
            if problem != last or time.monotonic() - last_at > 30:
                log.error("couldn't fetch network config, retrying every second", error=problem)
                last, last_at = problem, time.monotonic()
            await asyncio.sleep(1)

    async def external_interface(self) -> ExternalInterface:
        try:
            # pyroute2's synchronous IPRoute runs its own loop: keep it off ours.
            found = await asyncio.to_thread(iface.select, self.o.iface, self.o.iface_regex, self.o.iface_can_reach)
        except iface.InterfaceError as e:
            raise FatalError(str(e)) from None
        log.info("using interface", name=found.name, address=str(found.ip), mtu=found.mtu)
        public = found.ip
        if self.o.public_ip:
            public = IPv4Address(self.o.public_ip)
        else:
            log.info("defaulting external address to interface address", public_ip=str(public))
        return ExternalInterface(name=found.name, index=found.index, ip=found.ip, public_ip=public, mtu=found.mtu)

    async def _write_subnet_env(self, lease: Lease) -> None:
        assert self.config is not None
        content = subnetenv.render(self.config.network, lease.subnet, self.mtu, self.o.ip_masq)
        try:
            subnetenv.write(self.o.subnet_file, content)
            log.info("wrote subnet file", path=self.o.subnet_file, subnet=str(lease.subnet), mtu=self.mtu)
        except OSError as e:
            log.warning("failed to write subnet file", path=self.o.subnet_file, error=str(e))

    async def _setup_rules(self, lease: Lease, prev_net: IPv4Network | None, prev_sn: IPv4Network | None) -> None:
        """iptables or nftables rules (EnableNFTables), installed; RulesError if that mode cannot work."""
        assert self.config is not None
        self.rules = traffic_manager(self.config, self.o, lease.subnet, prev_net, prev_sn)
        await self.rules.setup()

    async def _on_lease_changed(self, lease: Lease) -> None:
        prev_net, prev_sn = subnetenv.previous(self.o.subnet_file)
        await self.backend_call("start", lease)
        if self.rules is not None:
            with contextlib.suppress(Exception):
                await self.rules.close()
            try:
                await self._setup_rules(lease, prev_net, prev_sn)
            except RulesError as e:
                log.error("cannot install the rules for the new subnet", error=str(e))
            self._spawn("iptables-resync", self.rules.run)
        await self._write_subnet_env(lease)

    def _spawn(self, name: str, factory) -> asyncio.Task:
        """Run a restartable background loop; `factory()` makes a fresh coroutine (see _watch_tasks)."""
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()
        self._factories[name] = factory
        t = asyncio.create_task(factory(), name=name)
        self._tasks[name] = t
        return t

    async def _reconcile_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.backend_call("reconcile")

    async def _blackhole_loop(self) -> None:
        """--ip-blackhole-route: keep `blackhole <own subnet>` in place (checked every resync period)."""
        from .netlink import Netlink, NetlinkError

        nl = Netlink()
        try:
            while True:
                sn = self.manager.lease.subnet
                try:
                    if await nl.ensure_blackhole(sn):
                        log.info("blackhole route added", subnet=str(sn))
                except NetlinkError as e:
                    log.warning("cannot add blackhole route", subnet=str(sn), error=str(e))
                await asyncio.sleep(self.o.iptables_resync)
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
                continue
            text = (raw or b"").decode("utf-8", "replace")
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
        settings = self.settings()
        self.store, self.config = await self.get_config(settings)
        cfg = self.config
        ext = await self.external_interface()
        if os.geteuid() != 0 and cfg.backend_type.lower() != "alloc":
            raise FatalError("pyflanneld must run as root to program the kernel (devices, routes); "
                             "run it as root or as the systemd service")
        cls = backend_class(cfg.backend_type)
        try:
            self.backend = cls(BackendContext(config=cfg, backend_config=cfg.backend, ext=ext, options=self.o))
            info = await self.backend.register()
        except BackendError as e:
            raise FatalError(f"{cfg.backend_type} backend: {e}") from None
        self.mtu = info.mtu
        attrs = LeaseAttrs(public_ip=ext.public_ip, backend_type=info.backend_type, backend_data=info.backend_data)

        prev_net, prev_sn = subnetenv.previous(self.o.subnet_file)
        self.manager = SubnetManager(
            self.store, cfg, ttl=int(self.o.subnet_lease_ttl), renew_margin=self.o.subnet_lease_renew_margin,
            prev_subnet=prev_sn, renew_retry=min(60.0, max(1.0, self.o.subnet_lease_ttl / 10)),
            prefix=settings.prefix,
        )

        def not_ready(msg: str) -> None:
            self.not_ready_reason = msg

        lease = await self.manager.acquire(attrs, on_error=not_ready)
        try:
            await self.backend.start(lease)
        except BackendError as e:
            raise FatalError(f"{cfg.backend_type} backend: {e}") from None
        try:
            await self._setup_rules(lease, prev_net, prev_sn)
        except RulesError as e:
            raise FatalError(str(e)) from None
        await self._write_subnet_env(lease)
        self.ready = True
        elapsed = time.monotonic() - self.started
        log.info("flannel is ready", subnet=str(lease.subnet), backend=cfg.backend_type,
                 public_ip=str(ext.public_ip), seconds=round(elapsed, 3))
        with contextlib.suppress(OSError):
            sdnotify.notify("READY=1")

        feeder = _BackendFeeder(self)
        self._spawn("watch", lambda: self.manager.watch(feeder))
        self._spawn("lease", lambda: self.manager.keep_lease(self._on_lease_changed))
        if self.backend.reconcile_interval:
            self._spawn("reconcile", lambda: self._reconcile_loop(self.backend.reconcile_interval))
        if self.rules is not None:
            self._spawn("iptables-resync", self.rules.run)
        self._spawn("config-recheck", self._config_recheck_loop)
        self._spawn("iptables-hints", IptablesHints(cfg.network, self.o.iptables_forward_rules,
                                                    nftables=cfg.enable_nftables).run)
        if self.o.ip_blackhole_route:
            self._spawn("blackhole", self._blackhole_loop)
        log.info("running backend", backend=cfg.backend_type)

    async def run(self) -> int:
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
        """A background loop that dies of an unexpected error is logged and started again."""
        while True:
            await asyncio.sleep(1)
            for name, t in list(self._tasks.items()):
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.error("background task failed; restarting it", task=name, error=repr(t.exception()))
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


def rejected_summary(subnets_path: str, rejected: Mapping[str, str], limit: int = 20) -> str:
    """/readyz detail: the rejected lease entries (at most ``limit``), one ``key: reason`` per line."""
    n = len(rejected)
    lines = [f"{n} lease {'entry' if n == 1 else 'entries'} under {subnets_path} rejected (not programmed; "
             "correct or delete them):"]
    lines += [f"  {k}: {why}" for k, why in sorted(rejected.items())[:limit]]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more")
    return "\n".join(lines)


def run(opts: Options) -> int:
    log.info("starting pyflanneld", version=__version__, pid=os.getpid(), options=opts.redacted())
    for w in opts.env_warnings:
        log.warning(w)
    return asyncio.run(Daemon(opts).run())
