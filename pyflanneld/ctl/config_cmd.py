"""`pyflanneld config get|validate|set`: the network config at `<prefix>/config`."""

from __future__ import annotations

import click
import yaml

from ..config import ConfigError, NetworkConfig
from ..jsondecode import JSONValueError, decode_json
from ..subnet.allocate import lease_compatible, pool_size, pool_size6
from ..subnet.lease import LeaseFormatError, parse_subnet_key
from . import configfile
from .connect import Connection, CtlError, etcd_options, run_async

FILE_HELP = "network config file, JSON or YAML ('-': standard input)"


@click.group()
def config() -> None:
    """Show, check and write the network config (<prefix>/config in etcd)."""


def _summary(cfg: NetworkConfig) -> str:
    """One line: the backend and, per enabled family, the network and its pool of subnets."""
    parts = [f"{cfg.backend_type} backend"]
    if cfg.network is not None:
        parts.append(f"Network {cfg.network}, {pool_size(cfg)} subnets /{cfg.subnet_len} from {cfg.subnet_min} "
                     f"to {cfg.subnet_max}")
    else:
        parts.append("IPv6 only")
    if cfg.ipv6_network is not None:
        parts.append(f"IPv6Network {cfg.ipv6_network}, {pool_size6(cfg)} subnets /{cfg.ipv6_subnet_len} from "
                     f"{cfg.ipv6_subnet_min} to {cfg.ipv6_subnet_max}")
    return ", ".join(parts)


def _load_file(path: str) -> tuple[str, NetworkConfig]:
    """Read and check a config file like the daemon would; CtlError (exit 1) when it is not usable."""
    try:
        text, source = configfile.read_source(path)
        return configfile.load(text, source)
    except configfile.ConfigFileError as e:
        raise CtlError(str(e)) from None
    except ConfigError as e:
        raise CtlError(f"{'stdin' if path == '-' else path}: invalid network config: {e}") from None


@config.command("get")
@click.option("-o", "--output", type=click.Choice(["json", "yaml"]), default="json", show_default=True,
              help="json: exactly as stored; yaml: the same document as YAML")
@etcd_options
def get(etcd: Connection, output: str) -> None:
    """Print the network config stored in etcd.

    Exits 1 (after printing it) when the daemon would refuse the stored config."""

    async def read():
        async with etcd.open() as (store, raw):
            return store.api, raw

    api, raw = run_async(read())
    if raw is None:
        raise etcd.config_not_found(api)
    text = raw.decode("utf-8", "replace")
    problem = ""
    try:
        configfile.check(text)
    except ConfigError as e:
        problem = str(e)
    if output == "yaml":
        try:
            doc = decode_json(raw)  # what the daemon decodes it with: bounded, never RecursionError
        except JSONValueError:
            raise CtlError(f"the config at {etcd.config_key} (etcd {api}) is not JSON ({problem}); "
                           "see it with -o json, fix it with: pyflanneld config set -f FILE") from None
        click.echo(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False), nl=False)
    else:
        click.echo(text if text.endswith("\n") else text + "\n", nl=False)
    if problem:
        raise CtlError(f"the config at {etcd.config_key} (etcd {api}) is invalid: {problem}; "
                       "fix it with: pyflanneld config set -f FILE")


@config.command("validate")
@click.option("-f", "--file", "path", required=True, metavar="FILE", help=FILE_HELP)
def validate(path: str) -> None:
    """Check a config file with the daemon's own parser and messages (offline: etcd is not contacted).

    Exits 0 and prints a summary when the daemon would accept it, else 1 with the reason. The
    backend's own options (VNI, Port, RouteTableID, the extension commands) are checked by the
    backend when the daemon starts, not here."""
    _, cfg = _load_file(path)
    click.echo(f"valid: {_summary(cfg)}")


@config.command("set")
@click.option("-f", "--file", "path", required=True, metavar="FILE", help=FILE_HELP)
@etcd_options
def set_(etcd: Connection, path: str) -> None:
    """Check a config file like `validate`, then store it in etcd as upstream's JSON.

    Nothing is written when the file is invalid. Running daemons keep the config they started
    with until they are restarted (they log that it changed)."""
    raw, cfg = _load_file(path)

    async def write():
        async with etcd.open() as (store, old):
            if old != raw.encode():
                await store.put_config(raw.encode())
            records, _ = await store.list_subnets()
            return store.api, old, records

    api, old, records = run_async(write())
    outside = []
    for rec in records:
        try:
            sn, sn6 = parse_subnet_key(rec.key)
        except LeaseFormatError:
            continue
        if not lease_compatible(cfg, sn, sn6):
            outside.append(rec.key)
    if old == raw.encode():
        click.echo(f"unchanged: {etcd.config_key} (etcd {api}) already holds this config ({_summary(cfg)})")
    else:
        click.echo(f"wrote {etcd.config_key} (etcd {api}): {raw}")
        if old is not None:
            click.echo("note: running daemons keep their config until restarted", err=True)
    if outside:
        click.echo(f"warning: {len(outside)} lease(s) lie outside this config (e.g. {outside[0]}): "
                   "their hosts take new subnets when they restart", err=True)
