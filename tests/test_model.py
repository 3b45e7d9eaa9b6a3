"""Model-based test of the subnet manager and the daemon's convergence (no kernel, no etcd: an
in-memory store and a backend that records what it was told; the kernel side is the lab tests').

Hypothesis drives random sequences of what the world does to a running daemon — peers join,
change and leave, the own key is deleted, expires, is taken over by another host (also one with
our PublicIP), reserved and un-reserved, the watch breaks, the store compacts, a partition comes
and goes, the external address moves, subnet.env becomes unwritable — and checks, whenever the
daemon has settled, what an operator would: the backend's peers are exactly the store's valid
leases minus our own, the own key holds our lease and subnet.env names its subnet, and /readyz
is 200 exactly when all of that holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lab.memstore import MemStore
from lab.wait import wait_for_async
from pyflanneld import subnetenv
from pyflanneld.backend.base import Backend, BackendContext, BackendInfo, ExternalInterface
from pyflanneld.config import parse_config
from pyflanneld.converge import Converger
from pyflanneld.subnet.lease import LeaseAttrs, subnet_key
from pyflanneld.subnet.manager import SubnetManager

CONFIG = b'{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.40.0","Backend":{"Type":"vxlan"}}'
PEER_SUBNETS = [IPv4Network(f"10.1.{i}.0/24") for i in range(1, 11)]  # often collide with ours
OWN_MAC = "02:00:00:00:00:01"


def peer_value(host: int, mac_seed: int = 0) -> bytes:
    mac = f"02:aa:00:00:{host:02x}:{mac_seed:02x}"
    return json.dumps({"PublicIP": f"192.168.200.{host}", "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}}, separators=(",", ":")).encode()


class RecordingBackend(Backend):
    """What a kernel backend does, minus the kernel: ``kernel`` is the data plane it programmed."""

    type_name = "vxlan"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.kernel: dict[IPv4Network, LeaseAttrs] = {}
        self.starts = 0

    async def register(self) -> BackendInfo:
        return BackendInfo(mtu=self.ctx.ext.mtu - 50, backend_type="vxlan",
                           backend_data={"VNI": 1, "VtepMAC": OWN_MAC})

    async def start(self, own_lease) -> None:
        await super().start(own_lease)
        self.starts += 1

    async def ensure_peer(self, lease) -> None:
        self.kernel[lease.subnet] = lease.attrs

    async def drop_peer(self, lease) -> None:
        if self.kernel.get(lease.subnet) == lease.attrs:
            del self.kernel[lease.subnet]

    async def resync(self, reason: str) -> None:
        self.kernel = {sn: le.attrs for sn, le in self.peers.items()}


def ext_for(n: int) -> ExternalInterface:
    ip = IPv4Address(f"192.168.100.{n}")
    return ExternalInterface(name="eth0", index=2, ip=ip, public_ip=ip, mtu=1500)


class DaemonModel(RuleBasedStateMachine):
    """One daemon (manager + converger + recording backend) against a MemStore."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(TMP) / f"m{id(self)}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.good_file = str(self.tmp / "subnet.env")
        self.bad_file = str(self.tmp / "not-a-dir" / "subnet.env")
        (self.tmp / "not-a-dir").write_text("a file where a directory should be")
        self.ext_n = 1
        self.partitioned = False
        self.others = 0  # hosts that took our key, each with its own VtepMAC
        self.store = MemStore(CONFIG)
        self.snap = None  # an etcd snapshot taken earlier (take_snapshot), for restore_snapshot
        self.readies = 0  # READY=1 sent by the current daemon
        self.loop.run_until_complete(self._start())

    async def _start(self, kernel: dict | None = None) -> None:
        """Start a daemon on ``self.store``, as pyflanneld's start does: register, acquire (the
        previous subnet from subnet.env), start the backend (``kernel``: the entries a previous
        run left), converge until settled."""
        self.readies = 0
        cfg = parse_config(CONFIG)
        self.cfg = cfg
        ctx = BackendContext(config=cfg, backend_config=cfg.backend, ext=ext_for(self.ext_n), options=None)
        self.backend = RecordingBackend(ctx)
        if kernel is not None:
            self.backend.kernel = dict(kernel)
        info = await self.backend.register()
        self.m = SubnetManager(self.store, cfg, ttl_s=3600, renew_margin_s=60, renew_retry_s=0.001, rng=random.Random(0),
                               prev_subnet=subnetenv.previous(self.good_file)[1],
                               notify=lambda full: self.c.wake(full=full) if hasattr(self, "c") else None)
        self.m.ACQUIRE_BACKOFF_S = self.m.WATCH_BACKOFF_S = (0.001, 0.002)

        async def resolve() -> ExternalInterface:
            return ext_for(self.ext_n)

        attrs = LeaseAttrs(ext_for(self.ext_n).public_ip, info.backend_type, info.backend_data)
        if hasattr(self, "c"):
            del self.c
        lease = await self.m.acquire(attrs)
        await self.backend.start(lease)
        self.c = Converger(self.m, self.backend, info, network=cfg.network, subnet_file=self.good_file,
                           ip_masq=False, period_s=3600, resolve_ext=resolve, retry_s=0.001,
                           on_ready=self._on_ready)
        self.c.started(lease)
        self.tasks = [asyncio.ensure_future(x) for x in (self.m.watch(), self.m.keep_lease(), self.c.run())]
        self.c.wake(full=True)
        await self._settle()

    def _on_ready(self) -> None:
        """READY=1: sent once per daemon, and only when everything an operator checks holds."""
        self.readies += 1
        assert self.readies == 1, "READY=1 sent twice"
        self.check_converged()

    async def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def state(self) -> tuple:
        """What a fresh start is compared on: own subnet, the store (values and TTL flags),
        subnet.env, the programmed peers."""
        store = {k: (self.store.value(k), self.store.has_ttl(k)) for k in self.store.keys()}
        return self.m.lease.subnet, store, Path(self.good_file).read_text(), dict(self.backend.kernel)

    def teardown(self) -> None:
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    # -- helpers ---------------------------------------------------------------------------------
    def quiet(self) -> bool:
        m, c = self.m, self.c
        return (self.store.idle() and m.lease is not None and not m.lost_reason and not m.claiming
                and not m._kick.is_set() and not m._renew_now and not m._rewrite
                and not c._event.is_set() and c._running is False and c.readiness()[0])

    async def _settle(self) -> None:
        calm = 0
        for _ in range(5000):
            await asyncio.sleep(0 if calm else 0.0005)  # timers (backoffs, retries) need real time
            calm = calm + 1 if self.quiet() else 0
            if calm >= 3:
                return
        raise AssertionError(f"the daemon did not settle: lease={self.m.lease} lost={self.m.lost_reason!r} "
                             f"store idle={self.store.idle()} readiness={self.c.readiness()}")

    def settle(self) -> None:
        if not self.partitioned:
            self.loop.run_until_complete(self._settle())
        else:
            self.loop.run_until_complete(asyncio.sleep(0.005))

    @property
    def own_key(self) -> str:
        assert self.m.lease is not None
        return self.m.lease.key

    def expected_peers(self) -> dict[IPv4Network, LeaseAttrs]:
        own = self.m.lease.subnet
        out = {}
        for key in self.store.keys():
            sn = IPv4Network(key.replace("-", "/"))
            if sn == own:
                continue
            out[sn] = LeaseAttrs.from_json(self.store.value(key))
        return out

    # -- what the world does ---------------------------------------------------------------------
    @rule(sn=st.sampled_from(PEER_SUBNETS), host=st.integers(1, 6), seed=st.integers(0, 2))
    def peer_put(self, sn, host, seed):
        """A peer joins (or renews, or restarts with a new VtepMAC) — unless the key is ours."""
        if self.m.lease is not None and sn == self.m.lease.subnet:
            return
        self.store.put(subnet_key(sn), peer_value(host * 10 + PEER_SUBNETS.index(sn), seed))
        self.settle()

    @rule(sn=st.sampled_from(PEER_SUBNETS))
    def peer_delete(self, sn):
        if self.m.lease is not None and sn == self.m.lease.subnet:
            return
        self.store.delete(subnet_key(sn))
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def own_deleted(self):
        self.store.delete(self.own_key)
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def own_expired(self):
        self.store.expire(self.own_key)
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule(host=st.integers(1, 6))
    def own_taken_over(self, host):
        """The key is deleted and at once given to another host (case 1)."""
        key = self.own_key
        self.others += 1
        self.store.delete(key)
        self.store.put(key, peer_value(90 + host, self.others))
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def own_taken_by_same_public_ip(self):
        """Another host with our PublicIP (a copied --public-ip) takes our key (case 8)."""
        key = self.own_key
        twin = json.loads(self.store.value(key))
        self.others += 1
        twin["BackendData"] = {"VNI": 1, "VtepMAC": f"02:bb:bb:bb:bb:{self.others:02x}"}
        self.store.put(key, json.dumps(twin, separators=(",", ":")).encode())
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def own_reserved(self):
        """The operator removes the TTL (upstream's documented reservation; case 7)."""
        self.store.put(self.own_key, self.store.value(self.own_key), ttl=False)
        self.settle()
        assert not self.store.has_ttl(self.own_key), "the reservation was undone"
        self.loop.run_until_complete(self._renew())  # a renewal must not undo it either
        assert not self.store.has_ttl(self.own_key)

    @precondition(lambda self: not self.partitioned)
    @rule()
    def own_unreserved(self):
        self.store.put(self.own_key, self.store.value(self.own_key), ttl=True)
        self.settle()
        assert self.store.has_ttl(self.own_key)

    async def _renew(self):
        self.m.renew_now()
        await self._settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def renewal_due(self):
        self.loop.run_until_complete(self._renew())

    @rule()
    def watch_breaks(self):
        self.store.break_watches()
        self.settle()

    @rule(also_break=st.booleans())
    def compaction(self, also_break):
        self.store.compact()
        if also_break:
            self.store.break_watches()
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def partition_begins(self):
        self.partitioned = True
        self.store.partition(True)
        self.settle()
        ok, why = self.c.readiness()
        assert not ok and "datastore unreachable" in why, why

    @precondition(lambda self: self.partitioned)
    @rule()
    def partition_heals(self):
        self.partitioned = False
        self.store.partition(False)
        self.settle()

    @rule()
    def address_moves(self):
        """The external interface's address changes (case 4): the lease's PublicIP follows."""
        self.ext_n += 1
        self.c.wake(iface=True)
        self.settle()

    @rule()
    def timer(self):
        self.c.wake(full=True, iface=True)
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def subnet_env_unwritable_then_fixed(self):
        """subnet.env cannot be written (case 6): not ready, naming it; retried until it can."""
        Path(self.good_file).unlink(missing_ok=True)
        self.c.subnet_file = self.bad_file
        self.c.wake(full=True)
        self.loop.run_until_complete(wait_for_async(lambda: not self.c.readiness()[0], 30, "not ready"))
        ok, why = self.c.readiness()
        assert not ok and "subnet file" in why, why
        self.c.subnet_file = self.good_file
        self.settle()

    # -- overlaps: several things at once, the daemon running between them or not ------------------
    WORLD = ("peer_put", "peer_delete", "own_delete", "own_take", "own_twin", "own_reserve", "own_unreserve",
             "watch_break", "compact", "restore", "wipe", "address_move", "env_bad", "env_good", "run")

    @rule(steps=st.lists(st.tuples(st.sampled_from(WORLD), st.integers(0, 30)), min_size=2, max_size=5))
    def overlap(self, steps):
        """What the rules above do one at a time, here back to back: a step lands while the daemon
        is (or is not yet) handling the previous ones (``run``: let it run for a few turns)."""
        for name, n in steps:
            getattr(self, f"_w_{name}")(n)
        self.c.subnet_file = self.good_file
        self.c.wake(full=True)
        self.settle()

    def _own(self) -> str | None:
        key = self.m.lease.key if self.m.lease is not None else None
        return key if key is not None and self.store.value(key) is not None else None

    def _w_peer_put(self, n):
        sn = PEER_SUBNETS[n % len(PEER_SUBNETS)]
        if self.m.lease is None or sn != self.m.lease.subnet:
            # host numbers as peer_put's (10 × host + subnet index): two subnets never share a
            # VtepMAC (the gate would rightly refuse the second, which expected_peers does not model)
            self.store.put(subnet_key(sn), peer_value((n % 6 + 1) * 10 + PEER_SUBNETS.index(sn), n % 3))

    def _w_peer_delete(self, n):
        sn = PEER_SUBNETS[n % len(PEER_SUBNETS)]
        if self.m.lease is None or sn != self.m.lease.subnet:
            self.store.delete(subnet_key(sn))

    def _w_own_delete(self, n):
        if self._own():
            self.store.delete(self._own())

    def _w_own_take(self, n):
        if self.m.lease is not None:
            self.others += 1
            self.store.delete(self.m.lease.key)
            self.store.put(self.m.lease.key, peer_value(90 + n % 6, self.others))

    def _w_own_twin(self, n):
        key = self._own()
        if key is not None:
            twin = json.loads(self.store.value(key))
            if twin["PublicIP"] == str(ext_for(self.ext_n).public_ip):
                self.others += 1
                twin["BackendData"] = {"VNI": 1, "VtepMAC": f"02:bb:bb:bb:bb:{self.others:02x}"}
                self.store.put(key, json.dumps(twin, separators=(",", ":")).encode())

    def _w_own_reserve(self, n):
        if self._own():
            self.store.put(self._own(), self.store.value(self._own()), ttl=False)

    def _w_own_unreserve(self, n):
        if self._own():
            self.store.put(self._own(), self.store.value(self._own()), ttl=True)

    def _w_watch_break(self, n):
        self.store.break_watches()

    def _w_compact(self, n):
        self.store.compact()

    def _w_restore(self, n):
        if self.snap is not None:
            self.store.restore(self.snap)
        else:
            self.snap = self.store.snapshot()

    def _w_wipe(self, n):
        self.store.wipe()

    def _w_address_move(self, n):
        self.ext_n += 1
        self.c.wake(iface=True)

    def _w_env_bad(self, n):
        self.c.subnet_file = self.bad_file
        self.c.wake(full=True)

    def _w_env_good(self, n):
        self.c.subnet_file = self.good_file

    def _w_run(self, n):
        for _ in range(n % 8):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule()
    def take_snapshot(self):
        self.snap = self.store.snapshot()

    @precondition(lambda self: self.snap is not None)
    @rule()
    def restore_snapshot(self):
        """etcd restored from an older snapshot: the revision goes back, keys change under us."""
        self.store.restore(self.snap)
        self.settle()

    @rule()
    def data_loss(self):
        """etcd lost its data (the operator put the config back)."""
        self.store.wipe()
        self.settle()

    @precondition(lambda self: not self.partitioned)
    @rule()
    def restart(self):
        """A fresh start on the same store, kernel and subnet.env ends in the same state — unless
        another host with our PublicIP holds a lease (a fresh start cannot know it is not ours)."""
        own = ext_for(self.ext_n).public_ip
        if any(LeaseAttrs.from_json(self.store.value(k)).public_ip == own
               for k in self.store.keys() if k != self.own_key):
            return
        before = self.state()
        self.loop.run_until_complete(self._stop())
        self.loop.run_until_complete(self._start(kernel=self.backend.kernel))
        assert self.state() == before

    # -- what must hold when it settled --------------------------------------------------------
    @invariant()
    def converged_like_a_fresh_start(self):
        if self.partitioned:
            return
        self.check_converged()
        assert self.readies == 1, "settled and ready, but READY=1 was not sent"

    def check_converged(self) -> None:
        m, b = self.m, self.backend
        lease = m.lease
        assert lease is not None and not m.lost_reason
        # the own key holds our lease: our PublicIP and backend data
        have = self.store.value(lease.key)
        assert have is not None, "own key missing in the store"
        attrs = LeaseAttrs.from_json(have)
        assert attrs.public_ip == ext_for(self.ext_n).public_ip
        assert attrs.backend_data["VtepMAC"] == OWN_MAC
        # peers == store leases minus own: in the backend's book and in what it programmed
        want = self.expected_peers()
        assert {sn: le.attrs for sn, le in b.peers.items()} == want
        assert b.kernel == want
        assert lease.subnet not in b.kernel
        assert b.own_lease is not None and b.own_lease.subnet == lease.subnet
        # subnet.env names the own subnet
        assert subnetenv.previous(self.good_file)[1] == lease.subnet
        # nobody else carries our VTEP (a stale lease of ours left behind would)
        for key in self.store.keys():
            if key != lease.key:
                assert OWN_MAC not in self.store.value(key).decode(), f"{key} carries our VtepMAC"
        # ready, since all of the above holds
        assert self.c.readiness() == (True, ""), self.c.readiness()


TMP = ""


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    """subnet.env files on tmpfs when there is one: its fsync is free (hundreds of examples)."""
    global TMP
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = tempfile.mkdtemp(prefix="pyflanneld-model-", dir=shm)
        TMP = d
        yield
        shutil.rmtree(d, ignore_errors=True)
    else:
        TMP = str(tmp_path)
        yield


TestDaemonModel = DaemonModel.TestCase
TestDaemonModel.settings = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "300")), stateful_step_count=10, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_snapshot_restored_after_a_takeover_then_the_address_moves():
    """Found by the state machine: etcd restored from a snapshot taken before our subnet was taken
    over gives back our older lease (our VtepMAC, the old PublicIP) under the old key, while the
    address moves. Peers reject the later of two leases with one VTEP — possibly ours — so the older
    one must go; the daemon then ends as a fresh start would."""
    state = DaemonModel()
    try:
        state.take_snapshot()
        state.own_taken_over(host=1)
        state.converged_like_a_fresh_start()
        state.overlap(steps=[("restore", 0), ("address_move", 0)])
        state.converged_like_a_fresh_start()
    finally:
        state.teardown()
