"""Import only the parts of pyroute2 and prometheus_client the daemon uses (their package
``__init__`` loads them all).

``import pyroute2.anything`` first runs ``pyroute2/__init__.py``, which imports NDB, IPDB, IPSet,
IPVS, nl80211, devlink, conntrack, Plan9, ... to re-export them: +11 MiB resident, of which ~6 MiB
and a fifth of the daemon's import CPU are classes pyflanneld never uses (it needs
``pyroute2.iproute`` and ``pyroute2.netlink``; ``python -m bench imports`` shows the figures).
``prometheus_client/__init__.py`` imports its ``exposition`` module, whose HTTP servers pull in
http.server, email, urllib.request and wsgiref (+1.8 MiB); :mod:`pyflanneld.metrics` needs only
``metrics``, ``metrics_core``, ``registry`` and ``utils`` (+0.15 MiB).

:func:`install` registers each of them as a bare package (same ``__path__``, its ``__init__`` not
run), so those submodule imports load only what they import themselves, and the top-level names
pyflanneld imports (:data:`LIGHT`) come from their own submodules. The first access to any other
top-level name (``from pyroute2 import NDB``, ``from prometheus_client import start_http_server``)
runs the real ``__init__`` into that same module, so code that wants the whole library still gets it.

Called from ``pyflanneld/__init__.py``: before any pyroute2 or prometheus_client import of the
daemon. A no-op for a package already imported (then it is the real package) or missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

# package → {top-level name pyflanneld imports → the submodule defining it}
LIGHT = {
    "pyroute2": {"AsyncIPRoute": "pyroute2.iproute.linux", "IPRoute": "pyroute2.iproute.linux",
                 "NetlinkError": "pyroute2.netlink.exceptions"},
    "prometheus_client": {},  # pyflanneld imports its submodules only
}


def install() -> None:
    """Register pyroute2 and prometheus_client as bare packages (see the module docstring); a no-op
    for a package already imported or not installed."""
    for name, light in LIGHT.items():
        _install(name, light)


def _install(name: str, light: dict[str, str]) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType(name)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = name
    pkg.__loader__ = spec.loader

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in light:
            value = getattr(importlib.import_module(light[attr]), attr)
            setattr(pkg, attr, value)
            return value
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            raise AttributeError(attr)  # a submodule (`from pyroute2 import config`): the import system loads it
        del pkg.__getattr__  # any other name: the real __init__, which defines everything
        spec.loader.exec_module(pkg)
        return getattr(pkg, attr)

    pkg.__getattr__ = __getattr__
    sys.modules[name] = pkg
