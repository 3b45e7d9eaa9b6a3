"""Pod-to-pod figures inside the lab: iperf3 TCP throughput and ping round-trip times.

Public API::

    with iperf3_server(dst_pod) as srv: ...          # iperf3 -s -1 in dst's namespace, listening
    iperf3_client(src_pod, dst_pod, seconds=2, streams=1) -> float   # receiver's Gbit/s
    iperf3_gbps(src_pod, dst_pod, seconds=2, streams=1) -> float     # both of the above
    ping_rtts_ms(src_pod, ip, count=100, interval_s=0.01) -> list[float]   # one per reply
    percentile(values, p) -> float                   # nearest rank, p in 0..100

Used by `make demo` (lab/demo.py) and the benchmarks (bench/dataplane.py). Failures raise
MeasureError with one line saying what did not work.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator

from .netns import Host, LabError, LabProcess
from .wait import WaitTimeout


class MeasureError(LabError):
    """A measurement could not be taken (tool failed, no reply)."""


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(p / 100 * len(s)))) - 1]


@contextlib.contextmanager
def iperf3_server(dst: Host, timeout_s: float = 10) -> Iterator[LabProcess]:
    """An iperf3 server for one test (`-1`) bound to dst's address; yields once it listens,
    stops it on exit."""
    srv = dst.popen("iperf3", "-s", "-1", "--forceflush", "-B", dst.address, name=f"iperf3-s-{dst.name}")
    try:
        try:
            srv.wait_log("(?i)listening", timeout_s, what=f"the iperf3 server in {dst.ns}")
        except (LabError, WaitTimeout):
            raise MeasureError(f"iperf3 server in {dst.ns} did not start: {srv.log_text()[-300:]!r}") from None
        yield srv
    finally:
        srv.stop()


def iperf3_client(src: Host, dst: Host, seconds: float = 2, streams: int = 1) -> float:
    """TCP from src to dst's iperf3 server for `seconds`; the receiver's rate in Gbit/s."""
    cp = src.run("iperf3", "-c", dst.address, "-t", str(seconds), "-P", str(streams), "-J",
                 check=False, timeout=seconds + 60)
    try:
        end = json.loads(cp.stdout)["end"]
        return end["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError, TypeError):
        error = ""
        with contextlib.suppress(ValueError, AttributeError):
            error = json.loads(cp.stdout).get("error", "")
        raise MeasureError(f"iperf3 {src.address} → {dst.address} failed: "
                           f"{error or (cp.stderr or cp.stdout).strip()[-300:]}") from None


def iperf3_gbps(src: Host, dst: Host, seconds: float = 2, streams: int = 1) -> float:
    """Start a server in dst, run the client in src: the receiver's Gbit/s."""
    with iperf3_server(dst):
        return iperf3_client(src, dst, seconds, streams)


def ping_rtts_ms(src: Host, ip: str, count: int = 100, interval_s: float = 0.01) -> list[float]:
    """Round-trip times (ms) of `count` pings from src to ip, `interval_s` apart (root may go
    below 0.2 s); one value per reply, so fewer when some were lost."""
    cp = src.run("ping", "-n", "-c", str(count), "-i", str(interval_s), "-W", "1", ip,
                 check=False, timeout=count * (interval_s + 0.05) + 30)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", cp.stdout)]
    if not rtts:
        raise MeasureError(f"no ping reply from {ip} in {src.ns}: {(cp.stderr or cp.stdout).strip()[-200:]}")
    return rtts
