"""What `pip install .` installs: the daemon and its CLI only — no lab, fake servers or test helpers."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_daemon_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("pyflanneld-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pyflanneld", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "pyflanneld/daemon.py" in names and "pyflanneld/cli.py" in names
    leaked = [n for n in names if any(part in n for part in ("lab/", "fake", "conftest", "test_", "bench/"))]
    assert not leaked, leaked
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pyflanneld = pyflanneld.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
