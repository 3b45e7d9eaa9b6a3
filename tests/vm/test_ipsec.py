"""ipsec in a mixed cluster, under Debian's kernel (run inside the lab VM by tests/test_vm.py).

h1 and h2 run pyflanneld, h3 the real upstream v0.20.2 binary; each runs its own strongSwan charon
(in a private /run: charon's pid file and VICI socket live at fixed paths). Checked: leases, MTU,
the three XFRM policies per peer (the same ``ip xfrm policy`` lines on pyflanneld and upstream
hosts), pod pings across every pair with ESP on the underlay and no pod ICMP in clear, and a policy
deleted by hand coming back.
"""

from __future__ import annotations

import pytest
from e2e_helpers import NETWORK, wait_for
from vmcluster import (
    PRIVATE_RUN,
    Capture,
    dump_logs,
    lease,
    lease_raw,
    mlab,  # noqa: F401 (fixture)
    normalise,
    pings,
    pods_unreachable,
    start_cluster,
)

PSK = "f" * 24 + "lannel-ipsec-lab-pre-shared-key-of-at-least-96-characters-as-upstream-requires-0123456789"
IKE_S = 180  # IKEv2 with modp4096 under emulation


@pytest.fixture(scope="module")
def cluster(mlab):  # noqa: F811
    return start_cluster(mlab, {"Type": "ipsec", "PSK": PSK},
                         [("h1", None, False), ("h2", None, False), ("h3", None, True)], wrap=PRIVATE_RUN)


@pytest.fixture(autouse=True)
def _logs_on_failure(request, mlab):  # noqa: F811
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(dump_logs(mlab))


def xfrm_policies(m) -> set[str]:
    """``ip xfrm policy``, one line per policy."""
    out, cur = set(), []
    for ln in m.host.ip("xfrm", "policy").splitlines():
        if not ln.startswith(("\t", " ")) and cur:
            out.add(" ".join(cur))
            cur = []
        cur.append(" ".join(ln.split()))
    if cur:
        out.add(" ".join(cur))
    return {p for p in out if " dir " in p}  # not charon's own per-socket bypass policies ("socket in")


def expected_policies(cluster, m) -> set[str]:
    out = set()
    for o in cluster:
        if o is m:
            continue
        me, it = (m.node.subnet, m.node.ip), (o.node.subnet, o.node.ip)
        for (src, tsrc), (dst, tdst), d in ((me, it, "out"), (it, me, "in"), (it, me, "fwd")):
            out.add(f"src {src} dst {dst} dir {d} priority 0 ptype main tmpl src {tsrc} dst {tdst} "
                    "proto esp reqid 11 mode tunnel")
    return out


def test_leases_and_policies_as_upstream(mlab, cluster):  # noqa: F811
    up = cluster[2]
    for m in cluster:
        assert lease(mlab, m) == {"PublicIP": m.node.ip, "PublicIPv6": None, "BackendType": "ipsec"}, m.name
        assert normalise(lease_raw(mlab, m), {m.node.ip: "IP"}) == normalise(lease_raw(mlab, up), {up.node.ip: "IP"})
        assert m.node.env["FLANNEL_MTU"] == "1423" and m.node.env["FLANNEL_NETWORK"] == NETWORK, m.name
    for m in cluster:
        wait_for(lambda m=m: xfrm_policies(m) == expected_policies(cluster, m), 60, f"{m.name}'s policies")


def test_pod_traffic_is_esp(mlab, cluster):  # noqa: F811
    assert pods_unreachable(cluster, timeout=IKE_S) == []
    h1, h2, h3 = cluster

    def esp_to_peers(packets: list[str]) -> int:
        return sum(f" > {h2.node.ip}: ESP(" in p or f" > {h3.node.ip}: ESP(" in p for p in packets)

    cap = Capture(mlab.switch, f"v{h1.name}")  # the switch port: only what is on the wire
    try:
        for dst in (h2, h3):
            assert pings(h1.node.pod, dst.node.pod.address, count=3), dst.name
    finally:
        packets = cap.wait(lambda pk: esp_to_peers(pk) >= 6, "6 ESP packets to the peers")
    assert esp_to_peers(packets) >= 6, "\n".join(packets)
    assert not [p for p in packets if ": ICMP echo" in p], "\n".join(packets)  # no pod ICMP in clear


def test_deleted_policy_comes_back(mlab, cluster):  # noqa: F811
    h1, h2, _ = cluster
    # (the delete fails if the policy was not there; the repair may come at once, so the state
    # between the two is not checked)
    h1.host.ip("xfrm", "policy", "delete", "src", str(h1.node.subnet), "dst", str(h2.node.subnet), "dir", "out")
    wait_for(lambda: xfrm_policies(h1) == expected_policies(cluster, h1), 60, "h1's policy back (10 s reconcile)")
    assert pings(h1.node.pod, h2.node.pod.address)
