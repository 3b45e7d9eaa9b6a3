"""vxlan backend against the real kernel, in lab namespaces (each backend in its own process)."""

from __future__ import annotations

import json
import re

import pytest
from backend_harness import (
    BackendProc,
    DriverError,
    connect,
    lease_json,
    lines,
    start_node,
    vxlan_lease,
)
from helpers import wait_for

pytestmark = pytest.mark.lab

NET = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}


def cfg(**backend) -> dict:
    return {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **backend}}


def mac_of(node) -> str:
    return node.info["backend_data"]["VtepMAC"]


def vxlan_state(host, dev: str = "flannel.1") -> dict[str, set[str]]:
    return {
        "neigh": lines(host.ip("neigh", "show", "dev", dev)),
        "fdb": lines(host.bridge("fdb", "show", "dev", dev)),
        "routes": lines(host.ip("route", "show")),
    }


def peer_entries(peer) -> dict[str, set[str]]:
    """Upstream's three entries for one remote vxlan lease, as iproute2 prints them."""
    net = peer.subnet.split("/")[0]
    return {
        "neigh": {f"{net} lladdr {mac_of(peer)} PERMANENT"},
        "fdb": {f"{mac_of(peer)} dst {peer.host.address} self permanent"},
        "routes": {f"{peer.subnet} via {net} dev flannel.1 onlink"},
    }


def has_entries(host, peer) -> bool:
    st, want = vxlan_state(host), peer_entries(peer)
    return all(want[k] <= st[k] for k in want)


def has_none_of(host, peer) -> bool:
    st, want = vxlan_state(host), peer_entries(peer)
    return not any(want[k] & st[k] for k in want)


@pytest.fixture
def pair(lab):
    a = start_node(lab, "h1", "10.5.1.0/24", NET)
    b = start_node(lab, "h2", "10.5.2.0/24", NET)
    connect([a, b])
    yield a, b
    a.proc.close()
    b.proc.close()


