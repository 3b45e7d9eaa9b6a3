"""nftables mode (``EnableNFTables: true``) through the real daemon: upstream's ruleset, traffic
with masquerade, repair of a flushed chain, and a host switched between iptables and nftables mode.

The expected ruleset is upstream's (pkg/trafficmngr/nftables/nftables.go, v0.25+: tables
``flannel-ipv4``/``flannel-ipv6``, chains ``forward`` and ``postrtg``), as ``nft list`` prints it,
written out here. For the JSON comparison the same text
is loaded by ``nft -f`` into a namespace no daemon touches, and both ``nft -j`` listings are
compared (handles dropped): what pyflanneld installs is what nft makes of upstream's rules.
"""

from __future__ import annotations

import json

import pytest
from e2e_helpers import (
    GOLDEN_FORWARD,
    GOLDEN_POSTROUTING,
    NETWORK,
    PREFIX,
    attach_pod,
    golden_fwd,
    golden_postrtg,
    iptables_s,
    ping_all,
    start_nodes,
    wait_for,
)
from helpers import upstream_or_skip

from lab import start_daemon

pytestmark = pytest.mark.lab

HOSTGW = {"Type": "host-gw"}


def nft_config(enable: bool = True) -> str:
    return json.dumps({"Network": NETWORK, "EnableNFTables": enable, "Backend": HOSTGW})


def upstream_v4(network: str, subnet: str, fully_random: bool = True, masq: bool = True, forward: bool = True) -> str:
    """``nft list table ip flannel-ipv4`` on an upstream host (N = network, S = its subnet)."""
    m = "masquerade fully-random" if fully_random else "masquerade"
    chains = []
    if masq:
        chains.append(
            "\tchain postrtg {\n"
            '\t\tcomment "chain to manage traffic masquerading by flannel"\n'
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            "\t\tmeta mark 0x00004000 return\n"
            f"\t\tip saddr {subnet} ip daddr {network} return\n"
            f"\t\tip saddr {network} ip daddr {subnet} return\n"
            f"\t\tip saddr != {subnet} ip daddr {network} return\n"
            f"\t\tip saddr {network} ip daddr != 224.0.0.0/4 {m}\n"
            f"\t\tip saddr != {network} ip daddr {network} {m}\n"
            "\t}\n")
    if forward:
        chains.append(
            "\tchain forward {\n"
            '\t\tcomment "chain to accept flannel traffic"\n'
            "\t\ttype filter hook forward priority filter; policy accept;\n"
            f"\t\tip saddr {network} accept\n"
            f"\t\tip daddr {network} accept\n"
            "\t}\n")
    return 'table ip flannel-ipv4 {\n\tcomment "rules for flannel-ipv4"\n' + "\n".join(chains) + "}\n"


UPSTREAM_V6_EMPTY = 'table ip6 flannel-ipv6 {\n\tcomment "rules for flannel-ipv6"\n}\n'


def nft_text(host, family: str = "ip", table: str = "flannel-ipv4") -> str | None:
    cp = host.run("nft", "list", "table", family, table, check=False)
    return cp.stdout if cp.returncode == 0 else None


def nft_json(host, family: str = "ip", table: str = "flannel-ipv4") -> list | None:
    """``nft -j list table`` objects without metainfo and handles (None: no such table)."""
    cp = host.run("nft", "-j", "list", "table", family, table, check=False)
    if cp.returncode != 0:
        return None

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "handle"}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return [strip(o) for o in json.loads(cp.stdout)["nftables"] if "metainfo" not in o]


def reference_json(lab, text: str) -> list:
    """Upstream's ruleset text loaded by nft itself into a fresh namespace, listed as JSON."""
    ref = lab.hosts.get("ref") or lab.add_host("ref")
    ref.run("nft", "flush", "ruleset")
    ref.run("nft", "-f", "-", input=text)
    return nft_json(ref)


def flannel_iptables(host) -> list[str]:
    """Every iptables rule or chain of flannel's in nat and filter."""
    out = []
    for table in ("nat", "filter"):
        out += [ln for ln in host.run("iptables", "-w", "-t", table, "-S").stdout.splitlines()
                if "FLANNEL" in ln or "flanneld" in ln]
    return out


