"""Simulated hosts, pods and an underlay switch in Linux network namespaces.

Everything runs through the ``ip`` command (as a user would type it) inside namespaces this
module creates; nothing is ever created in the machine's root namespace.

Public API::

    with Lab(mtu=1500) as lab:                    # or lab = Lab(); ...; lab.close()
        lab.id            # "pf1a2b": unique, short; every namespace is "<id>-<something>"
        lab.tmp           # Path of the lab's private temp dir (logs, data dirs)
        lab.switch        # Host for the switch namespace "<id>-sw" (bridge br0,
                          # 192.168.100.254/24, also 192.168.101.254/24 once a host needs it)
        h1 = lab.add_host("h1", mtu=None, subnet="192.168.100.0/24", ipv6=False)
        h1.ns, h1.name, h1.address ("192.168.100.1"), h1.iface ("eth0"), h1.gateway, h1.prefixlen, h1.mtu
        h1.address6       # None, or with ipv6=True "fd99::1" (fd99::/64 on the switch, default
                          # route via fd99::fe; fd98::/64 for the second underlay)
        h1.run("ping", "-c1", "x", check=True, timeout=10, input=None, env=None) -> CompletedProcess
        h1.sh("echo $x")                        -> CompletedProcess (bash -c)
        h1.ip("route", "show")                  -> str   (ip -n NS ...)
        h1.ip_json("link", "show", "eth0")      -> list  (ip -j -n NS ...)
        h1.bridge("fdb", "show")                -> str   (bridge -n NS ...)
        h1.sysctl("net.ipv4.ip_forward", "1")   -> str   (sets when value given, else reads)
        h1.popen("iperf3", "-s", log_path=None, env=None) -> LabProcess (tracked, killed on close)
        h1.ping("192.168.100.2", count=1, timeout=1) -> bool
        h1.wait_ping("192.168.100.2", timeout=30) -> bool  # one ping per try until a reply
        h1.link_exists("flannel.1") -> bool
        br = h1.make_bridge("docker0", "10.5.1.1/24", mtu=1450, cidr6=None)
            -> Bridge: .name, .address ("10.5.1.1"), .interface (IPv4Interface), .network, .mtu,
               .interface6 (IPv6Interface or None, e.g. from cidr6="fd80:0:0:1::1/64")
        pod = lab.add_pod(h1, "p1", bridge="docker0")
            -> Pod (a Host): ns "<id>-h1p1", .address ("10.5.1.2"), .gateway ("10.5.1.1"), .host,
               .address6 ("fd80:0:0:1::2" when the bridge has an IPv6 address, default route via it)
        pod.ping("10.5.2.2") -> bool
        p = lab.spawn(ns, argv, env=None, log_path=None, name=None) -> LabProcess
        p.pid, p.alive, p.returncode, p.log_path, p.log_text(), p.wait(timeout),
        p.wait_log(regex, timeout=30) -> re.Match  # LabError if p exits first (lab.wait.wait_for)
        p.stop(timeout=2) -> rc, p.kill() -> rc, p.signal(sig)      # signals go to the process group
        lab.read_log(path_or_name) -> str           # relative names are under lab.tmp
        lab.start_etcd(**EtcdServer kwargs, wait=True, timeout=10) -> EtcdServer (healthy)
        lab.etcd          # the first EtcdServer/EtcdCluster made in this lab (default for daemons)
        lab.hosts (name -> Host), lab.pods (ns -> Pod), lab.processes, lab.mtu
        lab.namespaces -> list[str]                 # this lab's namespaces that exist
        lab.close()                                 # idempotent

IPv6 is opt-in (existing tests see no change): ``add_host(..., ipv6=True)`` gives eth0 a ULA
(``nodad``: usable at once) on the switch's IPv6 segment and a default IPv6 route; the switch's br0
gets ``fd99::fe/64`` the first time a host asks for it.

Cleanup: close() stops every tracked process (SIGTERM to its process group, SIGKILL after 2 s),
also kills any other process still inside the lab's namespaces, deletes the namespaces and the
temp dir (kept when PYFLANNELD_LAB_KEEP=1). Open labs are also closed by an atexit handler and on
SIGTERM. Each lab writes an owner file under /run/pyflanneld-lab/; a new Lab reaps labs whose
owner process is dead (a SIGKILLed run), never those of a live process.
``created_namespaces()`` lists every namespace made by this process (for leak checks);
``purge_namespaces(names)`` force-deletes leftovers; ``reap_stale_labs()`` is described above.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .wait import WaitTimeout, wait_for

NS_DIR = Path("/run/netns")
REGISTRY_DIR = Path("/run/pyflanneld-lab")
UNDERLAY = ipaddress.ip_network("192.168.100.0/24")
UNDERLAY_GW = "192.168.100.254"
SECOND_UNDERLAY = ipaddress.ip_network("192.168.101.0/24")
# the IPv6 twin of each underlay segment (opt-in: add_host(..., ipv6=True)); host n gets <net>::n
UNDERLAY6 = {UNDERLAY: ipaddress.IPv6Network("fd99::/64"), SECOND_UNDERLAY: ipaddress.IPv6Network("fd98::/64")}
STOP_GRACE = 2.0

_open_labs: set[Lab] = set()
_open_lock = threading.Lock()
_created_namespaces: list[str] = []


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


class CommandError(subprocess.CalledProcessError, LabError):
    """CalledProcessError whose str() also shows stderr/stdout (so test failures explain themselves)."""

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, list | tuple) else str(self.cmd)
        err = (self.stderr or "").strip() or (self.output or "").strip()
        return f"command failed (exit {self.returncode}): {cmd}" + (f": {err}" if err else "")


def created_namespaces() -> list[str]:
    """Every namespace name created by Labs of this process (whether or not still present)."""
    return list(_created_namespaces)


def existing_namespaces() -> set[str]:
    """Names of all named network namespaces on the machine."""
    try:
        return {p.name for p in NS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; raise CommandError (with stderr) when check fails."""
    argv = [str(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, env=full_env
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"command timed out after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise CommandError(cp.returncode, argv, cp.stdout, cp.stderr)
    return cp


def ip_batch(commands: Iterable[str], *, ns: str | None = None, force: bool = False) -> None:
    """Run several ``ip`` commands in one process (``ip [-n NS] -batch -``)."""
    argv = ["ip"]
    if force:
        argv.append("-force")
    if ns:
        argv += ["-n", ns]
    argv += ["-batch", "-"]
    run(argv, input="\n".join(commands) + "\n", check=not force)


def _tmp_root() -> str | None:
    """Where lab temp dirs go: $PYFLANNELD_LAB_TMPDIR, else /dev/shm (etcd fsyncs are free on
    tmpfs), else the default temp dir."""
    want = os.environ.get("PYFLANNELD_LAB_TMPDIR")
    if want:
        return want
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return None


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ns_pids(ns: str) -> list[int]:
    cp = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _kill_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_pids_gone(pids: Iterable[int], deadline: float) -> list[int]:
    """Wait until none of pids is alive or the monotonic deadline passes; the pids still alive."""
    pids = list(pids)
    with contextlib.suppress(WaitTimeout):
        wait_for(lambda: not any(_pid_alive(p) for p in pids), max(0.0, deadline - time.monotonic()),
                 "processes to exit", interval=0.02)
    return [p for p in pids if _pid_alive(p)]


def _destroy(namespaces: Sequence[str], procs: Sequence[LabProcess] = ()) -> None:
    """Stop processes (SIGTERM, SIGKILL after STOP_GRACE) and delete the namespaces."""
    present = [n for n in namespaces if n in existing_namespaces()]
    for p in procs:
        p.signal(signal.SIGTERM)
    ns_pids = {pid for n in present for pid in _ns_pids(n)} - {os.getpid()}
    _kill_pids(ns_pids, signal.SIGTERM)
    start = time.monotonic()
    deadline = start + STOP_GRACE
    for p in sorted(procs, key=lambda p: p.grace):
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=max(0.0, start + p.grace - time.monotonic()))
        if p.popen.poll() is None:
            p.signal(signal.SIGKILL)
    ns_pids -= {p.pid for p in procs}
    left = _wait_pids_gone(ns_pids, deadline)
    _kill_pids(left, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=2)
        p.close_log()
    # Also kill anything started in the namespaces meanwhile (e.g. a child forked during SIGTERM).
    late = {pid for n in present for pid in _ns_pids(n)} - {os.getpid()}
    _kill_pids(late, signal.SIGKILL)
    _wait_pids_gone(late | set(left), time.monotonic() + 2)
    if present:
        # Delete pods/hosts before the switch: fewer cross-namespace veth teardowns in one go.
        ip_batch([f"netns del {n}" for n in reversed(present)], force=True)
        still = [n for n in present if n in existing_namespaces()]
        for n in still:
            run(["ip", "netns", "del", n], check=False)


def _forget_lab(info: dict) -> None:
    tmp = info.get("tmp")
    if tmp and Path(tmp).name.startswith(f"pyflanneld-lab-{info.get('id')}-"):
        shutil.rmtree(tmp, ignore_errors=True)
    (REGISTRY_DIR / str(info.get("id"))).unlink(missing_ok=True)


def purge_namespaces(namespaces: Sequence[str]) -> None:
    """Last-resort cleanup (leak guard): kill processes in and delete namespaces, and drop the
    registry entries and temp dirs of the labs they belong to."""
    _destroy(namespaces)
    for lab_id in {n.split("-", 1)[0] for n in namespaces}:
        try:
            info = json.loads((REGISTRY_DIR / lab_id).read_text())
        except (OSError, ValueError):
            continue
        _forget_lab(info)


def reap_stale_labs() -> list[str]:
    """Delete labs whose owner process is dead; return the lab ids reaped. Never touches live labs."""
    reaped = []
    try:
        entries = list(REGISTRY_DIR.iterdir())
    except FileNotFoundError:
        return reaped
    for f in entries:
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        pid, start = info.get("pid"), info.get("start")
        if isinstance(pid, int) and _proc_start_time(pid) == start:
            continue  # owner alive
        nss = [n for n in info.get("namespaces", []) if n.startswith(f"{info.get('id')}-")]
        _destroy(nss)
        _forget_lab(info)
        f.unlink(missing_ok=True)
        reaped.append(str(info.get("id")))
    return reaped


class LabProcess:
    """A process started in a namespace, in its own process group, output in a log file."""

    def __init__(self, popen: subprocess.Popen, *, ns: str, argv: list[str], log_path: Path, name: str,
                 grace: float = STOP_GRACE):
        self.popen = popen
        self.grace = grace  # SIGTERM → SIGKILL delay used by lab.close()
        self.ns = ns
        self.argv = argv
        self.log_path = log_path
        self.name = name
        self._log_file = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; raise subprocess.TimeoutExpired if still running after timeout."""
        return self.popen.wait(timeout=timeout)

    def wait_log(self, pattern: str, timeout: float = 30, what: str | None = None) -> re.Match:
        """Wait until regex ``pattern`` appears in the log and return the match. LabError (with the
        log's tail) if the process exits without logging it; lab.wait.WaitTimeout after ``timeout`` s."""
        rx = re.compile(pattern)

        def found() -> re.Match | None:
            alive = self.alive  # read before the log: a line written just before exit still counts
            m = rx.search(self.log_text())
            if m is None and not alive:
                raise LabError(f"{what or self.name} exited with {self.returncode} before logging {pattern!r}; "
                               f"log:\n{self.log_text()[-3000:]}")
            return m

        return wait_for(found, timeout, f"{pattern!r} in the log of {what or self.name}", interval=0.02,
                        detail=lambda: f"log:\n{self.log_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        """Send sig to the process group (the process and whatever it forked, even once the
        leader has exited)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to timeout, then SIGKILL. Returns the exit code (negative = signal)."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        self.close_log()
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL the process group and reap it. Returns the exit code."""
        self.signal(signal.SIGKILL)
        rc = self.popen.wait(timeout=5)
        self.close_log()
        return rc

    def close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        return f"<LabProcess {self.name} pid={self.pid} ns={self.ns} alive={self.alive}>"


@dataclass
class Bridge:
    """A docker0-like bridge in a host namespace, handing out pod addresses from its subnet."""

    host: Host
    name: str
    interface: ipaddress.IPv4Interface  # e.g. 10.5.1.1/24
    mtu: int
    _used: set[ipaddress.IPv4Address] = field(default_factory=set)
    interface6: ipaddress.IPv6Interface | None = None  # e.g. fd80:0:0:1::1/64 (dual-stack pods)

    @property
    def address(self) -> str:
        """The bridge's own IP (the pods' gateway), e.g. "10.5.1.1"."""
        return str(self.interface.ip)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.interface.network

    def next_address(self) -> ipaddress.IPv4Interface:
        for a in self.network.hosts():
            if a != self.interface.ip and a not in self._used:
                self._used.add(a)
                return ipaddress.IPv4Interface(f"{a}/{self.network.prefixlen}")
        raise LabError(f"bridge {self.name} on {self.host.name}: no free address left in {self.network}")

    def address6_for(self, v4: ipaddress.IPv4Interface) -> ipaddress.IPv6Interface | None:
        """The pod's IPv6 address next to its IPv4 one: same host number in the bridge's IPv6
        subnet (10.5.1.2 → fd80:0:0:1::2); None when the bridge has no IPv6 address."""
        if self.interface6 is None:
            return None
        n = int(v4.ip) - int(self.network.network_address)
        return ipaddress.IPv6Interface(f"{self.interface6.network.network_address + n}/{self.interface6.network.prefixlen}")


class Host:
    """A network namespace of the lab (a simulated host, the switch, or a pod)."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str | None = None, prefixlen: int = 24,
                 gateway: str | None = None, iface: str = "eth0", mtu: int | None = None,
                 address6: str | None = None):
        self.lab = lab
        self.name = name
        self.ns = ns
        self.address = address
        self.address6 = address6
        self.prefixlen = prefixlen
        self.gateway = gateway
        self.iface = iface
        self.mtu = mtu
        self.bridges: dict[str, Bridge] = {}
        self.pods: dict[str, Pod] = {}

    # --- commands ---------------------------------------------------------------------------
    def exec_argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *[str(c) for c in cmd]]

    def run(self, *cmd: str, check: bool = True, timeout: float | None = 30, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run cmd inside this namespace (``ip netns exec NS ...``), capturing text output."""
        return run(self.exec_argv(*cmd), check=check, timeout=timeout, input=input, env=env)

    def sh(self, script: str, check: bool = True, timeout: float | None = 30) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside this namespace."""
        return self.run("bash", "-c", script, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n NS args...`` → stdout."""
        return run(["ip", "-n", self.ns, *args], check=check).stdout

    def ip_json(self, *args: str) -> list:
        """``ip -j -n NS args...`` → parsed JSON (empty list when ip prints nothing)."""
        out = run(["ip", "-j", "-n", self.ns, *args]).stdout.strip()
        return json.loads(out) if out else []

    def bridge(self, *args: str, check: bool = True) -> str:
        """``bridge -n NS args...`` → stdout (e.g. ``bridge fdb show dev flannel.1``)."""
        return run(["bridge", "-n", self.ns, *args], check=check).stdout

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (value None) or set a sysctl inside this namespace; returns the value."""
        path = "/proc/sys/" + key.replace(".", "/")
        if value is None:
            return self.run("cat", path).stdout.strip()
        self.run("sysctl", "-qw", f"{key}={value}")
        return str(value)

    def link_exists(self, name: str) -> bool:
        return run(["ip", "-n", self.ns, "link", "show", "dev", name], check=False).returncode == 0

    def popen(self, *cmd: str, log_path: str | Path | None = None, env: Mapping[str, str] | None = None,
              name: str | None = None) -> LabProcess:
        """Start cmd in this namespace, tracked by the lab (killed on close)."""
        return self.lab.spawn(self.ns, list(cmd), env=env, log_path=log_path, name=name)

    def ping(self, ip: str, count: int = 1, timeout: float = 1, interval: float = 0.2) -> bool:
        """True when ``ping -c count -W timeout ip`` from this namespace gets a reply."""
        cp = self.run("ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), ip,
                      check=False, timeout=count * (interval + timeout) + 5)
        return cp.returncode == 0

    def wait_ping(self, ip: str, timeout: float = 30) -> bool:
        """Ping once per attempt until a reply or timeout; True on success, False on timeout."""
        try:
            return wait_for(lambda: self.ping(ip, count=1, timeout=0.5), timeout, f"a reply from {ip}")
        except WaitTimeout:
            return False

    # --- bridges for pods -------------------------------------------------------------------
    def make_bridge(self, name: str, cidr: str, mtu: int | str | None = None, cidr6: str | None = None) -> Bridge:
        """Create a docker0-like bridge with address cidr (e.g. FLANNEL_SUBNET "10.5.1.1/24") and,
        for dual-stack pods, cidr6 (e.g. FLANNEL_IPV6_SUBNET "fd80:0:0:1::1/64")."""
        addr = ipaddress.IPv4Interface(cidr)
        addr6 = ipaddress.IPv6Interface(cidr6) if cidr6 else None
        mtu_val = int(mtu) if mtu is not None else 1500
        ip_batch([
            f"link add {name} type bridge",
            f"link set {name} mtu {mtu_val}",
            f"addr add {addr} dev {name}",
            *([f"addr add {addr6} dev {name} nodad"] if addr6 else []),
            f"link set {name} up",
        ], ns=self.ns)
        br = Bridge(self, name, addr, mtu_val, interface6=addr6)
        self.bridges[name] = br
        return br

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ns={self.ns} address={self.address}>"


class Pod(Host):
    """A pod namespace with eth0 on a bridge of its host; default route via the bridge address."""

    def __init__(self, lab: Lab, name: str, ns: str, host: Host, bridge: Bridge, address: str, prefixlen: int,
                 address6: str | None = None):
        super().__init__(lab, name, ns, address=address, prefixlen=prefixlen, gateway=bridge.address,
                         mtu=bridge.mtu, address6=address6)
        self.host = host


class Lab:
    """A set of namespaces (switch + hosts + pods), processes and a temp dir, cleaned up on close."""

    def __init__(self, mtu: int = 1500, id: str | None = None):
        reap_stale_labs()
        self.mtu = mtu
        self._lock = threading.RLock()
        self._namespaces: list[str] = []
        self._procs: list[LabProcess] = []
        self.hosts: dict[str, Host] = {}
        self.pods: dict[str, Pod] = {}
        self.etcd = None  # the default EtcdServer (set by EtcdServer(lab, ...) / lab.start_etcd)
        self.etcds: list = []
        self._next_ip: dict[ipaddress.IPv4Network, int] = {UNDERLAY: 1, SECOND_UNDERLAY: 1}
        self._second_underlay = False
        self._ipv6_segments: set[ipaddress.IPv6Network] = set()
        self.closed = False
        self.id = self._claim_id(id)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pyflanneld-lab-{self.id}-", dir=_tmp_root()))
        with _open_lock:
            _open_labs.add(self)
        _install_exit_handlers()
        self._write_registry()
        try:
            self.switch = self._make_switch()
        except BaseException:
            self.close()
            raise

    # --- naming / registry -------------------------------------------------------------------
    def _claim_id(self, want: str | None) -> str:
        for _ in range(50):
            lab_id = want or f"pf{secrets.token_hex(2)}"
            sw = f"{lab_id}-sw"
            cp = run(["ip", "netns", "add", sw], check=False)
            if cp.returncode == 0:
                self._namespaces.append(sw)
                _created_namespaces.append(sw)
                return lab_id
            if want:
                raise LabError(f"cannot create namespace {sw}: {cp.stderr.strip()}")
        raise LabError("could not find a free lab id after 50 tries (too many leftover pf* namespaces?)")

    def _write_registry(self) -> None:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        info = {"id": self.id, "pid": os.getpid(), "start": _proc_start_time(os.getpid()),
                "namespaces": self._namespaces, "tmp": str(self.tmp)}
        path = REGISTRY_DIR / self.id
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)

    def _add_ns(self, suffix: str) -> str:
        ns = f"{self.id}-{suffix}"
        with self._lock:
            self._check_open()
            if ns in self._namespaces:
                raise LabError(f"namespace {ns} already exists in lab {self.id}: pick another name")
            self._namespaces.append(ns)
            _created_namespaces.append(ns)
            self._write_registry()
        run(["ip", "netns", "add", ns])
        return ns

    def _check_open(self) -> None:
        if self.closed:
            raise LabError(f"lab {self.id} is closed")

    @property
    def namespaces(self) -> list[str]:
        """This lab's namespaces that currently exist."""
        present = existing_namespaces()
        return [n for n in self._namespaces if n in present]

    # --- topology ----------------------------------------------------------------------------
    def _make_switch(self) -> Host:
        sw = Host(self, "sw", f"{self.id}-sw", address=UNDERLAY_GW, prefixlen=24, iface="br0", mtu=self.mtu)
        ip_batch([
            "link set lo up",
            "link add br0 type bridge",
            f"link set br0 mtu {self.mtu}",
            f"addr add {UNDERLAY_GW}/24 dev br0",
            "link set br0 up",
        ], ns=sw.ns)
        return sw

    def _enable_second_underlay(self) -> None:
        if self._second_underlay:
            return
        gw2 = str(SECOND_UNDERLAY.broadcast_address - 1)
        ip_batch([f"addr add {gw2}/{SECOND_UNDERLAY.prefixlen} dev br0"], ns=self.switch.ns)
        self.switch.sh(
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 "
            "net.ipv4.conf.br0.send_redirects=0"
        )
        self._second_underlay = True

    def _enable_ipv6_segment(self, net6: ipaddress.IPv6Network) -> str:
        """The switch's address on an IPv6 underlay segment (added once, forwarding on): the
        hosts' default IPv6 gateway."""
        gw6 = str(net6.network_address + 0xFE)
        if net6 not in self._ipv6_segments:
            cmds = [f"addr add {gw6}/{net6.prefixlen} dev br0 nodad"]
            if not self._ipv6_segments:  # a link-local usable at once (br0's own is still in DAD)
                cmds.append("addr add fe80::fe/64 dev br0 nodad")
            ip_batch(cmds, ns=self.switch.ns)
            self.switch.sysctl("net.ipv6.conf.all.forwarding", 1)
            self._ipv6_segments.add(net6)
        return gw6

    def add_host(self, name: str, mtu: int | None = None, subnet: str | None = None, ipv6: bool = False) -> Host:
        """Add host namespace "<id>-<name>" with eth0 on the switch.

        subnet: "192.168.100.0/24" (default, same L2/L3 segment as everyone) or "192.168.101.0/24"
        (same bridge, other IP subnet: reaches the others only through the switch's router).
        ipv6: also an IPv6 underlay: eth0 gets fd99::<n>/64 (fd98::<n>/64 on the second subnet),
        n as in the IPv4 address, a default IPv6 route via the switch, IPv6 forwarding on.
        """
        if not name or len(f"v{name}") > 15 or not name.replace("_", "").isalnum():
            raise LabError(f"host name {name!r}: use 1-14 letters/digits")
        net = ipaddress.ip_network(subnet) if subnet else UNDERLAY
        if net not in self._next_ip:
            raise LabError(f"host subnet {net}: only {UNDERLAY} and {SECOND_UNDERLAY} exist in the lab")
        with self._lock:
            n = self._next_ip[net]
            if n >= 254:
                raise LabError(f"no free address left in {net}")
            self._next_ip[net] = n + 1
        if net == SECOND_UNDERLAY:
            self._enable_second_underlay()
        gw = str(net.broadcast_address - 1)
        addr = str(net.network_address + n)
        mtu = mtu or self.mtu
        ns = self._add_ns(name)
        ip_batch([
            f"link add v{name} type veth peer name eth0 netns {ns}",
            f"link set v{name} master br0 mtu {mtu} up",
        ], ns=self.switch.ns)
        addr6 = None
        v6_cmds = []
        if ipv6:
            net6 = UNDERLAY6[net]
            gw6 = self._enable_ipv6_segment(net6)
            addr6 = str(net6.network_address + n)
            v6_cmds = [f"addr add {addr6}/{net6.prefixlen} dev eth0 nodad", f"route add default via {gw6}"]
        ip_batch([
            "link set lo up",
            f"link set eth0 mtu {mtu} up",
            f"addr add {addr}/{net.prefixlen} dev eth0",
            f"route add default via {gw}",
            *v6_cmds,
        ], ns=ns)
        host = Host(self, name, ns, address=addr, prefixlen=net.prefixlen, gateway=gw, mtu=mtu, address6=addr6)
        host.sysctl("net.ipv4.ip_forward", 1)
        if ipv6:
            host.sysctl("net.ipv6.conf.all.forwarding", 1)
        self.hosts[name] = host
        return host

    def add_pod(self, host: Host, name: str, bridge: str = "docker0") -> Pod:
        """Add pod namespace "<id>-<host><name>" with eth0 on host's bridge (see Host.make_bridge)."""
        br = host.bridges.get(bridge)
        if br is None:
            raise LabError(f"host {host.name} has no bridge {bridge!r}: call host.make_bridge() first")
        if len(f"v{name}") > 15:
            raise LabError(f"pod name {name!r} too long (max 14 characters)")
        addr = br.next_address()
        ns = self._add_ns(f"{host.name}{name}")
        ip_batch([
            f"link add v{name} type veth peer name eth0 netns {ns}",
            f"link set v{name} master {bridge} mtu {br.mtu} up",
        ], ns=host.ns)
        addr6 = br.address6_for(addr)
        v6_cmds = []
        if addr6 is not None and br.interface6 is not None:
            v6_cmds = [f"addr add {addr6} dev eth0 nodad", f"route add default via {br.interface6.ip}"]
        ip_batch([
            "link set lo up",
            f"link set eth0 mtu {br.mtu} up",
            f"addr add {addr} dev eth0",
            f"route add default via {br.address}",
            *v6_cmds,
        ], ns=ns)
        pod = Pod(self, name, ns, host, br, str(addr.ip), addr.network.prefixlen,
                  address6=str(addr6.ip) if addr6 is not None else None)
        host.pods[name] = pod
        self.pods[ns] = pod
        return pod

    # --- processes ---------------------------------------------------------------------------
    def spawn(self, ns: str | Host, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log_path: str | Path | None = None, name: str | None = None,
              grace: float = STOP_GRACE) -> LabProcess:
        """Start argv inside namespace ns in a new process group; stdout+stderr go to log_path
        (default: <lab.tmp>/logs/<name>.log). The process is stopped on close() (SIGTERM, then
        SIGKILL after grace seconds, at most STOP_GRACE)."""
        self._check_open()
        ns_name = ns.ns if isinstance(ns, Host) else ns
        argv = [str(a) for a in argv]
        name = name or f"{ns_name.removeprefix(self.id + '-')}-{Path(argv[0]).name}"
        if log_path is None:
            log_dir = self.tmp / "logs"
            log_dir.mkdir(exist_ok=True)
            log_path = log_dir / f"{name}.log"
            i = 1
            while log_path.exists():
                i += 1
                log_path = log_dir / f"{name}.{i}.log"
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by LabProcess
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns_name, *argv], stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        proc = LabProcess(popen, ns=ns_name, argv=argv, log_path=log_path, name=name,
                          grace=min(grace, STOP_GRACE))
        proc._log_file = log_file
        with self._lock:
            self._procs.append(proc)
        return proc

    @property
    def processes(self) -> list[LabProcess]:
        return list(self._procs)

    def read_log(self, path: str | Path) -> str:
        """Text of a log file; a relative path is taken under lab.tmp (then lab.tmp/logs)."""
        p = Path(path)
        if not p.is_absolute():
            p = self.tmp / p if (self.tmp / p).exists() else self.tmp / "logs" / p
        try:
            return p.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_etcd(self, **kwargs):
        """Start an EtcdServer (see lab.etcd.EtcdServer for kwargs) in the switch ns; wait healthy."""
        from .etcd import EtcdServer

        wait = kwargs.pop("wait", True)
        timeout = kwargs.pop("timeout", 10)
        return EtcdServer(self, **kwargs).start(wait=wait, timeout=timeout)

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop processes, delete namespaces and the temp dir. Safe to call twice."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            _destroy(self._namespaces, self._procs)
        finally:
            if os.environ.get("PYFLANNELD_LAB_KEEP") != "1":
                shutil.rmtree(self.tmp, ignore_errors=True)
            (REGISTRY_DIR / self.id).unlink(missing_ok=True)
            with _open_lock:
                _open_labs.discard(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.id} hosts={list(self.hosts)} closed={self.closed}>"


# --- process-exit safety ---------------------------------------------------------------------
_handlers_installed = False


def close_all_labs() -> None:
    """Close every open lab of this process (atexit / SIGTERM path)."""
    with _open_lock:
        labs = list(_open_labs)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _on_sigterm(signum: int, frame: object) -> None:
    close_all_labs()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
    raise SystemExit(128 + signum)


_prev_sigterm: object = None


def _install_exit_handlers() -> None:
    global _handlers_installed, _prev_sigterm
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(close_all_labs)
    if threading.current_thread() is threading.main_thread():
        prev = signal.getsignal(signal.SIGTERM)
        if prev in (signal.SIG_DFL, None) or callable(prev):
            _prev_sigterm = prev if callable(prev) else None
            signal.signal(signal.SIGTERM, _on_sigterm)