def test_device_entries_and_pod_traffic(lab, pair):
    a, b = pair
    # BackendInfo: MTU − 50, BackendData with VNI and a locally administered unicast MAC
    assert a.info["mtu"] == 1450 and a.info["backend_type"] == "vxlan"
    assert set(a.info["backend_data"]) == {"VNI", "VtepMAC"} and a.info["backend_data"]["VNI"] == 1
    first = int(mac_of(a).split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    # the device: exactly upstream's attributes
    link = a.host.ip("-d", "link", "show", "flannel.1")
    assert f"link/ether {mac_of(a)} " in link and " mtu 1450 " in link
    assert re.search(r"vxlan id 1 local 192\.168\.100\.1 dev eth0 srcport 0 0 dstport 8472 nolearning ", link)
    assert "gbp" not in link
    assert "<BROADCAST,MULTICAST,UP,LOWER_UP>" in link
    addrs = [a["local"] + "/" + str(a["prefixlen"]) for i in a.host.ip_json("-4", "addr", "show", "flannel.1")
             for a in i["addr_info"]]
    assert addrs == ["10.5.1.0/32"]
    assert a.host.run("cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra").stdout.strip() == "0"
    # per remote lease: ARP, FDB, onlink route — and nothing else of ours
    st = vxlan_state(a.host)
    assert st["neigh"] == peer_entries(b)["neigh"]
    assert st["fdb"] == peer_entries(b)["fdb"]
    assert st["routes"] == {
        "default via 192.168.100.254 dev eth0",
        "10.5.1.0/24 dev docker0 proto kernel scope link src 10.5.1.1",
        "10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink",
        "192.168.100.0/24 dev eth0 proto kernel scope link src 192.168.100.1",
    }
    assert has_entries(b.host, a)
    # pod to pod over vxlan, both ways, and host to remote pod (source = 10.5.1.0 on flannel.1)
    assert a.pod.ping(b.pod.address, count=2)
    assert b.pod.ping(a.pod.address, count=2)
    assert a.host.ping(b.pod.address)
    # the traffic really is vxlan: the UDP/8472 counter on the device moved
    stats = a.host.ip_json("-s", "link", "show", "flannel.1")[0]["stats64"]
    assert stats["tx"]["packets"] >= 2 and stats["rx"]["packets"] >= 2


def test_remove_peer_undoes_all_three(lab, pair):
    a, b = pair
    a.proc.call("remove_peer", lease=b.lease)
    assert has_none_of(a.host, b)
    st = vxlan_state(a.host)
    assert st["neigh"] == set() and st["fdb"] == set()
    assert not a.pod.ping(b.pod.address, timeout=0.5)
    # and back
    a.proc.call("add_peer", lease=b.lease)
    assert has_entries(a.host, b)
    assert a.pod.ping(b.pod.address)


@pytest.mark.parametrize("what", ["route", "neigh", "fdb"])
def test_deleted_entry_is_restored_by_netlink_event(lab, pair, what):
    a, b = pair
    repairs = a.proc.log().count("kernel state reconciled")
    if what == "route":
        a.host.ip("route", "del", b.subnet)
    elif what == "neigh":
        a.host.ip("neigh", "del", "10.5.2.0", "dev", "flannel.1")
    else:
        a.host.bridge("fdb", "del", mac_of(b), "dev", "flannel.1", "dst", b.host.address)
    wait_for(lambda: has_entries(a.host, b) and a.proc.log().count("kernel state reconciled") > repairs, 30,
             f"the deleted {what} restored (and the repair logged)", detail=lambda: vxlan_state(a.host))
    assert a.pod.ping(b.pod.address)


def test_changed_entries_fixed_by_reconcile(lab, pair):
    """Changes that emit no delete event (a replaced route, a changed ARP MAC) wait for the timer pass."""
    a, b = pair
    a.host.ip("route", "replace", b.subnet, "via", "192.168.100.254", "dev", "eth0")
    a.host.ip("neigh", "replace", "10.5.2.0", "lladdr", "02:00:00:00:00:99", "dev", "flannel.1", "nud", "permanent")
    a.proc.call("reconcile")
    st = vxlan_state(a.host)
    assert peer_entries(b)["routes"] <= st["routes"] and peer_entries(b)["neigh"] == st["neigh"]
    assert not any("192.168.100.254" in r and r.startswith("10.5.2.0") for r in st["routes"])
    # the daemon's timer: reconcile() every period
    a.host.ip("route", "replace", b.subnet, "via", "192.168.100.254", "dev", "eth0")
    a.proc.call("timer", period=0.3)
    wait_for(lambda: peer_entries(b)["routes"] <= vxlan_state(a.host)["routes"], 30,
             "the replaced route fixed by the timer pass", detail=lambda: vxlan_state(a.host))


@pytest.mark.parametrize("what", ["route", "neigh", "fdb", "address"])
def test_changed_entry_is_repaired_by_netlink_event(lab, pair, what):
    """An entry someone replaces (no delete event), or the device's address removed, is repaired
    within ~0.1 s of its notification — not at the next safety-net pass (a minute)."""
    a, b = pair
    wrong = {"route": f"{b.subnet} via 192.168.100.254 dev eth0",
             "neigh": "10.5.2.0 lladdr 02:00:00:00:00:99 PERMANENT",
             "fdb": f"{mac_of(b)} dst 192.168.100.254 self permanent"}.get(what)
    if what == "route":
        a.host.ip("route", "replace", b.subnet, "via", "192.168.100.254", "dev", "eth0")
    elif what == "neigh":
        a.host.ip("neigh", "replace", "10.5.2.0", "lladdr", "02:00:00:00:00:99", "dev", "flannel.1", "nud", "permanent")
    elif what == "fdb":
        a.host.bridge("fdb", "replace", mac_of(b), "dev", "flannel.1", "dst", "192.168.100.254", "self", "permanent")
    else:
        a.host.ip("addr", "del", "10.5.1.0/32", "dev", "flannel.1")

    def repaired() -> bool:
        st = vxlan_state(a.host)
        addrs = a.host.ip("-4", "addr", "show", "flannel.1")
        return has_entries(a.host, b) and not any(wrong in x for x in st.values()) and "10.5.1.0/32" in addrs

    # the safety-net pass is a minute away: a repair within 30 s was started by the notification
    wait_for(repaired, 30, f"the {what} repaired after its netlink event", detail=lambda: vxlan_state(a.host))
    assert a.pod.ping(b.pod.address)


def test_deleted_device_is_recreated_with_same_mac(lab, pair):
    a, b = pair
    old_index = a.host.ip_json("link", "show", "flannel.1")[0]["ifindex"]
    a.host.ip("link", "del", "flannel.1")

    def back():
        return a.host.link_exists("flannel.1") and has_entries(a.host, b)

    wait_for(back, 30, "flannel.1 and the peer's entries back", detail=lambda: vxlan_state(a.host))
    link = a.host.ip_json("-d", "link", "show", "flannel.1")[0]
    assert link["ifindex"] != old_index
    assert link["address"] == mac_of(a) and link["mtu"] == 1450 and "UP" in link["flags"]
    assert [x["local"] for x in a.host.ip_json("-4", "addr", "show", "flannel.1")[0]["addr_info"]] == ["10.5.1.0"]
    assert a.pod.ping(b.pod.address, count=2)
    assert "vxlan device recreated" in a.proc.log()


def test_stale_entries_removed_at_start_foreign_kept(lab):
    a = start_node(lab, "h1", "10.5.1.0/24", NET)
    b = start_node(lab, "h2", "10.5.2.0/24", NET)
    c = start_node(lab, "h3", "10.5.3.0/24", NET)
    connect([a, b, c])
    assert has_entries(a.host, b) and has_entries(a.host, c)
    mac = mac_of(a)
    a.proc.close()  # daemon stops; kernel state stays
    # while it is down: c's lease vanishes; someone adds foreign routes we must not touch
    a.host.ip("route", "add", "172.16.0.0/24", "via", "192.168.100.254")
    a.host.ip("route", "add", "10.5.0.0/16", "via", "192.168.100.254", "metric", "500")
    a.host.ip("route", "add", "172.17.0.0/24", "via", "10.5.2.0", "dev", "flannel.1", "onlink")
    a2 = BackendProc(a.host, NET, log_dir=lab.tmp, name="restart")
    info = a2.call("register")
    assert info["backend_data"]["VtepMAC"] == mac  # the existing compatible device is reused
    a2.call("start", lease=a.lease)
    # a timer pass before the first lease snapshot must not treat every old entry as stale
    a2.call("reconcile")
    assert has_entries(a.host, b) and has_entries(a.host, c)
    a2.call("set_peers", leases=[b.lease])
    assert has_entries(a.host, b)
    assert has_none_of(a.host, c)
    routes = lines(a.host.ip("route", "show"))
    assert {"172.16.0.0/24 via 192.168.100.254 dev eth0",
            "10.5.0.0/16 via 192.168.100.254 dev eth0 metric 500",
            "172.17.0.0/24 via 10.5.2.0 dev flannel.1 onlink",
            "default via 192.168.100.254 dev eth0",
            "10.5.1.0/24 dev docker0 proto kernel scope link src 10.5.1.1"} <= routes
    assert a.pod.ping(b.pod.address)
    a2.close()
    b.proc.close()
    c.proc.close()


def test_incompatible_device_recreated(lab):
    h = lab.add_host("h1")
    h.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", h.address, "dev", "eth0",
         "dstport", "4789", "nolearning")
    h.ip("link", "set", "flannel.1", "address", "02:11:11:11:11:11")
    a = start_node(lab, "h1", "10.5.1.0/24", NET, host=h, pod=False)
    link = h.ip("-d", "link", "show", "flannel.1")
    assert "dstport 8472" in link and mac_of(a) in link and "02:11:11:11:11:11" not in link
    assert "incompatible configuration" in a.proc.log()
    a.proc.close()
    # a compatible one (another MAC, another MTU) is reused, its MAC kept, MTU corrected
    h.ip("link", "set", "flannel.1", "mtu", "1300")
    h.sh("echo 1 > /proc/sys/net/ipv6/conf/flannel.1/accept_ra")
    assert h.run("cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra").stdout.strip() == "1"
    a2 = BackendProc(h, NET, log_dir=lab.tmp, name="again")
    assert a2.call("register")["backend_data"]["VtepMAC"] == mac_of(a)
    assert h.ip_json("link", "show", "flannel.1")[0]["mtu"] == 1450
    assert h.run("cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra").stdout.strip() == "0"
    a2.close()


