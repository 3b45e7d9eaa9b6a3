"""TrafficRules against real iptables (nf_tables) inside a lab host namespace."""

from __future__ import annotations

import json

import pytest
from backend_harness import PYTHON
from helpers import wait_for
from test_iptables_rules import GOLDEN_FWD, GOLDEN_FWD6, GOLDEN_MASQ, GOLDEN_MASQ6

pytestmark = pytest.mark.lab

# Runs inside the namespace: TrafficRules(**args).setup(), then run() when resync_s > 0.
DRIVER = """
import asyncio, json, sys
from ipaddress import ip_network as N
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from pyflanneld.iptables import TrafficRules
a = json.loads(sys.argv[1])
for k in ("network", "own_subnet", "prev_network", "prev_subnet"):
    if a.get(k):
        a[k] = N(a[k])
loop = a.pop("loop", False)
async def main():
    t = TrafficRules(**a)
    await t.setup()
    print("SETUP-DONE", flush=True)
    if loop:
        await t.run()
asyncio.run(main())
"""


def ours(host, table: str, tool: str = "iptables") -> list[str]:
    """`iptables -t TABLE -S` lines that are flannel's (jump rules + our chains), kernel order."""
    out = host.run(tool, "-w", "-t", table, "-S").stdout.splitlines()
    return [ln for ln in out if "FLANNEL-" in ln and ln.startswith("-A")]


def setup_rules(host, **args):
    base = {"network": "10.5.0.0/16", "own_subnet": "10.5.1.0/24", "ip_masq": True, "resync_s": 0}
    base.update(args)
    return host.run(PYTHON, "-c", DRIVER, json.dumps(base))


def resync_loop(host, **args):
    base = {"network": "10.5.0.0/16", "own_subnet": "10.5.1.0/24", "ip_masq": True, "resync_s": 0.5, "loop": True}
    base.update(args)
    p = host.popen(PYTHON, "-c", DRIVER, json.dumps(base), name="rules")
    wait_for(lambda: "SETUP-DONE" in p.log_text(), 30, "the rules set up", detail=p.log_text)
    return p


RESTORING = "iptables rules differ from the expected ones; restoring"


def restored(host, proc, table: str, golden: list[str], before: int) -> bool:
    """The resync pass logged a repair since `before` (a count of such lines) and the table is golden."""
    return proc.log_text().count(RESTORING) > before and ours(host, table) == golden


def test_rules_equal_upstream_golden_list(lab):
    h = lab.add_host("h1")
    setup_rules(h)
    assert ours(h, "nat") == GOLDEN_MASQ
    assert ours(h, "filter") == GOLDEN_FWD
    # idempotent: a second setup (daemon restart) changes nothing
    setup_rules(h)
    assert ours(h, "nat") == GOLDEN_MASQ
    assert ours(h, "filter") == GOLDEN_FWD


def test_options_fully_random_off_and_no_forward_rules(lab):
    h = lab.add_host("h1")
    setup_rules(h, fully_random=False, forward_rules=False)
    assert ours(h, "nat") == [r.removesuffix(" --random-fully") for r in GOLDEN_MASQ]
    assert ours(h, "filter") == []
    h2 = lab.add_host("h2")
    setup_rules(h2, ip_masq=False)
    assert ours(h2, "nat") == [] and ours(h2, "filter") == GOLDEN_FWD


def test_flushed_chain_restored_by_the_resync(lab):
    h = lab.add_host("h1")
    p = resync_loop(h)
    assert ours(h, "nat") == GOLDEN_MASQ
    repairs = p.log_text().count(RESTORING)
    h.run("iptables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    wait_for(lambda: restored(h, p, "nat", GOLDEN_MASQ, repairs), 30, "FLANNEL-POSTRTG restored",
             detail=lambda: ours(h, "nat"))
    # forward chain and jump deleted entirely, in one transaction (the resync runs every 0.5 s: in
    # three commands it may put the jump back before the chain is deleted)
    repairs = p.log_text().count(RESTORING)
    h.run("iptables-restore", "--noflush", "-w", input='*filter\n-D FORWARD -m comment --comment '
          '"flanneld forward" -j FLANNEL-FWD\n-F FLANNEL-FWD\n-X FLANNEL-FWD\nCOMMIT\n')
    wait_for(lambda: restored(h, p, "filter", GOLDEN_FWD, repairs), 30, "FLANNEL-FWD and its jump restored",
             detail=lambda: ours(h, "filter"))


