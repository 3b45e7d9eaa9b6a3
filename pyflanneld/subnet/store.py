"""The small interface both etcd APIs implement, in datastore terms (keys, bytes, revisions).

The manager (manager.py) turns records into leases; stores know nothing of subnets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar


class StoreError(Exception):
    """The datastore could not be reached or answered with an error (retry later)."""


# What a watch broken by Store.reconnect() says (after "etcd v3 API at <endpoint>: ").
RECONNECTED = "connection dropped: the host's address changed; reconnecting"


class CompactedError(StoreError):
    """The watch's start revision is gone (v3 compaction, v2 "event index cleared"): relist."""


class AuthError(StoreError):
    """Credentials or certificates were refused; the message names what to fix."""


@dataclass(frozen=True, slots=True)
class Record:
    """One subnet key of the datastore: its last path element, value bytes (the lease JSON), whether
    it has a TTL, its expiration (Unix seconds, when known), and its modification and creation
    revisions."""
    key: str  # last path element, e.g. "10.1.15.0-24"
    value: bytes
    has_ttl: bool  # False: a key without TTL (reservation)
    expiration: float | None  # unix time when known
    revision: int  # v3 mod_revision / v2 modifiedIndex
    # v3 create_revision / v2 createdIndex: when the key was created (0 when unknown; v2 renumbers a
    # key on every plain set, so the v2 store reports the lowest index it saw while the key existed).
    # The LeaseBook lets the older of two conflicting leases of the same kind win.
    create_revision: int = 0


@dataclass(frozen=True)
class WatchEvent:
    """One change of a subnet key seen by a watch: a put (the new record) or a delete (key and
    revision only)."""
    kind: Literal["put", "delete"]
    record: Record  # for deletes only key and revision are meaningful


class Store(Protocol):
    """The small interface both etcd APIs implement (:class:`~pyflanneld.subnet.etcdv3.EtcdV3Store`,
    :class:`~pyflanneld.subnet.etcdv2.EtcdV2Store`), in datastore terms: ``<prefix>/config`` and the
    keys under ``<prefix>/subnets/``. Every method raises StoreError (AuthError, CompactedError)
    when etcd cannot be reached or refuses; messages name the API and endpoint."""
    api: str  # "v3" or "v2"

    async def get_config(self) -> bytes | None:
        """The raw bytes of ``<prefix>/config``; None when the key does not exist."""
        ...

    async def list_subnets(self) -> tuple[list[Record], int]:
        """All subnet records and the store revision they reflect."""
        ...

    async def create_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        """Create-if-absent in one step; None when the key exists. ttl_s None: no TTL."""
        ...

    async def put_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record:
        """Unconditional write (renewal, reuse); ttl_s None keeps it without TTL."""
        ...

    async def renew_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        """Write again with a fresh TTL only if the key still holds `value`; None when it does not
        (expired, deleted, or taken over): the caller must acquire again. ttl_s None writes it without
        TTL (turns a lease into a reservation in place: `pyflanneld lease reserve`)."""
        ...

    async def delete_subnet(self, key: str) -> None:
        """Delete the subnet key ``key`` (``10.5.1.0-24``); a key that is already gone is no error."""
        ...

    def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events from start_revision on (inclusive). Raises CompactedError or StoreError."""
        ...

    async def reconnect(self) -> None:
        """Drop the open connections; the next call opens new ones. For when the host's address
        changed: a TCP connection from an address the host no longer has is dead, but nothing
        says so until a keepalive or request deadline runs out (10-20 s)."""
        ...

    async def close(self) -> None:
        """Close the connections (a store is not used after this); revokes nothing."""
        ...


class AdminStore(Store, Protocol):
    """What the operator commands (pyflanneld.ctl) need beyond the daemon's Store."""

    async def put_config(self, value: bytes) -> None:
        """Write `<prefix>/config` (unconditionally, no TTL)."""
        ...

    async def fill_expirations(self, records: list[Record]) -> list[Record]:
        """The records with `expiration` filled in where the list left it unknown (v3: one
        LeaseTimeToLive per lease; v2 already knows it). Reservations keep None."""
        ...


S = TypeVar("S", bound=Store)

async def find_config(stores: Iterable[S]) -> tuple[S, bytes | None]:
    """The store that holds the network config, and the config's raw bytes: the first of
    ``stores`` (in order: v3, then v2 under ``--etcd-api auto``; a generator, so that a later store
    is only made when it is needed) whose ``<prefix>/config`` exists. When none has it, the first
    store and None.

    A store that fails is passed over while a later one may hold the config; a later store's
    failure after the first answered "no config" is ignored (it is only a fallback, e.g. v2
    switched off). Raises StoreError (the failing stores' messages joined by "; ") when a store
    failed and none held the config. Used by the daemon (Daemon.get_config, every second until
    found) and by the operator commands (pyflanneld.ctl.connect)."""
    first: S | None = None
    errors: list[str] = []
    for store in stores:
        try:
            raw = await store.get_config()
        except StoreError as e:
            if first is None or errors:
                errors.append(str(e))
            first = first or store
            continue
        first = first or store
        if raw is not None:
            return store, raw
    if errors:
        raise StoreError("; ".join(errors))
    if first is None:
        raise ValueError("find_config: no store given")
    return first, None
