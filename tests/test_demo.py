"""`make demo` (the README's first command) runs as a newcomer runs it: three backends, every pod
reaches every other, and each backend's pod-to-pod figures are printed and plausible; then a
dual-stack run where every pod reaches every other over IPv4 and over IPv6."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lab import ROOT

pytestmark = pytest.mark.lab

BACKENDS = ("vxlan", "host-gw", "udp")
FIGURES = re.compile(r"figures over (\S+): throughput ([\d.]+) (Gbit|Mbit)/s, latency avg ([\d.]+) ms, "
                     r"p99 ([\d.]+) ms$", re.M)


def test_demo_shows_three_backends_with_their_figures():
    cp = subprocess.run([sys.executable, "-m", "lab.demo"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = cp.stdout
    assert cp.returncode == 0, out[-3000:] + cp.stderr[-2000:]
    assert "Traceback" not in cp.stderr, cp.stderr
    assert re.findall(r"^== backend (\S+) ==$", out, re.M) == list(BACKENDS)
    for name in BACKENDS:
        assert f"30/30 pod pairs reachable (24 of them across hosts) over {name}" in out
    figures = {m[0]: m for m in FIGURES.findall(out)}
    assert sorted(figures) == sorted(BACKENDS), out[-3000:]
    for name, (_, value, unit, avg, p99) in figures.items():
        mbit = float(value) * (1000 if unit == "Gbit" else 1)
        assert mbit > 10, (name, value, unit)  # pods really exchanged a TCP stream over the overlay
        assert float(avg) > 0 and float(p99) > 0, (name, avg, p99)
    summary = out[out.index("== what each data plane costs =="):]
    for name in BACKENDS:
        assert re.search(rf"^{re.escape(name)}\s+[\d.]+ [GM]bit/s\s+[\d.]+ ms\s+[\d.]+ ms", summary, re.M), summary
    dual = out[out.index("== dual stack (vxlan, IPv4 and IPv6) =="):]
    assert "30/30 pod pairs reachable (24 of them across hosts) over IPv4 (dual stack)" in dual
    assert "30/30 pod pairs reachable (24 of them across hosts) over IPv6 (dual stack)" in dual
    assert re.search(r"^h1\s+192\.168\.100\.1 fd99::1\s+10\.5\.\d+\.1/24\s+fd80:0:0:[0-9a-f]+::1/64\s+"
                     r"10\.5\.\d+\.0-24&fd80:0:0:[0-9a-f]+::-64\s*$", dual, re.M), dual
    assert "all pods reached each other on every backend, and over IPv4 and IPv6 in dual stack" in out
