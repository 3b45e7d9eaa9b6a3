"""`pyflanneld leases` (list) and `pyflanneld lease reserve|release` (upstream's reservations).

A reservation is a subnet key without TTL (upstream Documentation/reservations.md): the host whose
PublicIP it carries takes that subnet, and nobody else does. `reserve` turns the host's current lease
into one in place (same value, TTL removed; a running pyflanneld notices and stops renewing, see
SubnetManager._own_reservation_changed) or creates it for a host not started yet; `release` gives it
a TTL again (a running pyflanneld renews it as an ordinary lease at once) or, with `--delete`,
removes it. Writes are create-if-absent or compare-and-swap on the value, so a lease that changes
meanwhile is never overwritten.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

import click
import yaml

from ..options import MAX_LEASE_TTL_S, parse_duration
from ..subnet.lease import LeaseAttrs, LeaseFormatError, parse_subnet_key, subnet_key
from ..subnet.store import Record
from .connect import Connection, CtlError, etcd_options, run_async

TABLE_CELL_MAX = 40


@dataclass(frozen=True)
class LeaseView:
    """One key under `<prefix>/subnets/` as an operator reads it (also the -o json/yaml record)."""

    key: str
    subnet: str | None  # None: the key is not a subnet key
    public_ip: str | None
    backend: str | None  # BackendType; None when the lease sets none (udp, alloc)
    vtep_mac: str | None  # vxlan's BackendData.VtepMAC
    ttl_s: int | None  # seconds left; None for a reservation (or unknown)
    reserved: bool  # a key without TTL
    backend_data: Any
    error: str | None  # why the entry cannot be used (daemons skip it)
    ipv6_subnet: str | None = None  # the key's IPv6 part (dual stack, IPv6-only)
    public_ipv6: str | None = None


def _field(data: Any, name: str) -> Any:
    """A BackendData field, matched case-insensitively like Go's JSON decoder."""
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k.lower() == name.lower():
                return v
    return None


def view(rec: Record, now: float) -> LeaseView:
    """Decode a record for display; bad data becomes `error`, never an exception."""
    ttl = None if rec.expiration is None else max(0, math.ceil(rec.expiration - now))
    base = {"key": rec.key, "ttl_s": ttl, "reserved": not rec.has_ttl}
    try:
        sn, sn6 = parse_subnet_key(rec.key)
    except LeaseFormatError as e:
        return LeaseView(subnet=None, public_ip=None, backend=None, vtep_mac=None, backend_data=None,
                         error=str(e), **base)
    base["ipv6_subnet"] = str(sn6) if sn6 is not None else None
    try:
        attrs = LeaseAttrs.from_json(rec.value)
    except LeaseFormatError as e:
        return LeaseView(subnet=str(sn), public_ip=None, backend=None, vtep_mac=None, backend_data=None,
                         error=str(e), **base)
    mac = _field(attrs.backend_data, "VtepMAC")
    return LeaseView(subnet=str(sn), public_ip=str(attrs.public_ip), backend=attrs.backend_type or None,
                     vtep_mac=mac if isinstance(mac, str) else None, backend_data=attrs.backend_data,
                     error=None, public_ipv6=str(attrs.public_ipv6) if attrs.public_ipv6 else None, **base)


def format_ttl(view: LeaseView) -> str:
    """`23h59m58s`, `reserved`, `expired` (or `-` when unknown)."""
    if view.reserved:
        return "reserved"
    if view.ttl_s is None:
        return "-"
    if view.ttl_s == 0:
        return "expired"
    h, rest = divmod(view.ttl_s, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (s, "s")) if n) or "0s"


def _cell(v: str | None) -> str:
    """A table cell from untrusted text: control characters escaped, long values cut."""
    if v is None or v == "":
        return "-"
    if not v.isprintable():
        v = v.encode("unicode_escape").decode("ascii")
    return v if len(v) <= TABLE_CELL_MAX else v[: TABLE_CELL_MAX - 1] + "…"


