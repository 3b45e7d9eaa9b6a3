"""The netlink adapter: retries, idempotent deletes, error lines, monitor overruns."""

from __future__ import annotations

import asyncio
import errno
import json

import pytest
from backend_harness import PYTHON
from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

from pyflanneld import netlink
from pyflanneld.netlink import Netlink, NetlinkError


class _NoSocket(Netlink):
    """Retry logic only: no socket is ever opened (the fake operations never use it)."""

    async def _socket(self):
        return None


def _flaky(codes: list[int], result="ok"):
    calls = []

    async def fn(_ipr):
        calls.append(1)
        if len(calls) <= len(codes):
            raise PyNetlinkError(codes[len(calls) - 1])
        return result

    return fn, calls


def test_transient_errors_are_retried(monkeypatch):
    monkeypatch.setattr(netlink, "RETRY_BASE_DELAY", 0.001)
    nl = _NoSocket()
    fn, calls = _flaky([errno.ENOBUFS, errno.EBUSY, errno.EAGAIN])
    assert asyncio.run(nl._call("replace fdb", fn)) == "ok"
    assert len(calls) == 4


def test_retries_give_up_with_one_line(monkeypatch):
    monkeypatch.setattr(netlink, "RETRY_BASE_DELAY", 0.001)
    nl = _NoSocket(retries=3)
    fn, calls = _flaky([errno.ENOBUFS] * 10)
    with pytest.raises(NetlinkError) as ei:
        asyncio.run(nl._call("replace route 10.5.2.0/24", fn))
    assert len(calls) == 3
    assert str(ei.value) == "replace route 10.5.2.0/24: No buffer space available (errno 105)"
    assert ei.value.code == errno.ENOBUFS


def test_permanent_errors_are_not_retried_and_translated():
    nl = _NoSocket()
    fn, calls = _flaky([errno.EPERM])
    with pytest.raises(NetlinkError) as ei:
        asyncio.run(nl._call("create vxlan device flannel.1", fn))
    assert len(calls) == 1
    assert str(ei.value) == ("create vxlan device flannel.1: operation not permitted: run pyflanneld as root "
                             "(it needs CAP_NET_ADMIN)")


def test_gone_is_fine_for_deletes_only():
    nl = _NoSocket()
    for code in (errno.ESRCH, errno.ENOENT, errno.ENODEV, errno.EADDRNOTAVAIL):
        fn, _ = _flaky([code])
        assert asyncio.run(nl._call("delete", fn, ok_if_gone=True)) is None
    fn, _ = _flaky([errno.ESRCH])
    with pytest.raises(NetlinkError):
        asyncio.run(nl._call("replace", fn))


IDEMPOTENT = """
import asyncio
from ipaddress import IPv4Address as A, IPv4Interface as I, IPv4Network as N
from pyflanneld.netlink import Netlink, Route
async def main():
    async with Netlink() as nl:
        lo = (await nl.link(name="lo")).index
        assert await nl.link(name="nope0") is None
        await nl.delete_route(Route(N("10.99.0.0/24"), A("10.99.0.0"), lo, onlink=True))
        await nl.delete_neighbour(lo, A("10.99.0.1"))
        await nl.delete_address(lo, I("10.99.0.1/32"))
        await nl.delete_link(4242)
        br = await nl.link(name="br9")
        await nl.delete_fdb(br.index, "02:00:00:00:00:01", A("10.99.0.2"))
        await nl.replace_route(Route(N("10.99.1.0/24"), None, lo))
        await nl.replace_route(Route(N("10.99.1.0/24"), None, lo))
        assert [r.dst for r in await nl.routes() if str(r.dst).startswith("10.99.")] == [N("10.99.1.0/24")]
        await nl.delete_route(Route(N("10.99.1.0/24"), None, lo))
        await nl.delete_route(Route(N("10.99.1.0/24"), None, lo))
    print("OK")
asyncio.run(main())
"""


@pytest.mark.lab
def test_deletes_of_missing_objects_are_idempotent(lab):
    h = lab.add_host("h1")
    h.ip("link", "add", "br9", "type", "bridge")
    cp = h.run(PYTHON, "-c", IDEMPOTENT, check=False)
    assert cp.stdout.strip() == "OK", cp.stderr