def test_other_backend_type_lease_skipped_once(lab, pair):
    a, b = pair
    other = lease_json("10.5.9.0/24", "192.168.100.9", "host-gw")
    a.proc.call("add_peer", lease=other)
    a.proc.call("set_peers", leases=[b.lease, other])
    a.proc.call("reconcile")
    a.proc.call("reconcile")
    st = vxlan_state(a.host)
    assert not any("10.5.9.0" in x for k in st for x in st[k])
    assert has_entries(a.host, b)
    assert a.proc.log().count("ignoring non-vxlan subnet") == 1


def test_bad_peer_does_not_stop_others(lab, pair):
    a, b = pair
    bad_mac = lease_json("10.5.7.0/24", "192.168.100.7", "vxlan", {"VNI": 1, "VtepMAC": "nonsense"})
    no_data = lease_json("10.5.8.0/24", "192.168.100.8", "vxlan", None)
    good = vxlan_lease("10.5.6.0/24", "192.168.100.6", "02:00:00:00:06:06")
    a.proc.call("set_peers", leases=[bad_mac, b.lease, no_data, good])
    st = vxlan_state(a.host)
    assert has_entries(a.host, b)
    assert "10.5.6.0/24 via 10.5.6.0 dev flannel.1 onlink" in st["routes"]
    assert not any(x.startswith(("10.5.7.", "10.5.8.")) for x in st["routes"] | st["neigh"])
    assert "error decoding subnet lease JSON" in a.proc.log()


