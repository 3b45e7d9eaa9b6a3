"""/run/flannel/subnet.env: written atomically in upstream's exact format, read back at start."""

from __future__ import annotations

import os
import tempfile
from ipaddress import IPv4Address, IPv4Network


def render(network: IPv4Network, subnet: IPv4Network, mtu: int, ipmasq: bool) -> str:
    """Upstream's WriteSubnetFile order; FLANNEL_SUBNET is the subnet's first host address."""
    gw = IPv4Address(int(subnet.network_address) + 1)
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={gw}/{subnet.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n"
    )


def write(path: str, content: str) -> None:
    """temp file in the same directory + rename; directory created 0755; file mode 0644."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_text(path: str) -> str:
    """The file's text; "" when it does not exist. Other errors (EACCES, EIO) raise OSError."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def read(path: str) -> dict[str, str]:
    """KEY=VALUE lines (godotenv-like: comments, blank lines, optional quotes, `export`)."""
    out: dict[str, str] = {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        k, eq, v = line.partition("=")
        if not eq:
            continue
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        out[k.strip()] = v
    return out


def previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """(FLANNEL_NETWORK, subnet of FLANNEL_SUBNET) from an earlier run, when present and valid."""
    env = read(path)
    net = sn = None
    try:
        if env.get("FLANNEL_NETWORK") and "," not in env["FLANNEL_NETWORK"]:
            net = IPv4Network(env["FLANNEL_NETWORK"], strict=False)
        if env.get("FLANNEL_SUBNET") and "," not in env["FLANNEL_SUBNET"]:
            sn = IPv4Network(env["FLANNEL_SUBNET"], strict=False)
    except ValueError:
        pass
    return net, sn
