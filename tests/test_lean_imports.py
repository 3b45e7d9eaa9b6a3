"""pyflanneld loads only the parts of pyroute2 it uses; the whole library stays reachable."""

import subprocess
import sys


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_the_daemon_imports_no_ndb_ipdb_or_other_unused_pyroute2_parts():
    out = run_python(
        "import sys, pyflanneld.daemon, pyflanneld.backend.vxlan, pyflanneld.iface, pyflanneld.udpfwd.device\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['pyroute2', 'ndb'], ['pyroute2', 'ipdb'],"
        " ['pyroute2', 'ipset'], ['pyroute2', 'conntrack'], ['pyroute2', 'plan9'])))\n"
        "from pyroute2 import AsyncIPRoute, IPRoute\n"
        "from pyroute2.iproute.linux import AsyncIPRoute as A, IPRoute as I\n"
        "print(AsyncIPRoute is A and IPRoute is I)")
    assert out.split("\n")[:2] == ["[]", "True"]


def test_any_other_pyroute2_name_still_loads_the_whole_package():
    out = run_python("import sys, pyflanneld.netlink\nfrom pyroute2 import NDB, IPSet\nimport pyroute2\n"
                     "print(NDB.__module__, IPSet.__module__, 'pyroute2.ndb' in sys.modules, bool(pyroute2.__version__))")
    assert out.split() == ["pyroute2.ndb.main", "pyroute2.ipset", "True", "True"]


def test_pyroute2_imported_first_is_left_as_it_is():
    out = run_python("import pyroute2, sys\nfull = sys.modules['pyroute2']\nimport pyflanneld.netlink\n"
                     "print(sys.modules['pyroute2'] is full, 'pyroute2.ndb' in sys.modules)")
    assert out.split() == ["True", "True"]


def test_the_daemon_loads_prometheus_client_without_its_http_servers():
    out = run_python(
        "import sys, pyflanneld.daemon\n"
        "print(sorted(m for m in ('prometheus_client.metrics', 'prometheus_client.exposition', 'http.server',"
        " 'wsgiref.simple_server') if m in sys.modules))\n"
        "from prometheus_client import generate_latest, Counter\n"
        "from prometheus_client.exposition import generate_latest as g\n"
        "print(generate_latest is g, Counter.__module__)")
    assert out.split("\n")[:2] == ["['prometheus_client.metrics']", "True prometheus_client.metrics"]