def render_table(views: list[LeaseView]) -> str:
    """Aligned columns SUBNET, PUBLIC-IP, BACKEND, VTEP-MAC, TTL (+ IPV6-SUBNET and PUBLIC-IPV6 when
    a lease has an IPv6 part, + PROBLEM when an entry is bad)."""
    header = ["SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TTL"]
    rows = [[_cell(v.subnet or v.key), _cell(v.public_ip), _cell(v.backend), _cell(v.vtep_mac), format_ttl(v)]
            for v in views]
    if any(v.ipv6_subnet for v in views):
        header[1:1] = ["IPV6-SUBNET"]
        header[3:3] = ["PUBLIC-IPV6"]
        for row, v in zip(rows, views, strict=True):
            row[1:1] = [_cell(v.ipv6_subnet)]
            row[3:3] = [_cell(v.public_ipv6)]
    if any(v.error for v in views):
        header.append("PROBLEM")
        for row, v in zip(rows, views, strict=True):
            row.append(_cell(v.error) if v.error else "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows]) + "\n"


def _sort_key(v: LeaseView) -> tuple:
    if not v.subnet:
        return (1, 0, 0, v.key)
    v6 = int(IPv6Network(v.ipv6_subnet).network_address) if v.ipv6_subnet else 0
    return (0, int(IPv4Network(v.subnet).network_address), v6, v.key)


async def _list(etcd: Connection) -> tuple[str, list[Record]]:
    async with etcd.open() as (store, _raw):
        records, _ = await store.list_subnets()
        return store.api, await store.fill_expirations(records)


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True,
              help="json/yaml: a list of {key, subnet, public_ip, backend, vtep_mac, ttl_s, reserved, "
                   "backend_data, error}")