def flannel_nft_tables(host) -> list[str]:
    return [ln for ln in host.run("nft", "list", "tables").stdout.splitlines() if "flannel" in ln]


def test_nftables_ruleset_is_upstreams_and_masquerades(lab, etcd):
    etcd.put(f"{PREFIX}/config", nft_config())
    ext = lab.add_host("ext")  # a machine outside the flannel network, on the same underlay
    n1, n2 = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")], "--ip-masq")
    for n in (n1, n2):
        want = upstream_v4(NETWORK, str(n.subnet))
        assert nft_text(n.host) == want
        assert nft_text(n.host, "ip6", "flannel-ipv6") == UPSTREAM_V6_EMPTY
        assert nft_json(n.host) == reference_json(lab, want)
        assert flannel_iptables(n.host) == []  # no iptables rules in this mode
        assert "nftables rules" in n.daemon.log_text() and "Traceback" not in n.daemon.log_text()

    # a pod reaching an address outside the Network is masqueraded (the far side sees h1) ...
    cap = ext.popen("tcpdump", "-l", "-n", "-i", "eth0", "icmp and icmp[icmptype] == icmp-echo", name="cap-ext")
    wait_for(lambda: "listening on" in cap.log_text(), 30, "tcpdump on ext")
    assert n1.pod.wait_ping(ext.address, timeout=30)
    wait_for(lambda: f"IP {n1.host.address} > {ext.address}: ICMP echo request" in cap.log_text(), 30,
             "the masqueraded echo request on ext")
    assert n1.pod.address not in cap.log_text()
    # ... while pod-to-pod traffic keeps the pod's address (the return rules before the masquerade)
    cap2 = n2.host.popen("tcpdump", "-l", "-n", "-i", "docker0", "icmp and icmp[icmptype] == icmp-echo",
                         name="cap-h2")
    wait_for(lambda: "listening on" in cap2.log_text(), 30, "tcpdump on h2")
    assert ping_all([n1.pod, n2.pod]) == []
    wait_for(lambda: f"IP {n1.pod.address} > {n2.pod.address}: ICMP echo request" in cap2.log_text(), 30,
             "the unmasqueraded pod-to-pod echo request on h2")
    assert f"IP {n1.host.address} > {n2.pod.address}" not in cap2.log_text()


def test_nftables_options(lab, etcd):
    """--ip-masq-fully-random-disable and --iptables-forward-rules=false shape the table as upstream's;
    without --ip-masq there is no postrtg chain (and the ip6 table is always there, empty)."""
    etcd.put(f"{PREFIX}/config", nft_config())
    n1, n2 = start_nodes(lab, [lab.add_host("h1")], "--ip-masq", "--ip-masq-fully-random-disable",
                         "--iptables-forward-rules=false") + start_nodes(lab, [lab.add_host("h2")])
    want1 = upstream_v4(NETWORK, str(n1.subnet), fully_random=False, forward=False)
    want2 = upstream_v4(NETWORK, str(n2.subnet), masq=False)
    assert nft_text(n1.host) == want1 and nft_json(n1.host) == reference_json(lab, want1)
    assert nft_text(n2.host) == want2 and nft_json(n2.host) == reference_json(lab, want2)
    for n in (n1, n2):
        assert nft_text(n.host, "ip6", "flannel-ipv6") == UPSTREAM_V6_EMPTY
        assert flannel_iptables(n.host) == []


def test_nftables_damaged_ruleset_restored_by_the_resync(lab, etcd):
    etcd.put(f"{PREFIX}/config", nft_config())
    (n1,) = start_nodes(lab, [lab.add_host("h1")], "--ip-masq", "--iptables-resync", "1")
    h, want = n1.host, upstream_v4(NETWORK, str(n1.subnet))
    assert nft_text(h) == want
    # every kind of damage is put back to upstream's ruleset by the resync (every 1 s), which says so
    # in the log (the damage is not checked in between: the resync may be quicker)
    restoring = "nftables rules differ from the expected ones; restoring"
    last_forward_rule = "$(nft -a list chain ip flannel-ipv4 forward | awk '/accept # handle/ {h=$NF} END {print h}')"
    damage = [
        "nft flush chain ip flannel-ipv4 postrtg",
        "nft insert rule ip flannel-ipv4 postrtg ip saddr 10.5.0.0/16 accept",
        f"nft delete rule ip flannel-ipv4 forward handle {last_forward_rule}",
        "nft delete table ip flannel-ipv4",
        "nft add chain ip flannel-ipv4 forward '{ policy drop; }'",
    ]
    for script in damage:
        repairs = n1.daemon.log_text().count(restoring)
        h.sh(script)  # check=True: the damage was done
        wait_for(lambda r=repairs: n1.daemon.log_text().count(restoring) > r and nft_text(h) == want, 30,
                 f"ruleset restored after {script}", detail=lambda: nft_text(h))
    assert nft_text(h, "ip6", "flannel-ipv6") == UPSTREAM_V6_EMPTY
    assert n1.pod.wait_ping(lab.switch.address, timeout=30)  # masquerade works after the repairs
    assert "Traceback" not in n1.daemon.log_text()


