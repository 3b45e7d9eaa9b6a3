"""The extension backend through the real daemon, next to the real upstream v0.20.2 flanneld.

* upstream's documented example (Documentation/extension.md, "Simple example (host-gw)") with one
  upstream host and two pyflanneld hosts on one config: routes, pings, removal;
* Pre/Post/Add commands' variables, stdin and BackendData exchanged between upstream and us;
* a failing and a hanging SubnetAddCommand: the daemon stays responsive, the other peers are
  programmed, the failure is logged with its status and stderr and retried until it succeeds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_helpers import NETWORK, PREFIX, attach_pod, ping_all, routes, start_nodes, wait_for
from helpers import http_get, key_of, upstream_or_skip

from lab import start_daemon
from lab.upstream import settle

pytestmark = pytest.mark.lab

# Documentation/extension.md's host-gw example, verbatim (Network aside)
DOC_EXAMPLE = {"Type": "extension",
               "SubnetAddCommand": "ip route add $SUBNET via $PUBLIC_IP",
               "SubnetRemoveCommand": "ip route del $SUBNET via $PUBLIC_IP"}


def ext_config(backend: dict) -> str:
    return json.dumps({"Network": NETWORK, "Backend": backend})


def start_upstream(lab, host, binary):
    """Upstream flanneld on `host`, then docker0 and a pod from its subnet.env: (daemon, env, pod)."""
    d = start_daemon(host, "-iface=eth0", binary=binary)
    env = d.wait_subnet_env(timeout=30)
    return d, env, attach_pod(lab, host, env)


def namespace_pids(host) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()


def cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_documented_hostgw_example_with_an_upstream_host(lab, etcd):
    binary = upstream_or_skip()
    etcd.put(f"{PREFIX}/config", ext_config(DOC_EXAMPLE))
    h1, h2, h3 = lab.add_host("h1"), lab.add_host("h2"), lab.add_host("h3")
    up, env1, pod1 = start_upstream(lab, h1, binary)
    n2, n3 = start_nodes(lab, [h2, h3])
    sn1 = env1["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24"
    hosts = {h1: sn1, h2: str(n2.subnet), h3: str(n3.subnet)}

    def route_lines(h):
        return {f"{sn} via {o.address} dev eth0" for o, sn in hosts.items() if o is not h}

    for h in hosts:
        if h is h1:  # upstream v0.20.2 may drop a join sharing a watch response (lab.upstream.settle)
            settle(up, lambda h=h: route_lines(h) <= routes(h), 30, f"{h.name}: a route per peer")
        else:
            wait_for(lambda h=h: route_lines(h) <= routes(h), 30, f"{h.name}: a route per peer")
    assert ping_all([pod1, n2.pod, n3.pod]) == []
    # our leases look like upstream's: no Pre command, so no BackendData
    for h, sn in hosts.items():
        assert json.loads(etcd.get(key_of(sn))) == {"PublicIP": h.address, "PublicIPv6": None,
                                                    "BackendType": "extension"}
    # h3 leaves: upstream (h1) and pyflanneld (h2) both run SubnetRemoveCommand
    assert n3.daemon.stop() == 0
    etcd.delete(key_of(n3.subnet))
    for h in (h1, h2):
        wait_for(lambda h=h: not any(r.startswith(f"{n3.subnet} ") for r in routes(h)), 30,
                 f"{h.name}: route to h3's subnet removed")
    assert ping_all([pod1, n2.pod]) == []
    # pyflanneld's log only: upstream v0.20.2 can panic on its own (index out of range in its
    # watch's Events[0] when a response holds no event); settle restarts it then
    text = n2.daemon.log_text()
    assert "Traceback" not in text and "panic" not in text


def test_variables_stdin_and_backend_data_between_upstream_and_us(lab, etcd):
    binary = upstream_or_skip()
    rec = lab.tmp / "rec"
    rec.mkdir()
    me = "$(cat /sys/class/net/eth0/address)"  # ip netns exec mounts the namespace's own /sys
    etcd.put(f"{PREFIX}/config", ext_config({
        "Type": "extension",
        "PreStartupCommand": "echo vtep-$(cat /sys/class/net/eth0/address)",
        "PostStartupCommand": f'echo "$NETWORK $SUBNET $PUBLIC_IP" > {rec}/post-{me}',
        "SubnetAddCommand": f'read D; echo "add $SUBNET $PUBLIC_IP $D" >> {rec}/peers-{me}; '
                            "ip route replace $SUBNET via $PUBLIC_IP",
        "SubnetRemoveCommand": f'read D; echo "del $SUBNET $PUBLIC_IP $D" >> {rec}/peers-{me}',
    }))
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    _, env1, pod1 = start_upstream(lab, h1, binary)
    (n2,) = start_nodes(lab, [h2])
    mac1, mac2 = (h.ip_json("link", "show", "eth0")[0]["address"] for h in (h1, h2))
    sn1, sn2 = env1["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24", str(n2.subnet)
    # BackendData: the Pre command's output as a JSON string, written alike by both
    assert json.loads(etcd.get(key_of(sn1)))["BackendData"] == f"vtep-{mac1}"
    assert json.loads(etcd.get(key_of(sn2))) == {"PublicIP": h2.address, "PublicIPv6": None,
                                                 "BackendType": "extension", "BackendData": f"vtep-{mac2}"}
    for mac, h, sn in ((mac1, h1, sn1), (mac2, h2, sn2)):
        assert (rec / f"post-{mac}").read_text() == f"{NETWORK} {sn} {h.address}\n"
    # each side's Add got the other's subnet, public IP and BackendData on stdin
    wait_for(lambda: (rec / f"peers-{mac2}").exists() and (rec / f"peers-{mac1}").exists(), 30, "Add ran")
    assert (rec / f"peers-{mac2}").read_text() == f"add {sn1} {h1.address} vtep-{mac1}\n"
    assert (rec / f"peers-{mac1}").read_text() == f"add {sn2} {h2.address} vtep-{mac2}\n"
    assert ping_all([pod1, n2.pod]) == []
    # upstream's Remove gets our BackendData back, from its cache of our lease
    assert n2.daemon.stop() == 0
    etcd.delete(key_of(sn2))
    wait_for(lambda: "del" in (rec / f"peers-{mac1}").read_text(), 30, "upstream ran SubnetRemoveCommand")
    assert (rec / f"peers-{mac1}").read_text().splitlines()[-1] == f"del {sn2} {h2.address} vtep-{mac2}"


def test_failing_and_hanging_subnet_add_command(lab, etcd):
    h1, h2, h3, h4 = (lab.add_host(n) for n in ("h1", "h2", "h3", "h4"))
    allow, marks = lab.tmp / "allow-h2", lab.tmp / "marks"
    marks.mkdir()
    etcd.put(f"{PREFIX}/config", ext_config({
        "Type": "extension",
        "CommandTimeout": 6,
        "SubnetAddCommand": (
            f"case $PUBLIC_IP in {h2.address}) [ -e {allow} ] || "
            '{ echo "no route to $SUBNET yet" >&2; echo more >&2; exit 3; };; '
            f"{h3.address}) echo $$ > {marks}/$(cat /sys/class/net/eth0/address); sleep 987;; esac; "
            "ip route replace $SUBNET via $PUBLIC_IP"),
    }))
    d1 = start_daemon(h1, "--iface", "eth0", "--healthz-port", "8481")
    env1 = d1.wait_subnet_env(timeout=30)
    pod1 = attach_pod(lab, h1, env1)
    n2, n3, n4 = start_nodes(lab, [h2, h3, h4])
    mark1 = marks / h1.ip_json("link", "show", "eth0")[0]["address"]
    wait_for(mark1.exists, 30, "h1's command for h3 hanging")
    # while it hangs: h1 answers /healthz and /readyz, and h4 (and h2's failure) are handled
    assert http_get(h1, 8481, "/healthz")[0] == 200
    assert http_get(h1, 8481, "/readyz")[0] == 200
    assert f"{n4.subnet} via {h4.address} dev eth0" in routes(h1)
    assert pod1.wait_ping(n4.pod.address, timeout=30)
    assert mark1.exists() and "timeout" not in d1.log_text()  # still inside the hang
    # one line per failure, with exit status and stderr; retried
    d1.wait_log(rf'event="command failed".*subnet={n2.subnet} .*error="exit status 3: no route to {n2.subnet} '
                r'yet more".*attempt=1', timeout=30)
    d1.wait_log(rf'event="command failed".*subnet={n2.subnet} .*attempt=2 ', timeout=30)
    d1.wait_log(rf'event="command failed".*subnet={n3.subnet} .*error="killed after 6s timeout"', timeout=30)
    assert not any(r.startswith(f"{n2.subnet} ") or r.startswith(f"{n3.subnet} ") for r in routes(h1))
    # the cause goes away: the next retry programs h2
    allow.touch()
    wait_for(lambda: f"{n2.subnet} via {h2.address} dev eth0" in routes(h1), 30, "h2 programmed by a retry")
    assert pod1.wait_ping(n2.pod.address, timeout=30)
    # stopping kills the command still hanging (with its sleep)
    assert d1.stop() == 0
    assert [p for p in namespace_pids(h1) if "sleep\x00987" in cmdline(p)] == []
    assert "Traceback" not in d1.log_text()


def test_failing_pre_startup_command_is_fatal_in_one_line(lab, etcd):
    etcd.put(f"{PREFIX}/config", ext_config({"Type": "extension",
                                             "PreStartupCommand": "echo 'no vtep here' >&2; exit 2"}))
    d = start_daemon(lab.add_host("h1"), "--iface", "eth0")
    assert d.wait_exit(20) == 1
    errors = [ln for ln in d.log_text().splitlines() if "level=error" in ln]
    assert len(errors) == 1, errors
    assert "PreStartupCommand failed (exit status 2: no vtep here)" in errors[0]
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}  # it ran before the lease, as upstream
    assert "Traceback" not in d.log_text()
