__version__ = "0.1.0"

from . import lean_imports as _lean_imports  # noqa: E402 - before anything imports pyroute2

_lean_imports.install()