OVERRUN = """
import asyncio, subprocess, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from pyflanneld.netlink import NetlinkMonitor
from lab.wait import wait_for_async
async def main():
    mon = NetlinkMonitor(rcvbuf=4096)
    it = mon.events().__aiter__()
    first = asyncio.ensure_future(it.__anext__())
    await wait_for_async(lambda: mon._sock is not None, 30, "the monitor's socket bound")
    subprocess.run(["ip", "link", "add", "x0", "type", "bridge"], check=True)
    await asyncio.wait_for(first, 30)
    # the loop is blocked in subprocess.run meanwhile: the kernel's queue for our socket overflows
    # (netlink notifications are queued within each of ip's requests)
    subprocess.run(["ip", "-batch", "-"], input="".join(f"route add 10.77.{i}.0/24 dev lo\\n" for i in range(255)),
                   text=True, check=True)
    kinds = []
    while True:
        try:
            ev = await asyncio.wait_for(it.__anext__(), 10)
        except asyncio.TimeoutError:
            break
        kinds.append(ev.kind)
        if ev.kind == "overrun":
            break
    # after the overrun the monitor works again
    subprocess.run(["ip", "link", "del", "x0"], check=True)
    ev = await asyncio.wait_for(it.__anext__(), 30)
    print("overrun" in kinds, ev.kind)
    await it.aclose()
asyncio.run(main())
"""


@pytest.mark.lab
def test_monitor_reports_overrun_and_recovers(lab):
    h = lab.add_host("h1")
    cp = h.run(PYTHON, "-c", OVERRUN, check=False, timeout=60)
    overrun, next_kind = cp.stdout.split()
    assert overrun == "True" and next_kind in {"link", "fdb", "neigh", "route"}, cp.stdout + cp.stderr
    assert "netlink monitor restarted; reconciling" in cp.stderr


BATCH = """
import asyncio, json
from ipaddress import IPv4Address as A, IPv4Network as N
from pyflanneld.netlink import BatchOp, Netlink, Route
def peer(i):
    sn = N(f"10.{i // 256}.{i % 256}.0/24")
    return sn, "02:be:00:00:%02x:%02x" % (i >> 8, i & 255), A(f"172.16.{i >> 8}.{i & 255}")
def ops(idx, peers, delete=False):
    out = []
    for sn, mac, pub in peers:
        r = Route(sn, sn.network_address, idx, onlink=True)
        if delete:
            out += [BatchOp.delete_neighbour(idx, sn.network_address), BatchOp.delete_fdb(idx, mac, pub),
                    BatchOp.delete_route(r)]
        else:
            out += [BatchOp.replace_neighbour(idx, sn.network_address, mac), BatchOp.replace_fdb(idx, mac, pub),
                    BatchOp.replace_route(r)]
    return out
async def main():
    async with Netlink() as nl:
        idx = (await nl.link(name="flannel.1")).index
        # one peer through the single calls: the batch must make the very same entries
        sn, mac, pub = peer(1000)
        await nl.replace_neighbour(idx, sn.network_address, mac)
        await nl.replace_fdb(idx, mac, pub)
        await nl.replace_route(Route(sn, sn.network_address, idx, onlink=True))
        todo = ops(idx, [peer(i) for i in range(1, 301)])
        todo.insert(400, BatchOp.replace_route(Route(N("10.250.0.0/24"), A("10.250.0.0"), 9999, onlink=True)))
        todo.append(BatchOp.delete_route(Route(N("10.251.0.0/24"), A("10.251.0.0"), idx, onlink=True)))
        todo.append(BatchOp.delete_neighbour(idx, A("10.251.0.0")))
        res = await nl.batch(todo)
        print(json.dumps([[i, e.code, str(e)] for i, e in enumerate(res) if e is not None]))
        res = await nl.batch(ops(idx, [peer(i) for i in range(1, 151)], delete=True) * 2)  # twice: gone is fine
        print(json.dumps([str(e) for e in res if e is not None]))
asyncio.run(main())
"""


