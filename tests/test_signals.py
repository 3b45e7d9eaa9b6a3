"""Signals as systemd and terminals send them (issue 11.6).

SIGHUP (`ExecReload=kill -HUP $MAINPID` in many units, `systemctl kill -s HUP`, a closed terminal)
is logged and the daemon keeps running — its udp forwarder workers too; SIGTERM still shuts it
down cleanly with exit status 0.
"""

from __future__ import annotations

import os
import signal

import pytest
from e2e_helpers import config, ping_all, start_nodes
from helpers import PREFIX, http_get, wait_for

from lab.cluster import start_daemon, udp_worker_pids

pytestmark = pytest.mark.lab

HUP_LINE = "SIGHUP received: nothing to reload, pyflanneld keeps running"


def ignores_sighup(pid: int) -> bool:
    """SIGHUP's bit in /proc/PID/status SigIgn (a worker sets it once it runs its loop)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


@pytest.mark.parametrize("backend", ["alloc", "udp"])
def test_sighup_is_logged_and_the_daemon_keeps_running(lab, etcd, backend):
    etcd.put(f"{PREFIX}/config", config({"Type": backend}))
    hosts = [lab.add_host("h1"), lab.add_host("h2")] if backend == "udp" else [lab.add_host("h1")]
    nodes = start_nodes(lab, hosts, "--healthz-port", "8471")
    d = nodes[0].daemon
    workers = udp_worker_pids(d.pid)
    assert bool(workers) is (backend == "udp")
    wait_for(lambda: all(ignores_sighup(w) for w in workers), timeout=30, what="workers in their loop")

    os.kill(d.pid, signal.SIGHUP)               # a unit's reload: the main process only
    wait_for(lambda: d.log_text().count(HUP_LINE) == 1, timeout=30, what="the SIGHUP line")
    d.process.signal(signal.SIGHUP)             # `systemctl kill -s HUP`: every process of the unit
    wait_for(lambda: d.log_text().count(HUP_LINE) == 2, timeout=30, what="the second SIGHUP line")

    assert d.alive
    assert http_get(nodes[0].host, 8471, "/healthz")[0] == 200
    assert http_get(nodes[0].host, 8471, "/readyz")[0] == 200
    if backend == "udp":
        assert udp_worker_pids(d.pid) == workers  # no worker died of it
        assert ping_all([n.pod for n in nodes]) == []

    assert d.stop(timeout=10) == 0
    text = d.log_text()
    assert "signal received, shutting down" in text and "exiting cleanly" in text
    assert "Traceback" not in text


def test_sighup_while_starting_is_logged_and_the_daemon_starts(lab, etcd):
    """Before the event loop's handler is in place (start-up imports take ~0.5 s on a busy host),
    SIGHUP killed the daemon silently (exit by signal, empty log). SIGHUP is caught before the
    heavy modules (gRPC) are even loaded, and a SIGHUP then is logged and survived."""
    etcd.put(f"{PREFIX}/config", config({"Type": "alloc"}))
    h1 = lab.add_host("h1")
    d = start_daemon(h1)

    def caught() -> bool:
        for line in open(f"/proc/{d.pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
        return False

    wait_for(caught, timeout=30, interval=0.001, what="SIGHUP caught")
    maps = open(f"/proc/{d.pid}/maps").read()
    d.process.signal(signal.SIGHUP)
    assert "cygrpc" not in maps  # still importing: the window that used to be fatal
    d.wait_subnet_env(timeout=30)
    assert d.alive
    assert "SIGHUP received" in d.log_text()
    assert d.stop(timeout=10) == 0
