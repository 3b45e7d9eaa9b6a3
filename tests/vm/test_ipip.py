"""ipip in a mixed cluster, under Debian's kernel (run inside the lab VM by tests/test_vm.py).

h1 and h2 run pyflanneld, h3 the real upstream v0.20.2 binary, all on 192.168.100.0/24, with
``DirectRouting`` on, plus h4 (pyflanneld) on the other underlay subnet 192.168.101.0/24: the three
on one subnet route to each other directly over eth0, and everyone reaches h4 (and h4 everyone)
through ``flannel.ipip``. Checked as an operator would: leases, device, routes (the same lines on
pyflanneld and upstream hosts), pod pings across every pair, IP-in-IP (protocol 4) on the
underlay for h4's traffic, and a deleted route and device coming back.
"""

from __future__ import annotations

import pytest
from e2e_helpers import NETWORK, wait_for
from vmcluster import (
    CONVERGE_S,
    Capture,
    dump_logs,
    lease,
    lease_raw,
    link_summary,
    mlab,  # noqa: F401 (fixture)
    normalise,
    pings,
    pods_unreachable,
    start_cluster,
)

from lab import Host

DEV = "flannel.ipip"


@pytest.fixture(scope="module")
def cluster(mlab):  # noqa: F811
    members = start_cluster(mlab, {"Type": "ipip", "DirectRouting": True}, [
        ("h1", None, False), ("h2", None, False), ("h3", None, True), ("h4", "192.168.101.0/24", False)])
    try:
        wait_for(lambda: all(routes(m) == expected(members, m) for m in members), CONVERGE_S, "routes converged")
    except AssertionError:
        print(dump_logs(mlab))
    return members


@pytest.fixture(autouse=True)
def _logs_on_failure(request, mlab):  # noqa: F811
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(dump_logs(mlab))


def flannel_routes(host: Host) -> set[str]:
    """The routes to other hosts' subnets (inside the Network, not the own docker0 one)."""
    out = set()
    for ln in host.ip("route", "show").splitlines():
        ln = " ".join(ln.split())
        if ln.startswith("10.5.") and " dev docker0 " not in ln:
            out.add(ln)
    return out


def routes(m) -> set[str]:
    return flannel_routes(m.host)


def expected(cluster, m) -> set[str]:
    """Upstream's routes on m: direct over eth0 to a peer on the same underlay subnet, else via
    the peer's PublicIP onlink over flannel.ipip."""
    out = set()
    same = m.name != "h4"
    for o in cluster:
        if o is m:
            continue
        direct = same and o.name != "h4"
        out.add(f"{o.node.subnet} via {o.node.ip} dev {'eth0' if direct else DEV} onlink")
    return out


def test_leases_and_devices_as_upstream(mlab, cluster):  # noqa: F811
    up = cluster[2]
    for m in cluster:
        assert lease(mlab, m) == {"PublicIP": m.node.ip, "PublicIPv6": None, "BackendType": "ipip"}, m.name
        assert normalise(lease_raw(mlab, m), {m.node.ip: "IP"}) == normalise(lease_raw(mlab, up), {up.node.ip: "IP"})
        assert m.node.env == {"FLANNEL_NETWORK": NETWORK, "FLANNEL_SUBNET": f"{m.node.subnet.network_address + 1}/24",
                              "FLANNEL_MTU": "1480", "FLANNEL_IPMASQ": "false"}, m.name
        link = link_summary(m.host, DEV)
        assert f"ipip any remote any local {m.node.ip} " in link, link
        assert link.replace(m.node.ip, "IP") == link_summary(up.host, DEV).replace(up.node.ip, "IP"), m.name
        assert [f"{a['local']}/{a['prefixlen']}" for i in m.host.ip_json("-4", "addr", "show", DEV)
                for a in i["addr_info"]] == [f"{m.node.subnet.network_address}/32"], m.name


def test_routes_direct_and_tunnelled_and_pod_traffic(mlab, cluster):  # noqa: F811
    for m in cluster:
        assert routes(m) == expected(cluster, m), m.name
    assert pods_unreachable(cluster) == []
    h1, h2, h3, h4 = cluster
    # to h4 (other subnet): IP-in-IP between the hosts' addresses; to h2 (same subnet): plain, direct
    tunnel = f"IP {h1.node.ip} > {h4.node.ip}: IP {h1.node.pod.address} > {h4.node.pod.address}: ICMP echo request"
    direct = f"IP {h1.node.pod.address} > {h2.node.pod.address}: ICMP echo request"

    def counts(packets: list[str]) -> tuple[int, int]:
        return sum(tunnel in p for p in packets), sum(direct in p for p in packets)

    cap = Capture(mlab.switch, f"v{h1.name}")  # the switch port: only what is on the wire
    try:
        assert pings(h1.node.pod, h4.node.pod.address, count=3)
        assert pings(h1.node.pod, h2.node.pod.address, count=3)
    finally:
        packets = cap.wait(lambda pk: min(counts(pk)) >= 3, "3 tunnelled and 3 direct echo requests")
    assert min(counts(packets)) >= 3, "\n".join(packets)


def test_deleted_route_and_device_come_back(mlab, cluster):  # noqa: F811
    h1, h2, h3, h4 = cluster
    h1.host.ip("route", "del", str(h4.node.subnet))
    wait_for(lambda: routes(h1) == expected(cluster, h1), CONVERGE_S, "h1's route to h4 back")
    h4.host.ip("link", "del", DEV)
    wait_for(lambda: h4.host.link_exists(DEV) and routes(h4) == expected(cluster, h4), CONVERGE_S,
             "h4's device and routes back")
    assert f"ipip any remote any local {h4.node.ip} " in link_summary(h4.host, DEV)
    assert pods_unreachable(cluster) == []