@pytest.mark.lab
def test_batch_programs_exact_entries_and_reports_failures(lab):
    h = lab.add_host("h1")
    h.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", h.address, "dev", "eth0",
         "dstport", "8472", "nolearning")
    h.ip("link", "set", "flannel.1", "up")
    cp = h.run(PYTHON, "-c", BATCH, check=False, timeout=60)
    assert cp.returncode == 0, cp.stderr
    failed, failed_del = (json.loads(x) for x in cp.stdout.splitlines())
    assert failed == [[400, errno.ENODEV, "replace route 10.250.0.0/24 via 10.250.0.0 dev 9999 onlink: "
                                          "No such device (errno 19)"]]
    assert failed_del == []

    def peer(i):
        return f"10.{i // 256}.{i % 256}.0", "02:be:00:00:%02x:%02x" % (i >> 8, i & 255), f"172.16.{i >> 8}.{i & 255}"

    left = [peer(i) for i in (*range(151, 301), 1000)]
    routes = [ln.strip() for ln in h.ip("-d", "route", "show", "dev", "flannel.1").splitlines()]
    assert sorted(routes) == sorted(f"unicast {n}/24 via {n} proto boot scope global onlink" for n, _, _ in left)
    neigh = [ln.strip() for ln in h.ip("neigh", "show", "dev", "flannel.1").splitlines()]
    assert sorted(neigh) == sorted(f"{n} lladdr {m} PERMANENT" for n, m, _ in left)
    fdb = [ln.strip() for ln in h.bridge("fdb", "show", "dev", "flannel.1").splitlines() if " dst " in ln]
    assert sorted(fdb) == sorted(f"{m} dst {p} self permanent" for _, m, p in left)


RAW_DUMPS = """
import json, socket
from pyflanneld.netlink import read_fdb, read_neighbours, read_routes
idx, eth0 = socket.if_nametoindex("flannel.1"), socket.if_nametoindex("eth0")
ip = lambda n: socket.inet_ntoa(n.to_bytes(4, "big"))
ip6 = lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big"))
print(json.dumps({
    "routes": sorted([ip(d), p, ip(g) if g else None, o == idx and "flannel.1" or o == eth0 and "eth0" or o, f & 4, proto]
                     for d, p, g, o, f, proto in read_routes()),
    "table7": [ip(d) for d, *_ in read_routes(7)],
    "neigh": sorted([ip(i), m.hex(":"), s & 0x80] for i, m, s in read_neighbours(idx)),
    "fdb": sorted([m.hex(":"), ip(d) if d else None, s & 0x80] for m, d, s in read_fdb(idx)),
    "routes6": sorted([ip6(d), p, ip6(g) if g else None, o == idx and "flannel.1" or o == eth0 and "eth0" or o, f & 4, proto]
                      for d, p, g, o, f, proto in read_routes(family=socket.AF_INET6) if proto != 2),
    "neigh6": sorted([ip6(i), m.hex(":"), s & 0x80] for i, m, s in read_neighbours(idx, socket.AF_INET6) if s & 0x80),
    "fdb6": sorted([m.hex(":"), ip6(d), s & 0x80]
                   for m, d, s in read_fdb(socket.if_nametoindex("flannel-v6.1"), socket.AF_INET6) if d),
    "fdb4_of_v6": [d for m, d, s in read_fdb(socket.if_nametoindex("flannel-v6.1")) if d],
}))
"""


