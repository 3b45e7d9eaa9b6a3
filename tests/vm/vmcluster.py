"""Shared by the in-VM scenarios: a mixed cluster (pyflanneld hosts and the real upstream v0.20.2
binary) in one module-scoped lab, underlay captures, and ``wg show`` read back as an operator does.

Everything here runs inside the lab VM (Debian's kernel), started by tests/test_vm.py. Emulation
is slow (a daemon is ready ~15 s after its start): waits are generous.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_helpers import PREFIX, Node, attach_pod, config, key_of, lines, wait_for

from lab import Host, Lab, LabProcess, pyflanneld_argv, start_daemon
from lab.upstream import missing_reason, upstream_binary

READY_S = 180  # daemon start to subnet.env under emulation (typically 20-60 s)
CONVERGE_S = 60
PING_S = 30
UPSTREAM = "v0.20.2"


@dataclass
class Member:
    """One host of the mixed cluster: its node (host, daemon, subnet.env, pod), which binary runs
    it and its own wireguard key file (lab hosts share one filesystem)."""

    node: Node
    upstream: bool
    key_file: Path
    extra: dict = field(default_factory=dict)

    @property
    def host(self) -> Host:
        return self.node.host

    @property
    def name(self) -> str:
        return self.node.host.name


@pytest.fixture(scope="module")
def mlab():
    """A lab with etcd shared by all tests of a module (a cluster start costs ~20 s in the VM)."""
    the_lab = Lab()
    try:
        the_lab.start_etcd(timeout=60)
        yield the_lab
    finally:
        the_lab.close()


def dump_logs(lab: Lab) -> str:
    out = []
    for path in sorted(lab.tmp.rglob("*.log")):
        out.append(f"----- {path.relative_to(lab.tmp)} (last 3000 chars) -----\n"
                   f"{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


# Run a daemon with a /run of its own (a private mount namespace): ipsec's charon keeps its pid file
# and VICI socket at fixed paths under /var/run, which the lab's hosts would otherwise share.
PRIVATE_RUN = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o mode=0755 flannel-run /run && exec "$@"', "sh"]


def start_cluster(lab: Lab, backend: dict, specs: list[tuple[str, str | None, bool]],
                  wrap: list[str] | None = None) -> list[Member]:
    """Put the config, then start one daemon per (name, underlay subnet or None, upstream?) at once;
    each host gets docker0 and a pod from its subnet.env. ``wrap``: argv prefix for every daemon
    (e.g. PRIVATE_RUN). Skips when the upstream binary is absent."""
    up = upstream_binary(UPSTREAM)
    if up is None and any(s[2] for s in specs):
        pytest.skip(missing_reason(UPSTREAM))
    lab.etcd.put(f"{PREFIX}/config", config(backend))
    hosts = [lab.add_host(name, subnet=subnet) for name, subnet, _ in specs]
    members: list[Member | None] = [None] * len(specs)
    # pyflanneld hosts together, then the upstream ones: upstream v0.20.2 was seen to miss one of
    # several leases created within a few milliseconds while it watched (its route never came)
    for want_upstream in (False, True):
        started = []
        for i, (h, (_, _, is_up)) in enumerate(zip(hosts, specs, strict=True)):
            if is_up != want_upstream:
                continue
            key_file = lab.tmp / h.name / "wgkey"
            d = start_daemon(h, "--iface", "eth0", env={"WIREGUARD_KEY_FILE": str(key_file)},
                             binary=[*(wrap or []), *([str(up)] if is_up else pyflanneld_argv())])
            started.append((i, h, d, is_up, key_file))
        for i, h, d, is_up, key_file in started:
            env = d.wait_subnet_env(timeout=READY_S)
            members[i] = Member(Node(h, d, env, attach_pod(lab, h, env)), is_up, key_file)
    return [m for m in members if m is not None]


def pods_unreachable(members: list[Member], timeout: float = PING_S) -> list[str]:
    """Every pod pings every other pod (one at a time: the VM has two slow CPUs) until a reply or
    ``timeout`` per pair; returns the pairs that got none."""
    bad = []
    for a in members:
        for b in members:
            if a is not b and not pings(a.node.pod, b.node.pod.address, timeout):
                bad.append(f"{a.name} -> {b.name} ({b.node.pod.address})")
    return bad


def pings(src: Host, dst: str, timeout: float = PING_S, count: int = 1) -> bool:
    """``ping -c count`` from src until all replies come back within one try, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        cp = src.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", dst, check=False,
                     timeout=count * 3 + 60)
        if cp.returncode == 0:
            return True
        if time.monotonic() >= deadline:
            return False


def lease_raw(lab: Lab, m: Member) -> str:
    raw = lab.etcd.get(key_of(m.node.subnet))
    assert raw is not None, f"{m.name}: no lease in etcd"
    return raw


def lease(lab: Lab, m: Member) -> dict:
    return json.loads(lease_raw(lab, m))


class Capture:
    """``tcpdump -w`` on an interface of a lab namespace; ``stop()`` returns the packets as
    ``tcpdump -n -r`` prints them. Capture on the switch's port of a host (``lab.switch``,
    ``v<host>``) to see only the wire: on the host's own eth0, packets a tunnel decapsulates
    (ESP) show up again in clear."""

    def __init__(self, host: Host, iface: str = "eth0", filt: str = "") -> None:
        self.host = host
        self.pcap = host.lab.tmp / f"{host.name}-{iface}-{time.monotonic_ns()}.pcap"
        self.proc: LabProcess = host.popen("tcpdump", "-n", "-U", "-i", iface, "-w", str(self.pcap),
                                           *filt.split(), name=f"tcpdump-{host.name}")
        wait_for(lambda: "listening on" in self.proc.log_text() or not self.proc.alive, 30,
                 f"tcpdump on {host.name} {iface}")
        assert self.proc.alive, self.proc.log_text()

    def packets(self) -> list[str]:
        """What was captured so far (``-U``: every packet is written as it comes)."""
        cp = self.host.run("tcpdump", "-n", "-r", str(self.pcap), check=False)
        return cp.stdout.splitlines()

    def wait(self, pred, what: str, timeout: float = 30) -> list[str]:
        """Wait until pred(packets) holds (the capture may lag the traffic under emulation); then
        stop and return the packets (the caller asserts on them)."""
        try:
            wait_for(lambda: pred(self.packets()), timeout, what)
        except AssertionError:
            pass
        return self.stop()

    def stop(self) -> list[str]:
        if self.proc.alive:
            self.proc.signal(2)
            self.proc.wait(15)
        return self.packets()


def routes_on(host: Host, dev: str) -> set[str]:
    return lines(host.ip("route", "show", "dev", dev))


def normalise(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def link_summary(host: Host, dev: str) -> str:
    """``ip -d link show DEV`` without what differs per host by nature (index, ifindex suffix, stats)."""
    text = " ".join(host.ip("-d", "link", "show", dev).split())
    return re.sub(r"^\d+: ", "", text)
