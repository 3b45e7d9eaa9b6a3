"""Small helpers shared by the daemon-level tests (lab fixtures live in conftest.py).

``wait_for`` is lab.wait's, the one way to wait in the lab and the tests."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from lab.upstream import missing_reason, upstream_binary
from lab.wait import WaitTimeout, wait_for, wait_timed

__all__ = ["CONFIG_RECHECK", "CONFIG_RETRY", "LEASE_RETRY", "PREFIX", "WaitTimeout", "http_get", "key_of",
           "one_line_error", "said", "subnet_of", "upstream_or_skip", "wait_config_rechecks", "wait_config_retries",
           "wait_lease_retries", "wait_for", "wait_timed"]

PREFIX = "/coreos.com/network"


def subnet_of(env: dict) -> IPv4Network:
    """The leased subnet from a subnet.env dict (FLANNEL_SUBNET is its first address)."""
    return IPv4Network(env["FLANNEL_SUBNET"], strict=False)


def key_of(sn: IPv4Network | str, prefix: str = PREFIX) -> str:
    """The etcd key of a subnet's lease, e.g. /coreos.com/network/subnets/10.1.5.0-24."""
    sn = IPv4Network(sn)
    return f"{prefix}/subnets/{sn.network_address}-{sn.prefixlen}"


def http_get(host, port: int, path: str, max_time_s: float = 20) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path from inside a lab host: (status, body); (0, "") if refused or
    unanswered within max_time_s (generous: a loaded machine answers late, not never)."""
    p = host.run("curl", "-s", "--max-time", str(max_time_s), "-o", "/dev/stdout", "-w", "\n%{http_code}",
                 f"http://127.0.0.1:{port}{path}", check=False, timeout=max_time_s + 30)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body


CONFIG_RETRY = "network config still not fetched; retrying"  # the daemon's debug lines (-v 1), one per retry
LEASE_RETRY = "still no lease; retrying"
CONFIG_RECHECK = "network config rechecked"


def _wait_retries(d, line: str, n: int, timeout: float) -> None:
    since = d.log_text().count(line)
    wait_for(lambda: d.log_text().count(line) >= since + n,
             timeout, f"{n} more {line!r} lines of {d.host.name}")


def wait_config_retries(d, n: int = 3, timeout: float = 60) -> None:
    """Wait until daemon ``d`` (started with ``-v 1``) has retried fetching the network config ``n``
    more times: the positive sign that retries ran, before a test checks that they said nothing."""
    _wait_retries(d, CONFIG_RETRY, n, timeout)


def wait_lease_retries(d, n: int = 2, timeout: float = 60) -> None:
    """Like wait_config_retries, for the retries of acquiring a lease (backoff 1, 2, 4 … s)."""
    _wait_retries(d, LEASE_RETRY, n, timeout)


def wait_config_rechecks(d, n: int, timeout: float = 60) -> None:
    """Wait until daemon ``d`` (``-v 1``, ``PYFLANNELD_CONFIG_RECHECK=<seconds>`` in its environment)
    has re-read the network config ``n`` more times: its event loop ran that long. The positive sign
    a test waits for before checking that something (a renewal, a warning) did *not* happen."""
    _wait_retries(d, CONFIG_RECHECK, n, timeout)


def said(d, text: str) -> int:
    """How many of the daemon's log lines above debug level contain ``text``."""
    return sum(1 for ln in d.log_text().splitlines() if text in ln and "level=debug" not in ln)


def upstream_or_skip(version: str = "v0.20.2") -> str:
    """The path of the real upstream flanneld ``version`` (lab.upstream); the test is skipped,
    with a reason naming upstream, when the binary is absent."""
    binary = upstream_binary(version)
    if binary is None:
        pytest.skip(missing_reason(version))
    return str(binary)


def one_line_error(cp, code: int = 1) -> str:
    """The command (a CompletedProcess) failed with ``code`` and said why in exactly one line on
    stderr; returns that line."""
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stderr.count("\n") == 1 and cp.stderr.endswith("\n"), cp.stderr
    return cp.stderr