def test_peer_restart_with_new_mac(lab, pair):
    a, b = pair
    new = vxlan_lease(b.subnet, b.host.address, "02:aa:bb:cc:dd:ee")
    a.proc.call("add_peer", lease=new)
    st = vxlan_state(a.host)
    assert st["fdb"] == {f"02:aa:bb:cc:dd:ee dst {b.host.address} self permanent"}
    assert st["neigh"] == {"10.5.2.0 lladdr 02:aa:bb:cc:dd:ee PERMANENT"}


def test_direct_routing(lab):
    c = cfg(DirectRouting=True)
    a = start_node(lab, "h1", "10.5.1.0/24", c)
    b = start_node(lab, "h2", "10.5.2.0/24", c)
    far = start_node(lab, "h3", "10.5.3.0/24", c, underlay="192.168.101.0/24")  # behind the switch router
    connect([a, b, far])
    routes = lines(a.host.ip("route", "show"))
    assert "10.5.2.0/24 via 192.168.100.2 dev eth0" in routes  # same L2: plain route, no vxlan
    assert "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink" in routes  # routed peer: vxlan
    st = vxlan_state(a.host)
    assert st["fdb"] == {f"{mac_of(far)} dst {far.host.address} self permanent"}
    assert st["neigh"] == {f"10.5.3.0 lladdr {mac_of(far)} PERMANENT"}
    assert a.pod.ping(b.pod.address, count=2)
    assert a.pod.ping(far.pod.address, count=2)
    # the direct route is repaired too, and removed with its lease
    a.host.ip("route", "del", "10.5.2.0/24")
    wait_for(lambda: "10.5.2.0/24 via 192.168.100.2 dev eth0" in lines(a.host.ip("route")), 30,
             "the direct route restored", detail=lambda: a.host.ip("route"))
    a.proc.call("remove_peer", lease=b.lease)
    assert not any(r.startswith("10.5.2.0/24") for r in lines(a.host.ip("route")))


