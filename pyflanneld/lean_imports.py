"""Import only the parts of pyroute2 the daemon uses (its package ``__init__`` loads them all).

``import pyroute2.anything`` first runs ``pyroute2/__init__.py``, which imports NDB, IPDB, IPSet,
IPVS, nl80211, devlink, conntrack, Plan9, ... to re-export them: +11 MiB resident, of which ~6 MiB
and a fifth of the daemon's import CPU are classes pyflanneld never uses (it needs
``pyroute2.iproute`` and ``pyroute2.netlink``; ``python -m bench imports`` shows the figures). :func:`install` registers ``pyroute2`` as a bare package (same ``__path__``,
its ``__init__`` not run), so those submodule imports load only what they import themselves, and
the top-level names pyflanneld imports (:data:`LIGHT`) come from their own submodules. The first
access to any other top-level name (``from pyroute2 import NDB``) runs the real ``__init__`` into
that same module, so code that wants the whole library still gets it.

Called from ``pyflanneld/__init__.py``: before any pyroute2 import of the daemon. A no-op when
pyroute2 was already imported (then it is the real package) or is missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

# top-level names of pyroute2 that pyflanneld imports → the submodule defining them
LIGHT = {"AsyncIPRoute": "pyroute2.iproute.linux", "IPRoute": "pyroute2.iproute.linux",
         "NetlinkError": "pyroute2.netlink.exceptions"}


def install() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("pyroute2")
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = "pyroute2"
    pkg.__loader__ = spec.loader

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in LIGHT:
            value = getattr(importlib.import_module(LIGHT[name]), name)
            setattr(pkg, name, value)
            return value
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)  # a submodule (`from pyroute2 import config`): the import system loads it
        del pkg.__getattr__  # any other name: the real __init__, which defines everything
        spec.loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__getattr__ = __getattr__
    sys.modules["pyroute2"] = pkg