@pytest.mark.lab
def test_raw_dumps_read_what_ip_and_bridge_show(lab):
    """The full pass's raw reads (netlink.read_routes/read_neighbours/read_fdb) against entries made
    with iproute2: every field, several datagrams (300 routes), other tables/devices/families left out."""
    h = lab.add_host("h1")
    h.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", h.address, "dev", "eth0",
         "dstport", "8472", "nolearning")
    h.ip("link", "set", "flannel.1", "up")
    h.ip("link", "add", "other", "type", "vxlan", "id", "2", "local", h.address, "dev", "eth0", "dstport", "8473")
    h.ip("link", "set", "other", "up")
    batch = [f"route add 10.8.{i}.{j}/32 via 10.8.{i}.{j} dev flannel.1 onlink" for i in range(3) for j in range(100)]
    batch += ["route add 10.9.0.0/24 via 192.168.100.9 dev eth0 proto 4",
              "route add 10.9.1.0/24 via 192.168.100.9 dev eth0 table 7",
              "route add 10.9.2.0/24 nexthop via 192.168.100.9 dev eth0 nexthop via 192.168.100.8 dev eth0",
              "route add blackhole 10.9.3.0/24",
              "route add fd00:9::/64 dev flannel.1",
              "neigh add 10.8.0.0 lladdr 02:00:00:00:00:01 dev flannel.1 nud permanent",
              "neigh add 10.8.1.0 lladdr 02:00:00:00:00:02 dev flannel.1 nud stale",
              "neigh add 10.8.2.0 lladdr 02:00:00:00:00:03 dev other nud permanent",
              "neigh add fd00:9::1 lladdr 02:00:00:00:00:04 dev flannel.1 nud permanent",
              "route add fd80:0:0:3::/64 via fd80:0:0:3:: dev flannel.1 onlink",
              "route add fd80:0:0:4::/64 via fd00:8::4 dev eth0 onlink",
              "route add fd80:0:0:5::/64 via fd00:8::4 dev eth0 onlink table 7"]
    h.run("ip", "-batch", "-", input="\n".join(batch) + "\n")
    h.bridge("fdb", "append", "02:00:00:00:00:01", "dev", "flannel.1", "dst", "192.168.100.7", "self", "permanent")
    h.bridge("fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", "192.168.100.8", "self", "permanent")
    h.bridge("fdb", "append", "02:00:00:00:00:06", "dev", "other", "dst", "192.168.100.6", "self", "permanent")
    h.ip("link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "local", "fd00:8::1", "dstport", "8472", "nolearning")
    h.bridge("fdb", "append", "02:00:00:00:00:07", "dev", "flannel-v6.1", "dst", "fd99::7", "self", "permanent")
    cp = h.run(PYTHON, "-c", RAW_DUMPS, check=False, timeout=60)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    ours = [[f"10.8.{i}.{j}", 32, f"10.8.{i}.{j}", "flannel.1", 4, 3] for i in range(3) for j in range(100)]
    assert [r for r in got["routes"] if r[3] == "flannel.1"] == sorted(ours)
    eth0 = [r for r in got["routes"] if r[3] == "eth0"]
    assert ["10.9.0.0", 24, "192.168.100.9", "eth0", 0, 4] in eth0  # proto kept (4 = static)
    assert ["192.168.100.0", 24, None, "eth0", 0, 2] in eth0  # the kernel's own (proto 2)
    assert not [r for r in got["routes"] if r[0] in ("10.9.1.0", "10.9.2.0", "10.9.3.0")]  # table 7, multipath, blackhole
    assert got["table7"] == ["10.9.1.0"]
    assert got["neigh"] == [["10.8.0.0", "02:00:00:00:00:01", 128], ["10.8.1.0", "02:00:00:00:00:02", 0]]
    fdb = [f for f in got["fdb"] if f[1] is not None]
    assert fdb == [["00:00:00:00:00:00", "192.168.100.8", 128], ["02:00:00:00:00:01", "192.168.100.7", 128]]
    # IPv6 (flannel-v6.N's entries, direct routes): the same rows with 128-bit addresses
    assert got["routes6"] == [["fd00:9::", 64, None, "flannel.1", 0, 3],  # added without proto: boot
                              ["fd80:0:0:3::", 64, "fd80:0:0:3::", "flannel.1", 4, 3],
                              ["fd80:0:0:4::", 64, "fd00:8::4", "eth0", 4, 3]]
    assert got["neigh6"] == [["fd00:9::1", "02:00:00:00:00:04", 128]]
    assert got["fdb6"] == [["02:00:00:00:00:07", "fd99::7", 128]]
    assert got["fdb4_of_v6"] == []  # an IPv4 read leaves IPv6 remotes out


MONITOR = """
import asyncio, socket, subprocess
from pyflanneld.netlink import NetlinkMonitor
from lab.wait import wait_for_async
async def main():
    for skip in (False, True):
        idx = socket.if_nametoindex("x0")
        mon = NetlinkMonitor(skip_new_entries=skip, groups=NetlinkMonitor.GROUPS | NetlinkMonitor.IPV6_ROUTES)
        it = mon.events().__aiter__()
        first = asyncio.ensure_future(it.__anext__())
        await wait_for_async(lambda: mon._sock is not None, 30, "the monitor's socket bound")
        for cmd in ("route add 10.77.1.0/24 via 10.77.1.0 dev x0 onlink", "neigh add 10.77.1.9 lladdr 02:00:00:00:00:09 dev x0",
                    "route del 10.77.1.0/24", "neigh del 10.77.1.9 dev x0",
                    "-6 route add fd77:0:0:1::/64 via fd77:0:0:1:: dev x0 onlink",
                    "-6 neigh add fd77:0:0:1:: lladdr 02:00:00:00:00:0a dev x0 nud permanent",
                    "-6 route del fd77:0:0:1::/64", "-6 neigh del fd77:0:0:1:: dev x0", "link del x0"):
            subprocess.run(["ip", *cmd.split()], check=True)
        evs = [await asyncio.wait_for(first, 30)]
        while (evs[-1].kind, evs[-1].action) != ("link", "del"):
            evs.append(await asyncio.wait_for(it.__anext__(), 30))
        print(skip, [(e.kind, e.action, e.ifindex == idx, e.dst, e.table, e.name) for e in evs])
        await it.aclose()
        subprocess.run(["ip", "link", "add", "x0", "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", "x0", "up"], check=True)
asyncio.run(main())
"""


@pytest.mark.lab
def test_monitor_decodes_events_and_can_skip_new_entries(lab):
    h = lab.add_host("h1")
    h.ip("link", "add", "x0", "type", "bridge")
    h.ip("link", "set", "x0", "up")
    cp = h.run(PYTHON, "-c", MONITOR, check=False, timeout=60)
    assert cp.returncode == 0, cp.stderr
    full, skipped = cp.stdout.splitlines()
    ours = [("route", "new", True, "10.77.1.0", 254, None), ("neigh", "new", True, "10.77.1.9", None, None),
            ("route", "del", True, "10.77.1.0", 254, None), ("neigh", "del", True, "10.77.1.9", None, None)]
    ours6 = [("route", "new", True, "fd77:0:0:1::", 254, None), ("neigh", "new", True, "fd77:0:0:1::", None, None),
             ("route", "del", True, "fd77:0:0:1::", 254, None), ("neigh", "del", True, "fd77:0:0:1::", None, None)]
    for ev in ours + ours6:
        assert repr(ev) in full, full
    assert "('link', 'del', True, None, None, 'x0')" in full, full
    assert skipped.startswith("True ")
    assert "('route', 'new'" not in skipped and "('neigh', 'new'" not in skipped, skipped
    for ev in (ours[2], ours[3], ours6[2], ours6[3]):
        assert repr(ev) in skipped, skipped


# --- IPv6 (issue 13.5): what vxlan and host-gw need, programmed for real ------------------------------
# Runs in a host with the lab's IPv6 underlay: argv = own public IPv6, own /64, peer public IPv6, peer /64,
# own and peer VtepMAC. Makes flannel-v6.1 the way upstream does (IPv6 local, /128, accept_ra 0) and
# programs the peer with the single calls, 50 more peers with a batch; prints what the listings see.
V6_PEER = """
import asyncio, json, socket, sys
from ipaddress import IPv6Address as A, IPv6Interface as I, IPv6Network as N
from pyflanneld.netlink import BatchOp, Netlink, Route, write_sysctl
pub, own, peer_pub, peer, mac, peer_mac = sys.argv[1:7]
own, peer = N(own), N(peer)
V6 = socket.AF_INET6
def extra(i):
    sn = N(f"fd80:0:1:{i:x}::/64")
    return sn, "02:be:00:00:01:%02x" % i, A(f"fd99::1:{i:x}")
async def main():
    async with Netlink() as nl:
        eth0 = await nl.link(name="eth0")
        dev = await nl.create_vxlan("flannel-v6.1", vni=1, local=A(pub), dev_index=eth0.index, port=8472,
                                    learning=False, gbp=False, mac=mac, mtu=None)
        assert write_sysctl("net/ipv6/conf/flannel-v6.1/accept_ra", "0")
        await nl.add_address(dev.index, I(f"{own.network_address}/128"))
        await nl.add_address(dev.index, I(f"{own.network_address}/128"))  # again: fine
        await nl.set_link(dev.index, state="up")
        gw = peer.network_address
        await nl.replace_neighbour(dev.index, gw, peer_mac)
        await nl.replace_fdb(dev.index, peer_mac, A(peer_pub))
        await nl.replace_route(Route(peer, gw, dev.index, onlink=True))
        ops = []
        for sn, m, p in map(extra, range(1, 51)):
            ops += [BatchOp.replace_neighbour(dev.index, sn.network_address, m), BatchOp.replace_fdb(dev.index, m, p),
                    BatchOp.replace_route(Route(sn, sn.network_address, dev.index, onlink=True))]
        assert await nl.batch(ops) == [None] * len(ops)
        dels = []
        for sn, m, p in map(extra, range(26, 51)):
            dels += [BatchOp.delete_neighbour(dev.index, sn.network_address), BatchOp.delete_fdb(dev.index, m, p),
                     BatchOp.delete_route(Route(sn, sn.network_address, dev.index, onlink=True))]
        assert await nl.batch(dels * 2) == [None] * len(dels) * 2  # twice: gone is fine
        sn, m, p = extra(25)
        await nl.delete_neighbour(dev.index, sn.network_address)
        await nl.delete_fdb(dev.index, m, p)
        await nl.delete_route(Route(sn, sn.network_address, dev.index, onlink=True))
        await nl.delete_route(Route(sn, sn.network_address, dev.index, onlink=True))
        link = await nl.link(name="flannel-v6.1")
        print(json.dumps({
            "local6": str(link.info.get("IFLA_VXLAN_LOCAL6")),
            "addrs": sorted(str(a) for a in await nl.addresses(dev.index, V6) if not a.is_link_local),
            "addrs4": [str(a) for a in await nl.addresses(dev.index)],
            "neigh": sorted((str(n.ip), n.mac) for n in await nl.neighbours(dev.index, V6) if n.permanent),
            "neigh4": len(await nl.neighbours(dev.index)),
            "fdb": sorted((f.mac, str(f.dst)) for f in await nl.fdb(dev.index, V6) if f.dst is not None),
            "fdb4": [f.mac for f in await nl.fdb(dev.index) if f.dst is not None],
            "routes": sorted(str(r.dst) for r in await nl.routes(family=V6) if r.oif == dev.index and r.onlink),
            "routes4": [str(r.dst) for r in await nl.routes() if r.oif == dev.index],
            "get": [(str(r.dst), str(r.gateway), r.oif == dev.index) for r in await nl.route_get(peer.network_address + 5)],
            "get_pub": [(str(r.gateway), r.oif == eth0.index) for r in await nl.route_get(A(peer_pub))],
        }))
asyncio.run(main())
"""


@pytest.mark.lab
def test_ipv6_vxlan_neighbour_fdb_route_and_address_program_the_kernel(lab):
    h1, h2 = lab.add_host("h1", ipv6=True), lab.add_host("h2", ipv6=True)
    macs = ("0e:2a:00:00:06:01", "0e:2a:00:00:06:02")
    subnets = ("fd80:0:0:1::/64", "fd80:0:0:2::/64")
    seen = []
    for me, other, i in ((h1, h2, 0), (h2, h1, 1)):
        cp = me.run(PYTHON, "-c", V6_PEER, me.address6, subnets[i], other.address6, subnets[1 - i], macs[i],
                    macs[1 - i], check=False, timeout=60)
        assert cp.returncode == 0, cp.stderr
        seen.append(json.loads(cp.stdout))
    s = seen[0]
    extra = [(f"fd80:0:1:{i:x}::", "02:be:00:00:01:%02x" % i, f"fd99::1:{i:x}") for i in range(1, 25)]
    assert s["local6"] == "fd99::1"
    assert s["addrs"] == ["fd80:0:0:1::/128"] and s["addrs4"] == []
    assert s["neigh"] == sorted([["fd80:0:0:2::", macs[1]]] + [[n, m] for n, m, _ in extra])
    assert s["fdb"] == sorted([[macs[1], "fd99::2"]] + [[m, p] for _, m, p in extra])
    assert s["routes"] == sorted(["fd80:0:0:2::/64"] + [f"{n}/64" for n, _, _ in extra])
    assert (s["neigh4"], s["fdb4"], s["routes4"]) == (0, [], [])  # the IPv4 listings stay IPv4
    assert s["get"] == [["fd80:0:0:2::5/128", "fd80:0:0:2::", True]]
    assert s["get_pub"] == [["None", True]]  # on-link: what DirectRouting looks for
    # what an operator sees, upstream's entries exactly
    routes = h1.ip("-6", "-d", "route", "show", "dev", "flannel-v6.1")
    assert "unicast fd80:0:0:2::/64 via fd80:0:0:2:: proto boot scope global metric 1024 onlink" in routes
    assert f"fd80:0:0:2:: lladdr {macs[1]} PERMANENT" in h1.ip("-6", "neigh", "show", "dev", "flannel-v6.1")
    assert f"{macs[1]} dst fd99::2 self permanent" in h1.bridge("fdb", "show", "dev", "flannel-v6.1")
    assert h1.run("cat", "/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra").stdout.strip() == "0"
    # and the overlay carries traffic over the IPv6 underlay (once DAD has finished on the /128s)
    assert h1.wait_ping("fd80:0:0:2::", timeout=10) and h2.wait_ping("fd80:0:0:1::", timeout=10)
