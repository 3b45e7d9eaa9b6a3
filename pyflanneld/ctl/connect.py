"""The etcd connection of the operator commands: the daemon's own flags, variables and store classes.

Every subcommand takes the daemon's etcd flags (`--etcd-endpoints`, `--etcd-prefix`, the TLS files,
`--etcd-username/--etcd-password`, `--etcd-api auto|v3|v2`), spelt the Go way too
(`-etcd-endpoints=…`), each falling back to its `FLANNELD_*` variable like the daemon
(pyflanneld.options). Texts and defaults come from `options.FLAGS`, checks from `cli.validate`,
stores are the daemon's (subnet/etcdv3.py, subnet/etcdv2.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..config import ConfigError, NetworkConfig, parse_config
from ..options import BY_NAME, OptionError, Options
from ..subnet.etcd_common import EtcdSettings
from ..subnet.store import AdminStore, StoreError, find_config

ETCD_FLAGS = ("etcd-endpoints", "etcd-prefix", "etcd-cafile", "etcd-certfile", "etcd-keyfile",
              "etcd-username", "etcd-password", "etcd-api")
APIS = ("auto", "v3", "v2")
T = TypeVar("T")


class CtlError(click.ClickException):
    """A failure an operator can fix: one line on stderr, exit status 1."""


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's etcd work; a datastore failure becomes a CtlError (one line, exit 1)."""
    try:
        return asyncio.run(coro)
    except StoreError as e:
        raise CtlError(str(e)) from None


class GoFlag(click.Option):
    """A long option that also answers to Go's single-dash spelling (`-etcd-prefix=/x`); `--help`
    lists only the double-dash one."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        """click's help line for this option, listing only its ``--`` spelling."""
        saved = self.opts
        self.opts = [o for o in self.opts if o.startswith("--")]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


def _etcd_option(name: str) -> Callable:
    flag = BY_NAME[name]
    kw: dict[str, Any] = {"default": flag.default, "envvar": flag.env_var, "show_envvar": True,
                          "help": flag.help.replace(" [pyflanneld]", "")}
    if name == "etcd-api":
        kw["type"] = click.Choice(APIS, case_sensitive=False)
    if name == "etcd-password":
        kw["show_default"] = False
    else:
        kw["show_default"] = bool(flag.default)
    return click.option(f"-{name}", f"--{name}", name.replace("-", "_"), cls=GoFlag, **kw)


def etcd_options(fn: Callable) -> Callable:
    """Decorator: the daemon's etcd flags, collected into one `etcd: Connection` argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name.replace("-", "_")) for name in ETCD_FLAGS}
        return fn(*args, etcd=Connection.from_values(values), **kwargs)

    for name in reversed(ETCD_FLAGS):
        wrapper = _etcd_option(name)(wrapper)
    return wrapper


@dataclass(frozen=True)
class Connection:
    """Where the commands read and write: the daemon's EtcdSettings and the --etcd-api choice."""

    settings: EtcdSettings
    api: str  # "auto", "v3" or "v2"

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Connection:
        """Check the values like the daemon does (same texts) and build the settings.
        Raises CtlError."""
        from ..cli import validate  # cli imports this package: import at call time

        opts = Options.defaults()
        opts.values.update(values)
        try:
            validate(opts)
        except OptionError as e:
            raise CtlError(str(e)) from None
        try:
            settings = EtcdSettings.from_flags(
                endpoints=opts.etcd_endpoints, prefix=opts.etcd_prefix, cafile=opts.etcd_cafile,
                certfile=opts.etcd_certfile, keyfile=opts.etcd_keyfile,
                username=opts.etcd_username, password=opts.etcd_password)
        except ValueError as e:
            raise CtlError(f"--etcd-endpoints: {e}") from None
        return cls(settings, opts.etcd_api.lower())

    @property
    def config_key(self) -> str:
        """The full etcd key of the network config, e.g. /coreos.com/network/config."""
        return f"{self.settings.prefix.rstrip('/')}/config"

    def subnet_key(self, key: str) -> str:
        """The full etcd key of a subnet key such as 10.5.1.0-24 ("" → the subnets/ directory)."""
        return f"{self.settings.prefix.rstrip('/')}/subnets/{key}"

    def config_not_found(self, api: str) -> CtlError:
        """The CtlError for a missing ``<prefix>/config`` in etcd ``api`` ("v3"/"v2"), naming the command
        that creates it."""
        return CtlError(f"network config not found at {self.config_key} (etcd {api}); "
                        "create it with: pyflanneld config set -f FILE")

    def _store(self, api: str) -> AdminStore:
        if api == "v3":
            from ..subnet.etcdv3 import EtcdV3Store

            return EtcdV3Store(self.settings)
        from ..subnet.etcdv2 import EtcdV2Store  # imported on demand, as in the daemon

        return EtcdV2Store(self.settings)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[tuple[AdminStore, bytes | None]]:
        """`async with conn.open() as (store, raw_config)`: the store to use and the raw config it
        holds (None: absent); every store opened is closed on exit.

        `--etcd-api auto` picks like the daemon (pyflanneld.subnet.store.find_config): v3 when its
        config is there, else v2 when v2 has one, else v3 (where `config set` then writes). Raises
        StoreError when the chosen API cannot be read."""
        opened: list[AdminStore] = []

        def stores() -> Iterator[AdminStore]:
            for api in (("v3", "v2") if self.api == "auto" else (self.api,)):
                opened.append(self._store(api))
                yield opened[-1]

        try:
            store, raw = await find_config(stores())
            yield store, raw
        finally:
            for store in opened:
                await store.close()

    def parse_stored_config(self, store: AdminStore, raw: bytes | None) -> NetworkConfig:
        """The stored config parsed by the daemon's parser; CtlError when absent or invalid."""
        if raw is None:
            raise self.config_not_found(store.api)
        try:
            return parse_config(raw)
        except ConfigError as e:
            raise CtlError(f"invalid network config at {self.config_key} (etcd {store.api}): {e}; "
                           "fix it with: pyflanneld config set -f FILE") from None