@etcd_options
def leases(etcd: Connection, output: str) -> None:
    """List the subnet leases and reservations in etcd: subnet, PublicIP, backend, VtepMAC, TTL left."""
    api, records = run_async(_list(etcd))
    now = time.time()
    views = sorted((view(r, now) for r in records), key=_sort_key)
    if output == "json":
        click.echo(json.dumps([asdict(v) for v in views], indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump([asdict(v) for v in views], sort_keys=False), nl=False)
    elif views:
        click.echo(render_table(views), nl=False)
    else:
        click.echo(f"no leases under {etcd.subnet_key('')} (etcd {api})")


# -- reservations ----------------------------------------------------------------------------------


class SubnetParam(click.ParamType):
    """A subnet as `10.5.1.0/24` or as its key `10.5.1.0-24`."""

    name = "SUBNET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> IPv4Network:
        """``10.5.1.0/24`` or a subnet key ``10.5.1.0-24`` → IPv4Network; click's usage error (exit 2,
        one line, with a did-you-mean for host bits) otherwise."""
        if isinstance(value, IPv4Network):
            return value
        text = str(value)
        try:
            return parse_subnet_key(text)[0] if "-" in text else IPv4Network(text)
        except LeaseFormatError:
            self.fail(f"{text!r} is not a subnet such as 10.5.1.0/24", param, ctx)
        except ValueError as e:
            hint = ""
            if "host bits" in str(e):
                hint = f"; did you mean {IPv4Network(text, strict=False)}?"
            self.fail(f"{text!r} is not a subnet such as 10.5.1.0/24 ({e}){hint}", param, ctx)


class IPv4Param(click.ParamType):
    """A click parameter type for an IPv4 address without prefix length (``--public-ip``)."""
    name = "IP"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> IPv4Address:
        """``value`` → IPv4Address; click's usage error (exit 2, one line) otherwise."""
        try:
            return IPv4Address(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 address (no prefix length), e.g. 192.168.1.10", param, ctx)


class DurationParam(click.ParamType):
    """A Go duration (`24h`, `90m`) or seconds, rounded up to whole seconds, 1..MAX_LEASE_TTL_S."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """A Go duration (``24h``, ``90m``, ``30s``) or seconds → whole seconds (rounded up), 1 s up to
        etcd's maximum lease TTL; click's usage error (exit 2, one line) otherwise."""
        if isinstance(value, int):
            return value
        try:
            seconds = math.ceil(parse_duration(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not a duration such as 24h, 90m or 30s", param, ctx)
        if seconds < 1:
            self.fail("must be at least 1s", param, ctx)
        if seconds > MAX_LEASE_TTL_S:
            self.fail(f"{value!r} is longer than etcd allows a lease to be ({MAX_LEASE_TTL_S}s, about 285 years)",
                      param, ctx)
        return seconds


@click.group()
def lease() -> None:
    """Reserve a subnet for a host, or release a reservation (upstream's reservations)."""


def _describe(v: LeaseView) -> str:
    """`10.5.1.0/24 is leased to 192.168.1.3 (TTL 23h…)`, `… is reserved for …`, or what is wrong."""
    if v.error:
        return f"{v.subnet or v.key} holds an entry no daemon can use ({v.error})"
    if v.reserved:
        return f"{v.subnet} is reserved for {v.public_ip}"
    return f"{v.subnet} is leased to {v.public_ip} (TTL {format_ttl(v)})"


def find_record(records: list[Record], subnet: IPv4Network) -> Record | None:
    """The key holding ``subnet``: ``10.5.1.0-24``, or an upstream dual-stack host's
    ``10.5.1.0-24&fd80:0:0:1::-64`` (matched by its IPv4 part, which is what the subnet is)."""
    for rec in records:
        try:
            if parse_subnet_key(rec.key)[0] == subnet:
                return rec
        except LeaseFormatError:
            continue
    return None


@lease.command("reserve")
@click.argument("subnet", type=SubnetParam())
@click.option("--public-ip", required=True, type=IPv4Param(), help="the PublicIP of the host that gets the subnet")
@etcd_options
def reserve(etcd: Connection, subnet: IPv4Network, public_ip: IPv4Address) -> None:
    """Reserve SUBNET for the host with --public-ip: a lease without TTL.

    The host's current lease of SUBNET becomes the reservation in place; a free SUBNET gets a
    reservation the host takes when it (re)starts. Refused when another host holds SUBNET or when
    SUBNET is not one the network config hands out."""
    key = subnet_key(subnet)

    async def work() -> tuple[str, str, list[str], str]:
        async with etcd.open() as (store, raw):
            cfg = etcd.parse_stored_config(store, raw)
            if not cfg.enable_ipv4:
                raise CtlError("this network is IPv6-only (EnableIPv4 false): `lease reserve` names leases by their "
                               "IPv4 subnet and cannot reserve here")
            if not cfg.contains_subnet(subnet):
                raise CtlError(f"{subnet} is not a subnet of this network ({cfg.network}: /{cfg.subnet_len} "
                               f"subnets from {cfg.subnet_min} to {cfg.subnet_max}); daemons would ignore it")
            records, _ = await store.list_subnets()
            records = await store.fill_expirations(records)
            now = time.time()
            current = find_record(records, subnet)
            others = [v.subnet for v in (view(r, now) for r in records if r is not current)
                      if v.public_ip == str(public_ip)]
            if current is None and cfg.enable_ipv6:
                raise CtlError(f"{subnet} is free, but a reservation made ahead in a dual-stack network "
                               "(EnableIPv6) would need the host's IPv6 subnet and PublicIPv6 too: start the host, "
                               "then reserve its lease in place")
            if current is None:
                value = LeaseAttrs(public_ip=public_ip).to_json().encode()
                if await store.create_subnet(key, value, None) is None:
                    raise CtlError(f"{subnet} was just leased by another host; run `pyflanneld leases` and retry")
                return store.api, "reserved", others, key
            v = view(current, now)
            if v.error or v.public_ip != str(public_ip):
                raise CtlError(f"{_describe(v)}, not {public_ip}: reserve another subnet, or release/delete "
                               f"{etcd.subnet_key(current.key)} first")
            if v.reserved:
                return store.api, "already reserved", others, current.key
            if await store.renew_subnet(current.key, current.value, None) is None:
                raise CtlError(f"{subnet} changed while reserving it; run `pyflanneld leases` and retry")
            return store.api, "reserved (the host's lease, TTL removed)", others, current.key

    api, what, others, key = run_async(work())
    click.echo(f"{what}: {subnet} for {public_ip} ({etcd.subnet_key(key)}, etcd {api}, no TTL)")
    if others:
        click.echo(f"warning: {public_ip} also holds {', '.join(sorted(others))}; the host keeps that until it "
                   "expires or is deleted, then takes the reservation on restart", err=True)


@lease.command("release")
@click.argument("subnet", type=SubnetParam())
@click.option("--ttl", "ttl_s", type=DurationParam(), default="24h", show_default=True,  # upstream's subnetTTL
              help="TTL the reservation becomes a lease with (the host renews it, else it expires)")
@click.option("--delete", is_flag=True, help="delete the reservation now instead (its host allocates again)")
@etcd_options
def release(etcd: Connection, subnet: IPv4Network, ttl_s: int, delete: bool) -> None:
    """Turn the reservation of SUBNET back into an ordinary lease (or delete it).

    Refused when SUBNET is not a reservation: a running host's lease is left alone."""

    async def work() -> tuple[str, str]:
        async with etcd.open() as (store, _raw):
            records, _ = await store.list_subnets()
            current = find_record(records, subnet)
            if current is None:
                raise CtlError(f"no lease or reservation for {subnet} ({etcd.subnet_key(subnet_key(subnet))}, "
                               f"etcd {store.api})")
            v = view((await store.fill_expirations([current]))[0], time.time())
            if not v.reserved:
                raise CtlError(f"{_describe(v)}: not a reservation, nothing to release")
            if delete:
                await store.delete_subnet(current.key)
            elif await store.renew_subnet(current.key, current.value, ttl_s) is None:
                raise CtlError(f"{subnet} changed while releasing it; run `pyflanneld leases` and retry")
            return store.api, current.key

    api, key = run_async(work())
    if delete:
        click.echo(f"deleted the reservation of {subnet} ({etcd.subnet_key(key)}, etcd {api})")
    else:
        click.echo(f"released {subnet}: now a lease with TTL {ttl_s}s ({etcd.subnet_key(key)}, etcd {api})")
