"""/run/flannel/subnet.env: written atomically in upstream's exact format, read back at start."""

from __future__ import annotations

import os
import tempfile
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from . import envfile
from .subnet.lease import go_ip6_text


def render(network: IPv4Network | None, subnet: IPv4Network | None, mtu: int, ipmasq: bool, *,
           ipv6_network: IPv6Network | None = None, ipv6_subnet: IPv6Network | None = None) -> str:
    """Upstream's WriteSubnetFile (pkg/subnet/subnet.go), in its order::

        FLANNEL_NETWORK=10.5.0.0/16             (IPv4 on: network and subnet given)
        FLANNEL_SUBNET=10.5.72.1/24
        FLANNEL_IPV6_NETWORK=fd80::/48          (IPv6 on: ipv6_network and ipv6_subnet given)
        FLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64
        FLANNEL_MTU=1450
        FLANNEL_IPMASQ=false

    The subnets are written as their first host address with the prefix length; IPv6 text as Go
    prints it (:func:`~pyflanneld.subnet.lease.go_ip6_text`)."""
    lines = []
    if network is not None and subnet is not None:
        gw = IPv4Address(int(subnet.network_address) + 1)
        lines += [f"FLANNEL_NETWORK={network}", f"FLANNEL_SUBNET={gw}/{subnet.prefixlen}"]
    if ipv6_network is not None and ipv6_subnet is not None:
        gw6 = IPv6Address(int(ipv6_subnet.network_address) + 1)
        lines += [f"FLANNEL_IPV6_NETWORK={go_ip6_text(ipv6_network.network_address)}/{ipv6_network.prefixlen}",
                  f"FLANNEL_IPV6_SUBNET={go_ip6_text(gw6)}/{ipv6_subnet.prefixlen}"]
    lines += [f"FLANNEL_MTU={mtu}", f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}"]
    return "".join(f"{ln}\n" for ln in lines)


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
    """The file's assignments (:func:`pyflanneld.envfile.parse`); {} when it is absent, unreadable
    or not parseable — then there is no previous subnet to reuse."""
    try:
        return envfile.read(path)
    except (OSError, envfile.EnvFileError):
        return {}


def previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """(FLANNEL_NETWORK, subnet of FLANNEL_SUBNET) from an earlier run, when present and valid."""
    env = read(path)
    return _cidr(env, "FLANNEL_NETWORK", IPv4Network), _cidr(env, "FLANNEL_SUBNET", IPv4Network)


def previous_ipv6(path: str) -> tuple[IPv6Network | None, IPv6Network | None]:
    """(FLANNEL_IPV6_NETWORK, subnet of FLANNEL_IPV6_SUBNET) from an earlier run, when present and
    valid (upstream ReadIP6CIDRFromSubnetFile: host bits dropped): the previous IPv6 subnet to ask
    for again, and what the ip6tables rules of the earlier run were made for."""
    env = read(path)
    return _cidr(env, "FLANNEL_IPV6_NETWORK", IPv6Network), _cidr(env, "FLANNEL_IPV6_SUBNET", IPv6Network)


def _cidr(env: dict[str, str], key: str, cls: type[IPv4Network] | type[IPv6Network]):
    """``env[key]`` as a ``cls`` network (host bits dropped); None when absent, a list (upstream's
    multi-network form) or not a CIDR of that family (Go's ParseCIDR: a prefix length is needed)."""
    value = env.get(key, "")
    if "/" not in value or "," in value or "%" in value:
        return None
    try:
        return cls(value, strict=False)
    except ValueError:
        return None
