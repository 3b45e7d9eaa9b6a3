"""What the cloud backends' end-to-end modules (test_awsvpc.py, test_gce.py) share: one lab, etcd
and fake cloud API server per module, daemons started against them, each test's daemons stopped
(their logs printed when it failed), and the check that a daemon is up without a traceback."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lab import netns
from lab.cluster import Daemon, start_daemon


class CloudLab:
    """The lab, its etcd (v3 only) and the cloud API server that :meth:`start_server` starts in the
    switch namespace; ``daemons`` are the ones this module's current test started."""

    prefix_tag = "cloud"  # etcd prefixes are /<tag><random>/network

    def __init__(self) -> None:
        self.lab = netns.Lab()
        try:
            self.etcd = self.lab.start_etcd(enable_v2=False)
            self.server = self.start_server(self.lab.switch)
        except BaseException:
            self.lab.close()
            raise
        self.daemons: list[Daemon] = []
        self.n = 0

    def start_server(self, switch: netns.Host) -> Any:
        """The fake cloud API server, started (it has ``close()`` and ``process``)."""
        raise NotImplementedError

    def config(self, cfg: dict) -> str:
        """Put network config ``cfg`` under a fresh etcd prefix; returns the prefix."""
        prefix = f"/{self.prefix_tag}{secrets.token_hex(3)}/network"
        self.etcd.put(f"{prefix}/config", json.dumps(cfg))
        return prefix

    def start(self, host: netns.Host, prefix: str, env: Mapping[str, str], args: Sequence[str]) -> Daemon:
        """pyflanneld on ``host`` (--iface eth0) with etcd ``prefix``, ``env`` and more ``args``."""
        d = start_daemon(host, "--iface", "eth0", "--etcd-prefix", prefix, *args, env=dict(env), etcd=self.etcd)
        self.daemons.append(d)
        return d

    def stop_daemons(self) -> None:
        """Stop every daemon the current test started."""
        for d in self.daemons:
            if d.alive:
                d.stop()
        self.daemons.clear()

    def after_test(self, request: Any) -> None:
        """At the end of a test: the daemons' logs (and the server's) printed when it failed, then
        the daemons stopped."""
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for d in self.daemons:
                print(f"----- {d.host.name} daemon log -----\n{d.log_text()[-4000:]}")
            print(f"----- cloud API log -----\n{self.server.process.log_text()[-3000:]}")
        self.stop_daemons()

    def close(self) -> None:
        """Stop the daemons, the server and the lab."""
        self.stop_daemons()
        self.server.close()
        self.lab.close()


def module_cloud(cls: type[CloudLab]) -> Iterator[CloudLab]:
    """The body of a module-scoped fixture: ``cls()`` for the module, closed after it, and no
    namespace of its lab left behind."""
    c = cls()
    try:
        yield c
    finally:
        c.close()
    assert not set(c.lab._namespaces) & netns.existing_namespaces()


def assert_clean(d: Daemon) -> None:
    """The daemon is running and its log has no traceback."""
    text = d.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert d.alive, text[-3000:]