def test_switch_between_iptables_and_nftables_mode(lab, etcd):
    """A host restarted in the other mode keeps its subnet and ends with only that mode's rules."""
    etcd.put(f"{PREFIX}/config", nft_config(enable=False))
    (n1,) = start_nodes(lab, [lab.add_host("h1")], "--ip-masq")
    h, sn = n1.host, str(n1.subnet)
    iptables_mode = [*GOLDEN_POSTROUTING[1:], *golden_postrtg(NETWORK, sn), *GOLDEN_FORWARD[1:],
                     *golden_fwd(NETWORK)]

    def iptables_rules() -> list[str]:
        return (iptables_s(h, "nat", "POSTROUTING")[1:] + iptables_s(h, "nat", "FLANNEL-POSTRTG")
                + iptables_s(h, "filter", "FORWARD")[1:] + iptables_s(h, "filter", "FLANNEL-FWD"))

    assert iptables_rules() == iptables_mode and flannel_nft_tables(h) == []
    for starts, enable in enumerate((True, False, True), start=2):
        assert n1.daemon.stop() == 0
        etcd.put(f"{PREFIX}/config", nft_config(enable=enable))
        n1.daemon.restart()
        wait_for(lambda starts=starts: n1.daemon.log_text().count("flannel is ready") == starts,
                 30, "restarted")
        assert n1.daemon.subnet_env() == n1.env
        if enable:
            assert nft_text(h) == upstream_v4(NETWORK, sn)
            assert flannel_iptables(h) == []
        else:
            assert iptables_rules() == iptables_mode
            assert flannel_nft_tables(h) == []
    assert n1.pod.wait_ping(lab.switch.address, timeout=30)
    assert "Traceback" not in n1.daemon.log_text()


def test_missing_nft_is_one_clear_fatal_line(lab, etcd):
    etcd.put(f"{PREFIX}/config", nft_config())
    h = lab.add_host("h1")
    d = start_daemon(h, "--iface", "eth0", "--ip-masq", env={"PATH": "/usr/bin:/bin"})  # nft is in /usr/sbin
    assert d.wait_exit(20) == 1
    errors = [ln for ln in d.log_text().splitlines() if "level=error" in ln]
    assert len(errors) == 1 and "nft command was not found" in errors[0] and "apt-get install nftables" in errors[0]
    assert "Traceback" not in d.log_text()


def test_nftables_host_next_to_upstream_iptables_host(lab, etcd):
    """Mixed cluster: upstream v0.20.2 (no nftables support: it ignores EnableNFTables and installs
    iptables rules) and pyflanneld in nftables mode share one host-gw network."""
    binary = upstream_or_skip("v0.20.2")
    etcd.put(f"{PREFIX}/config", nft_config())
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    up = start_daemon(h1, "-iface=eth0", "-ip-masq", binary=binary)
    env1 = up.wait_subnet_env(timeout=30)
    pod1 = attach_pod(lab, h1, env1)
    (n2,) = start_nodes(lab, [h2], "--ip-masq")
    assert ping_all([pod1, n2.pod]) == []
    assert nft_text(h2) == upstream_v4(NETWORK, str(n2.subnet)) and flannel_iptables(h2) == []
    assert iptables_s(h1, "nat", "POSTROUTING")[1:] == GOLDEN_POSTROUTING[1:]
    assert n2.pod.wait_ping(lab.switch.address, timeout=30) and pod1.wait_ping(lab.switch.address, timeout=30)