def test_options_port_gbp_learning_mtu(lab):
    c = cfg(VNI=42, Port=4789, GBP=True, Learning=True, MTU=1400)
    a = start_node(lab, "h1", "10.5.1.0/24", c)
    b = start_node(lab, "h2", "10.5.2.0/24", c)
    connect([a, b])
    assert a.info["mtu"] == 1350 and a.info["backend_data"]["VNI"] == 42
    link = a.host.ip("-d", "link", "show", "flannel.42")
    assert " mtu 1350 " in link
    assert re.search(r"vxlan id 42 local 192\.168\.100\.1 dev eth0 srcport 0 0 dstport 4789 ", link)
    assert " nolearning " not in link and " gbp" in link
    assert "10.5.2.0/24 via 10.5.2.0 dev flannel.42 onlink" in lines(a.host.ip("route"))
    assert a.pod.ping(b.pod.address, count=2)
    # with Learning, entries the kernel learned (not permanent) are not ours to remove
    a.host.bridge("fdb", "add", "02:00:00:00:00:77", "dev", "flannel.42", "dst", "192.168.100.77", "dynamic")
    a.proc.call("reconcile")
    fdb = a.host.bridge("fdb", "show", "dev", "flannel.42")
    assert "02:00:00:00:00:77 dst 192.168.100.77" in fdb
    assert f"{mac_of(b)} dst {b.host.address} self permanent" in fdb


def test_bad_option_type_is_one_line_error(lab):
    h = lab.add_host("h1")
    p = BackendProc(h, json.dumps(cfg(VNI="1")), log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    assert ei.value.type == "BackendError" and not h.link_exists("flannel.1")
    assert str(ei.value) == ("error decoding VXLAN backend config: json: cannot unmarshal string into "
                             "Go struct field .VNI of type int")


@pytest.mark.parametrize(("option", "says"), [
    ({"Port": 70000}, "Port 70000 is out of range 0-65535"), ({"Port": -5}, "Port -5 is out of range"),
    ({"VNI": -1}, "VNI -1 is out of range 0-16777215"), ({"VNI": 1 << 24}, "VNI 16777216 is out of range"),
    ({"MTU": 10}, "MTU 10 leaves the device less than 68"), ({"MTU": 100_000}, "MTU 100000 is out of range"),
])
def test_option_out_of_range_is_one_line_error(lab, option, says):
    """These reached pyroute2's encoder: 'internal error: error("'H' format requires ...")' and a
    pyroute2 traceback in the log (or a bare ERANGE/EINVAL from the kernel)."""
    h = lab.add_host("h1")
    p = BackendProc(h, json.dumps(cfg(**option)), log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    assert ei.value.type == "BackendError" and not any(h.link_exists(f"flannel.{v}") for v in (1, -1, 1 << 24))
    assert str(ei.value).startswith(f"VXLAN backend config: {says}"), str(ei.value)


def test_not_root_is_a_clear_error(lab):
    h = lab.add_host("h1")
    p = BackendProc(h, NET, log_dir=lab.tmp, user="65534")
    with pytest.raises(DriverError) as ei:
        p.call("register")
    assert ei.value.type == "BackendError"
    assert "operation not permitted: run pyflanneld as root" in str(ei.value)
    assert "\n" not in str(ei.value)
    p.close()