def test_order_and_duplicates_repaired(lab):
    h = lab.add_host("h1")
    p = resync_loop(h)
    repairs = p.log_text().count(RESTORING)
    # move the kube-proxy mark rule to the end: every rule is still present (-C would pass)
    h.run("iptables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "1")
    h.run("iptables", "-w", "-t", "nat", "-A", "FLANNEL-POSTRTG", "-m", "mark", "--mark", "0x4000/0x4000",
          "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
    wait_for(lambda: restored(h, p, "nat", GOLDEN_MASQ, repairs), 30, "the rule order repaired",
             detail=lambda: ours(h, "nat"))
    # a duplicate jump and a duplicate rule
    h.run("iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
          "-j", "FLANNEL-POSTRTG")
    h.run("iptables", "-w", "-I", "FLANNEL-FWD", "-s", "10.5.0.0/16", "-m", "comment", "--comment",
          "flanneld forward", "-j", "ACCEPT")
    wait_for(lambda: ours(h, "nat") == GOLDEN_MASQ and ours(h, "filter") == GOLDEN_FWD,
             30, "duplicates removed",
             detail=lambda: (ours(h, "nat"), ours(h, "filter")))
    # other rules in POSTROUTING/FORWARD are not ours and stay, also when the chain is rewritten:
    # a foreign rule, then our jump lost; once the repair is done the foreign rule is still there
    h.run("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "172.16.0.0/24", "-j", "MASQUERADE")
    repairs = p.log_text().count(RESTORING)
    h.run("iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
          "-j", "FLANNEL-POSTRTG")
    wait_for(lambda: restored(h, p, "nat", GOLDEN_MASQ, repairs), 30, "the jump restored",
             detail=lambda: ours(h, "nat"))
    assert "-A POSTROUTING -s 172.16.0.0/24 -j MASQUERADE" in h.run("iptables", "-t", "nat", "-S").stdout


def test_chain_never_empty_while_repairing(lab):
    """Upstream #2237: ClearChain then refill left a window with an empty FLANNEL-POSTRTG."""
    h = lab.add_host("h1")
    resync_loop(h, resync_s=0.05)
    script = (
        "for i in $(seq 150); do "
        "iptables -w -t nat -A FLANNEL-POSTRTG -j RETURN; "  # a stray rule: forces a rewrite
        "n=$(iptables -w -t nat -S FLANNEL-POSTRTG | grep -c 'flanneld masq'); "
        "[ \"$n\" -ge 6 ] || { echo EMPTY-WINDOW $n; exit 1; }; done; echo OK"
    )
    cp = h.sh(script, check=False, timeout=120)
    assert cp.stdout.strip().endswith("OK"), cp.stdout + cp.stderr
    wait_for(lambda: ours(h, "nat") == GOLDEN_MASQ,
             30, "the stray rules removed", detail=lambda: ours(h, "nat"))


def test_previous_network_rules_removed(lab):
    h = lab.add_host("h1")
    setup_rules(h, network="10.9.0.0/16", own_subnet="10.9.3.0/24")
    old = ours(h, "nat")
    assert any("10.9.3.0/24" in r for r in old)
    cp = setup_rules(h, prev_network="10.9.0.0/16", prev_subnet="10.9.3.0/24")
    assert ours(h, "nat") == GOLDEN_MASQ
    assert ours(h, "filter") == GOLDEN_FWD
    assert "recycling old iptables rules" in cp.stderr


def test_previous_masq_rules_removed_when_ip_masq_now_off(lab):
    h = lab.add_host("h1")
    setup_rules(h)
    setup_rules(h, ip_masq=False, prev_network="10.5.0.0/16", prev_subnet="10.5.1.0/24")
    assert [r for r in ours(h, "nat") if r.startswith("-A FLANNEL-POSTRTG")] == []


def test_missing_iptables_is_one_clear_line(lab):
    h = lab.add_host("h1")
    cp = setup_rules(h, iptables="iptables-not-installed", iptables_restore="iptables-restore-not-installed")
    err = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "iptables not found: install the iptables package" in err[0], cp.stderr
    assert "Traceback" not in cp.stderr
    assert ours(h, "nat") == []


# --- ip6tables (issue 13.6) ------------------------------------------------------------------------
V6 = {"network": "fd80::/48", "own_subnet": "fd80:0:0:1::/64", "iptables": "ip6tables",
      "iptables_restore": "ip6tables-restore"}

# traffic_manager() for a dual-stack config, set up and kept in place (FamilyRules)
TM_DRIVER = """
import asyncio, sys
from ipaddress import ip_network as N
from types import SimpleNamespace
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from pyflanneld.config import parse_config
from pyflanneld.trafficmngr import traffic_manager
cfg = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/48"%s}' % sys.argv[1])
opts = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=False, iptables_forward_rules=True,
                       iptables_resync_s=0.5)
async def main():
    t = traffic_manager(cfg, opts, N("10.5.1.0/24"), own_subnet6=N("fd80:0:0:1::/64"))
    await t.setup()
    print("SETUP-DONE", flush=True)
    await t.run()
asyncio.run(main())
"""


def test_ip6tables_rules_equal_golden_and_are_restored(lab):
    h = lab.add_host("h1")
    setup_rules(h, **V6)
    assert ours(h, "nat", "ip6tables") == GOLDEN_MASQ6
    assert ours(h, "filter", "ip6tables") == GOLDEN_FWD6
    assert ours(h, "nat") == [] and ours(h, "filter") == []  # nothing in the IPv4 tables
    p = resync_loop(h, **V6)
    h.run("ip6tables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    wait_for(lambda: ours(h, "nat", "ip6tables") == GOLDEN_MASQ6, 30, "the IPv6 masquerade rules",
             detail=lambda: ours(h, "nat", "ip6tables"))
    assert "tool=ip6tables" in p.log_text() and "restoring" in p.log_text()


def test_dual_stack_traffic_manager_keeps_both_families_rules(lab):
    h = lab.add_host("h1")
    p = h.popen(PYTHON, "-c", TM_DRIVER, "", name="rules")
    wait_for(lambda: "SETUP-DONE" in p.log_text(), 30, "the rules set up", detail=p.log_text)
    assert ours(h, "nat") == GOLDEN_MASQ and ours(h, "filter") == GOLDEN_FWD
    assert ours(h, "nat", "ip6tables") == GOLDEN_MASQ6 and ours(h, "filter", "ip6tables") == GOLDEN_FWD6
    h.run("ip6tables", "-w", "-F", "FLANNEL-FWD")
    h.run("iptables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    wait_for(lambda: ours(h, "filter", "ip6tables") == GOLDEN_FWD6 and ours(h, "nat") == GOLDEN_MASQ, 30,
             "both families' rules restored", detail=lambda: (ours(h, "filter", "ip6tables"), ours(h, "nat")))


def test_missing_ip6tables_names_the_tool(lab):
    h = lab.add_host("h1")
    cp = setup_rules(h, **dict(V6, iptables="ip6tables-not-installed", iptables_restore="x-not-installed"))
    err = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "ip6tables not found: install the iptables package" in err[0], cp.stderr


# upstream's ip6 table (pkg/trafficmngr/nftables, as nft 1.0.6 lists it), for fd80::/48 and fd80:0:0:1::/64
UPSTREAM_NFT_V6 = """table ip6 flannel-ipv6 {
	comment "rules for flannel-ipv6"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip6 saddr fd80:0:0:1::/64 ip6 daddr fd80::/48 return
		ip6 saddr fd80::/48 ip6 daddr fd80:0:0:1::/64 return
		ip6 saddr != fd80:0:0:1::/64 ip6 daddr fd80::/48 return
		ip6 saddr fd80::/48 ip6 daddr != ff00::/8 masquerade fully-random
		ip6 saddr != fd80::/48 ip6 daddr fd80::/48 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip6 saddr fd80::/48 accept
		ip6 daddr fd80::/48 accept
	}
}
"""


def test_dual_stack_nftables_mode_fills_the_ip6_table_and_removes_ip6tables_chains(lab):
    h = lab.add_host("h1")
    setup_rules(h, **V6)  # left over from iptables mode
    assert ours(h, "nat", "ip6tables") == GOLDEN_MASQ6
    p = h.popen(PYTHON, "-c", TM_DRIVER, ',"EnableNFTables":true', name="rules")
    wait_for(lambda: "SETUP-DONE" in p.log_text(), 30, "the rules set up", detail=p.log_text)
    assert h.run("nft", "list", "table", "ip6", "flannel-ipv6").stdout == UPSTREAM_NFT_V6
    assert "ip saddr 10.5.1.0/24 ip daddr 10.5.0.0/16 return" in h.run("nft", "list", "table", "ip",
                                                                       "flannel-ipv4").stdout
    assert ours(h, "nat", "ip6tables") == [] and ours(h, "filter", "ip6tables") == []
    h.run("nft", "flush", "chain", "ip6", "flannel-ipv6", "postrtg")
    wait_for(lambda: h.run("nft", "list", "table", "ip6", "flannel-ipv6").stdout == UPSTREAM_NFT_V6, 30,
             "the ip6 nftables table restored")
