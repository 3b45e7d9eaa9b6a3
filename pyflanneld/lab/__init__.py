"""The test lab: simulated hosts and pods in network namespaces, real etcd, flanneld runner.

See netns.py (Lab, Host, Pod), etcd.py (EtcdServer, EtcdCluster, make_tls_certs) and
cluster.py (start_daemon, Daemon) for the API.
"""

from .cluster import Daemon, parse_env_file, pyflanneld_argv, start_daemon
from .etcd import EtcdCluster, EtcdServer, TlsFiles, make_tls_certs
from .netns import Bridge, Host, Lab, LabError, LabProcess, Pod

__all__ = [
    "Bridge", "Daemon", "EtcdCluster", "EtcdServer", "Host", "Lab", "LabError", "LabProcess", "Pod",
    "TlsFiles", "make_tls_certs", "parse_env_file", "pyflanneld_argv", "start_daemon",
]
