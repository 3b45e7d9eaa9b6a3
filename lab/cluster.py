"""Run pyflanneld (or another flanneld binary) inside lab hosts.

Public API::

    d = start_daemon(host, "--iface", "eth0", env=None, subnet_file=None, etcd=None,
                     binary=None, log_path=None)
        # argv: <binary> --etcd-endpoints <etcd.endpoint> --subnet-file <lab.tmp>/<host>/subnet.env <args>
        # (each default only when args do not already contain that flag)
        # etcd: an EtcdServer/EtcdCluster, default host.lab.etcd; binary default: pyflanneld_argv()
    d.wait_subnet_env(timeout=30) -> dict[str, str]   # FLANNEL_NETWORK, FLANNEL_SUBNET, ... (IPv6-only:
                                                       # FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET, ...)
    d.subnet_env() -> dict | None                      # current contents, None if absent
    d.subnet_file (Path), d.log_path (Path), d.log_text(), d.pid, d.alive, d.returncode, d.argv
    d.wait_log(pattern, timeout=30) -> re.Match       # regex over the log
    d.wait_exit(timeout=10) -> int
    d.stop(timeout=5) -> int   # SIGTERM; exit code (negative = killed by signal)
    d.kill() -> int            # SIGKILL
    d.restart() -> Daemon      # same argv/env/subnet file, new process (appends to the same log)

    pyflanneld_argv() -> list[str]   # the pyflanneld console script next to sys.executable
    udp_worker_pids(daemon_pid) -> list[int]   # the udp backend's forwarder worker processes
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyflanneld import envfile

from .netns import Host, LabError, LabProcess
from .wait import wait_for


def pyflanneld_argv() -> list[str]:
    """Command that runs pyflanneld: the venv's console script, else ``python -m pyflanneld``."""
    script = Path(sys.executable).parent / "pyflanneld"
    if script.exists():
        return [str(script)]
    found = shutil.which("pyflanneld")
    if found:
        return [found]
    return [sys.executable, "-m", "pyflanneld"]


def udp_worker_pids(daemon_pid: int) -> list[int]:
    """The udp backend's forwarder workers: children of the daemon running pyflanneld.udpfwd.worker."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"pyflanneld.udpfwd.worker" in cmd:
            out.append(int(d.name))
    return sorted(out)


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") or a == "-" + flag.lstrip("-")
               or a.startswith("-" + flag.lstrip("-") + "=") for a in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """Value of --flag / -flag given as "--flag v" or "--flag=v" in args, else None."""
    names = (flag, "-" + flag.lstrip("-"))
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


class Daemon:
    """A flanneld-like process in a lab host."""

    def __init__(self, host: Host, argv: list[str], env: dict[str, str], subnet_file: Path, log_path: Path):
        self.host = host
        self.argv = argv
        self.env = env
        self.subnet_file = subnet_file
        self.log_path = log_path
        self.process: LabProcess = self._spawn()

    def _spawn(self) -> LabProcess:
        return self.host.lab.spawn(self.host.ns, self.argv, env=self.env, log_path=self.log_path,
                                   name=f"{self.host.name}-flanneld")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log_text(self) -> str:
        return self.process.log_text()

    def subnet_env(self) -> dict[str, str] | None:
        try:
            return envfile.read(self.subnet_file)
        except FileNotFoundError:
            return None

    def wait_subnet_env(self, timeout: float = 30) -> dict[str, str]:
        """Wait until the subnet file exists with FLANNEL_SUBNET (or, IPv6-only,
        FLANNEL_IPV6_SUBNET) and return it; LabError (with the
        log's tail) if the daemon exits first, lab.wait.WaitTimeout when the time runs out."""
        def ready() -> dict[str, str] | None:
            alive = self.alive  # read before the file: a file written just before exit still counts
            env = self.subnet_env()
            if env and ("FLANNEL_SUBNET" in env or "FLANNEL_IPV6_SUBNET" in env):
                return env
            if not alive:
                raise LabError(f"{self.host.name}: daemon exited with {self.returncode} before writing "
                               f"{self.subnet_file}; log:\n{self.log_text()[-3000:]}")
            return None

        return wait_for(ready, timeout, f"{self.host.name}'s {self.subnet_file}", interval=0.02,
                        detail=lambda: f"log:\n{self.log_text()[-3000:]}")

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match:
        """Wait until regex pattern appears in the log; LabError if the daemon exits first,
        lab.wait.WaitTimeout on timeout (see LabProcess.wait_log)."""
        return self.process.wait_log(pattern, timeout, what=f"{self.host.name}'s daemon")

    def wait_exit(self, timeout: float = 10) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, wait (SIGKILL after timeout); returns the exit code."""
        return self.process.stop(timeout=timeout)

    def kill(self) -> int:
        return self.process.kill()

    def restart(self) -> Daemon:
        if self.alive:
            self.stop()
        self.process = self._spawn()
        return self

    def __repr__(self) -> str:
        return f"<Daemon {self.host.name} pid={self.pid} alive={self.alive}>"


def start_daemon(host: Host, *args: str, env: Mapping[str, str] | None = None,
                 subnet_file: str | Path | None = None, etcd: object | None = None,
                 binary: Sequence[str] | str | None = None, log_path: str | Path | None = None) -> Daemon:
    """Start pyflanneld in host's namespace with lab defaults for etcd endpoint and subnet file."""
    lab = host.lab
    args = [str(a) for a in args]
    host_dir = lab.tmp / host.name
    host_dir.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if not _has_flag(args, "--etcd-endpoints"):
        store = etcd if etcd is not None else lab.etcd
        if store is None:
            raise LabError("start_daemon: the lab has no etcd; start one (lab.start_etcd()) or pass "
                           "--etcd-endpoints")
        extra += ["--etcd-endpoints", store.endpoint]
    given = _flag_value(args, "--subnet-file")
    if given is not None:
        subnet_file = Path(given)
    else:
        subnet_file = Path(subnet_file) if subnet_file is not None else host_dir / "subnet.env"
        extra += ["--subnet-file", str(subnet_file)]
    if binary is None:
        base = pyflanneld_argv()
    elif isinstance(binary, str):
        base = [binary]
    else:
        base = list(binary)
    if log_path is None:
        log_path = host_dir / "flanneld.log"
        i = 1
        while log_path.exists():
            i += 1
            log_path = host_dir / f"flanneld.{i}.log"
    full_env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    return Daemon(host, [*base, *extra, *args], full_env, subnet_file, Path(log_path))
