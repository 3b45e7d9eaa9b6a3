"""An in-memory Store (the interface of pyflanneld.subnet.store, as the etcd v3/v2 stores) for
model-based tests: revisions, TTL flags, compaction, watches — and the faults of a real
datastore on command (a broken watch, a partition, expiry).

Public API::

    s = MemStore(config=b'{"Network":...}')
    # the Store interface: get_config, list_subnets, create_subnet, put_subnet,
    # renew_subnet, delete_subnet, watch_subnets, close (all async, as the daemon uses them)
    # an operator or another host, acting directly on the store (sync, never partitioned):
    s.put(key, value: bytes, ttl: bool = True); s.delete(key); s.expire(key)   # expiry = a delete
    s.compact()             # revisions up to now are gone: a watch from before raises CompactedError
    s.break_watches()       # every open watch fails with StoreError (the client relists)
    s.partition(True/False) # every call (and open watch) fails with StoreError while True
    s.value(key) -> bytes | None; s.has_ttl(key) -> bool; s.keys() -> set[str]; s.rev
    s.idle() -> True when every open watch has handed out every event and waits for more
    snap = s.snapshot(); s.restore(snap)   # etcd restored from a snapshot: revisions go back
    s.wipe()                # etcd lost its data (a new member): no keys, revisions from 1
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pyflanneld.subnet.store import CompactedError, Record, StoreError, WatchEvent

_HAS_CREATE_REV = any(f.name == "create_revision" for f in dataclasses.fields(Record))


@dataclass
class _Entry:
    value: bytes
    has_ttl: bool
    expiration: float | None
    mod_revision: int
    create_revision: int


class MemStore:
    """See the module docstring. Single event loop; not thread-safe."""

    api = "mem"

    def __init__(self, config: bytes | None = None) -> None:
        self.config = config
        self.kv: dict[str, _Entry] = {}
        self.rev = 1
        self.compacted = 0  # revisions <= this one are gone
        self._history: list[tuple[int, WatchEvent]] = []
        self._news = asyncio.Event()
        self._generation = 0  # bumped by break_watches / partition: open watches fail
        self._down = False
        self._watchers: dict[int, int] = {}  # watcher id → next revision it will hand out
        self._waiting: set[int] = set()
        self._ids = 0

    # -- records -------------------------------------------------------------------------------
    def _record(self, key: str, e: _Entry | None, revision: int) -> Record:
        if e is None:
            kw = dict(key=key, value=b"", has_ttl=False, expiration=None, revision=revision)
            if _HAS_CREATE_REV:
                kw["create_revision"] = 0
            return Record(**kw)
        kw = dict(key=key, value=e.value, has_ttl=e.has_ttl, expiration=e.expiration, revision=e.mod_revision)
        if _HAS_CREATE_REV:
            kw["create_revision"] = e.create_revision
        return Record(**kw)

    def _write(self, key: str, value: bytes, ttl_s: float | None) -> Record:
        self.rev += 1
        old = self.kv.get(key)
        e = _Entry(value, ttl_s is not None, time.time() + ttl_s if ttl_s else None, self.rev,
                   old.create_revision if old is not None else self.rev)
        self.kv[key] = e
        rec = self._record(key, e, self.rev)
        self._emit(WatchEvent("put", rec))
        return rec

    def _remove(self, key: str) -> bool:
        if self.kv.pop(key, None) is None:
            return False
        self.rev += 1
        self._emit(WatchEvent("delete", self._record(key, None, self.rev)))
        return True

    def _emit(self, ev: WatchEvent) -> None:
        self._history.append((ev.record.revision, ev))
        self._wake()

    def _wake(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    def _check(self) -> None:
        if self._down:
            raise StoreError("memstore: partitioned (unreachable)")

    # -- the Store interface -------------------------------------------------------------------
    async def get_config(self) -> bytes | None:
        self._check()
        return self.config

    async def list_subnets(self) -> tuple[list[Record], int]:
        self._check()
        await asyncio.sleep(0)
        return [self._record(k, e, e.mod_revision) for k, e in self.kv.items()], self.rev

    async def create_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        self._check()
        await asyncio.sleep(0)  # the watch may run between the request and its answer
        self._check()
        if key in self.kv:
            return None
        return self._write(key, value, ttl_s)

    async def put_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record:
        self._check()
        await asyncio.sleep(0)
        self._check()
        return self._write(key, value, ttl_s)

    async def renew_subnet(self, key: str, value: bytes, ttl_s: int) -> Record | None:
        self._check()
        await asyncio.sleep(0)
        self._check()
        e = self.kv.get(key)
        if e is None or e.value != value:
            return None
        return self._write(key, value, ttl_s)

    async def delete_subnet(self, key: str) -> None:
        self._check()
        self._remove(key)

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._check()
        if start_revision <= self.compacted:
            raise CompactedError(f"memstore: revision {start_revision} compacted (now {self.compacted})")
        self._ids += 1
        me, gen, pos = self._ids, self._generation, start_revision
        self._watchers[me] = pos
        try:
            while True:
                if self._down or gen != self._generation:
                    raise StoreError("memstore: watch broken")
                if pos <= self.compacted:  # etcd cancels a watcher that fell behind a compaction
                    raise CompactedError(f"memstore: revision {pos} compacted (now {self.compacted})")
                i = bisect.bisect_left(self._history, pos, key=lambda t: t[0])
                if i < len(self._history):
                    rev, ev = self._history[i]
                    pos = rev + 1
                    self._watchers[me] = pos
                    yield ev
                    continue
                news = self._news
                self._waiting.add(me)
                try:
                    await news.wait()
                finally:
                    self._waiting.discard(me)
        finally:
            self._watchers.pop(me, None)

    async def reconnect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- an operator / another host ------------------------------------------------------------
    def put(self, key: str, value: bytes, ttl: bool = True) -> None:
        """Write a key directly (ttl False: a reservation, no TTL)."""
        self._write(key, value, 86400 if ttl else None)

    def delete(self, key: str) -> bool:
        return self._remove(key)

    def expire(self, key: str) -> bool:
        """The key's TTL ran out (for the watch the same as a delete)."""
        return self._remove(key)

    def compact(self) -> None:
        self.compacted = self.rev
        self._history = [t for t in self._history if t[0] > self.compacted]
        self._wake()  # watchers behind it learn at once

    def break_watches(self) -> None:
        self._generation += 1
        self._wake()

    def partition(self, down: bool) -> None:
        self._down = down
        if down:
            self.break_watches()

    def snapshot(self) -> tuple:
        """What an etcd snapshot holds: keys, revision, compaction (restore() brings it back)."""
        return dict(self.kv), self.rev, self.compacted

    def restore(self, snap: tuple) -> None:
        """etcd restored from ``snap`` (a restart: open watches break; revisions go back)."""
        kv, self.rev, self.compacted = snap
        self.kv = dict(kv)
        self._history = [t for t in self._history if t[0] <= self.rev and t[0] > self.compacted]
        self.break_watches()

    def wipe(self) -> None:
        """etcd lost its data: a new member from scratch (the config key is kept: the operator
        puts it back first)."""
        self.restore(({}, 1, 0))

    # -- inspection ----------------------------------------------------------------------------
    def value(self, key: str) -> bytes | None:
        e = self.kv.get(key)
        return None if e is None else e.value

    def has_ttl(self, key: str) -> bool:
        e = self.kv.get(key)
        return e is not None and e.has_ttl

    def keys(self) -> set[str]:
        return set(self.kv)

    def idle(self) -> bool:
        """Every open watch waits for news, having handed out everything up to now."""
        return all(w in self._waiting and pos > self.rev for w, pos in self._watchers.items()) \
            and bool(self._watchers)
