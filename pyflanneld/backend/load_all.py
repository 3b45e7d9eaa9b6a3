"""Imports every backend module so that each registers its type name."""

import importlib

for _mod in ("alloc", "vxlan", "hostgw", "udp", "awsvpc", "gce", "extension", "wireguard", "ipip", "ipsec"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as e:  # a backend not built yet, or its optional deps missing
        if e.name != f"{__package__}.{_mod}":
            raise
