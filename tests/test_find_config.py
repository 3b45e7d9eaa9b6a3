"""Which store holds the network config (pyflanneld.subnet.store.find_config): the one choice
of `--etcd-api auto` that the daemon and the operator commands share. The stores are in-memory
(lab.memstore); the same choice against real etcd servers is in test_etcd_access.py and test_ctl.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from lab.memstore import MemStore
from pyflanneld.subnet.store import StoreError, find_config

CFG = b'{"Network":"10.5.0.0/16"}'


def store(config: bytes | None = None, down: bool = False) -> MemStore:
    s = MemStore(config=config)
    s.partition(down)
    return s


def choose(*stores: MemStore) -> tuple[MemStore, bytes | None, int]:
    """find_config over ``stores`` → (chosen, raw, how many stores it asked for)."""
    asked = 0

    def gen() -> Iterator[MemStore]:
        nonlocal asked
        for s in stores:
            asked += 1
            yield s

    chosen, raw = asyncio.run(find_config(gen()))
    return chosen, raw, asked


def test_first_store_with_the_config_wins_and_later_ones_are_not_made() -> None:
    v3, v2 = store(CFG), store(b"{}")
    assert choose(v3, v2) == (v3, CFG, 1)


def test_falls_back_to_the_second_store() -> None:
    v3, v2 = store(None), store(CFG)
    assert choose(v3, v2) == (v2, CFG, 2)
    v3 = store(CFG, down=True)
    assert choose(v3, v2) == (v2, CFG, 2)


def test_no_config_anywhere_is_the_first_store_and_none() -> None:
    v3, v2 = store(None), store(None)
    assert choose(v3, v2) == (v3, None, 2)
    assert choose(v3, store(CFG, down=True)) == (v3, None, 2)  # the fallback's failure does not count


def test_a_failure_without_a_config_elsewhere_raises_every_failure() -> None:
    with pytest.raises(StoreError) as e:
        choose(store(CFG, down=True), store(None))
    assert str(e.value).count(";") == 0
    with pytest.raises(StoreError) as e:
        choose(store(CFG, down=True), store(CFG, down=True))
    first = str(e.value).split("; ")
    assert len(first) == 2 and first[0] == first[1]
