"""`make bench` keeps working: the harness runs its scenarios at a tiny scale and prints their
tables (the figures themselves are bench's business, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("bench")
def test_bench_prints_a_table_per_scenario():
    cp = subprocess.run([sys.executable, "-m", "bench", "--repeats", "1", "--scale", "0.01", "start", "join"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    assert "Traceback" not in cp.stderr, cp.stderr[-3000:]
    out = cp.stdout
    assert "side by side with upstream flanneld (v0.20.2)" in out, out[-3000:]  # the real upstream ran
    for scenario in ("start", "join"):
        assert f"\n# {scenario}\n" in out, out[-3000:]
    header = "| metric"
    assert out.count(header) == 2, out[-3000:]
    assert "| 0 peers: spawn → subnet.env" in out and "| p99 " in out, out[-3000:]
