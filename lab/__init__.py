"""The test lab: simulated hosts and pods in network namespaces, real etcd, flanneld runner.

See netns.py (Lab, Host, Pod), etcd.py (EtcdServer, EtcdCluster, make_tls_certs) and
cluster.py (start_daemon, Daemon) for the API, and wait.py (wait_for) for the one way to wait.

This package lives beside ``pyflanneld`` (it is not installed with it): tests, ``make demo`` and
``make bench`` import it from the repository root. Importing it puts that root on ``PYTHONPATH``,
so the processes the lab starts (fake cloud servers, their drivers) can run ``python -m lab.<module>``
from any working directory.
"""

import os as _os
from pathlib import Path as _Path

ROOT = _Path(__file__).resolve().parent.parent
_paths = [p for p in _os.environ.get("PYTHONPATH", "").split(_os.pathsep) if p]
if str(ROOT) not in _paths:
    _os.environ["PYTHONPATH"] = _os.pathsep.join([str(ROOT), *_paths])

from .cluster import Daemon, pyflanneld_argv, start_daemon  # noqa: E402 (after the set-up above)
from .etcd import EtcdCluster, EtcdServer, TlsFiles, make_tls_certs  # noqa: E402
from .netns import Bridge, Host, Lab, LabError, LabProcess, Pod  # noqa: E402
from .wait import WaitTimeout, wait_for, wait_timed  # noqa: E402

__all__ = [
    "Bridge", "Daemon", "EtcdCluster", "EtcdServer", "Host", "Lab", "LabError", "LabProcess", "Pod",
    "TlsFiles", "WaitTimeout", "make_tls_certs", "pyflanneld_argv", "start_daemon", "wait_for",
    "wait_timed",
]
