"""The subnet manager against the in-memory store: the lease keeper (keep_lease) when the store
misbehaves under it, and the host's underlay networks, which it never leases nor accepts as a peer.
The lab tests (test_lifecycle.py, test_lease_gate.py) run the same against etcd."""

from __future__ import annotations

import asyncio
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from lab.memstore import MemStore
from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import LeaseAttrs
from pyflanneld.subnet.manager import PoolExhausted, SubnetManager
from pyflanneld.subnet.store import Record

CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
ATTRS = LeaseAttrs(public_ip=IPv4Address("192.168.100.1"), backend_type="vxlan",
                   backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})


class HangingRenewals(MemStore):
    """A store whose renewals never answer (a partitioned etcd that still accepts the call)."""

    async def renew_subnet(self, key, value, ttl):
        await asyncio.Event().wait()


def test_own_lease_lost_while_a_renewal_hangs_is_acquired_again():
    """The loss cuts the hanging renewal short and the keeper acquires again (it died with
    InvalidStateError, "background task failed", when the cut-off call had not finished
    cancelling yet)."""
    async def main():
        store = HangingRenewals()
        m = SubnetManager(store, parse_config(CONFIG), ttl_s=3600, renew_margin_s=3600,  # always due
                          rng=random.Random(1))
        first = await m.acquire(ATTRS)
        keeper = asyncio.ensure_future(m.keep_lease())
        await asyncio.sleep(0.05)  # the renewal is in flight
        store.delete(first.key)
        m.lose("deleted")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not m.lost_reason:
                break
        assert not keeper.done(), keeper.exception()
        assert not m.lost_reason and store.value(m.lease.key) == ATTRS.to_json().encode()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)

    asyncio.run(main())


def test_underlay_networks_are_never_leased_nor_accepted():
    """Network 192.168.0.0/16 around the underlay 192.168.100.0/24 (and IPv6Network fd99::/48 around
    fd99::/64): the pool's only other subnet is chosen, and peer leases overlapping the underlay
    are rejected, in either family, naming it."""
    cfg = parse_config('{"Network":"192.168.0.0/16","SubnetMin":"192.168.100.0","SubnetMax":"192.168.101.0",'
                       '"EnableIPv6":true,"IPv6Network":"fd99::/48","IPv6SubnetMin":"fd99::",'
                       '"IPv6SubnetMax":"fd99:0:0:1::","Backend":{"Type":"vxlan"}}')
    under = (IPv4Network("192.168.100.0/24"), IPv6Network("fd99::/64"))

    async def main():
        m = SubnetManager(MemStore(), cfg, ttl_s=60, renew_margin_s=10, rng=random.Random(1))
        m.book.set_host_networks(under)
        return await m.try_acquire(ATTRS)

    lease = asyncio.run(main())
    assert (str(lease.subnet), str(lease.subnet6)) == ("192.168.101.0/24", "fd99:0:0:1::/64")

    book = SubnetManager(MemStore(), cfg, ttl_s=60, renew_margin_s=10).book
    value = ('{"PublicIP":"192.168.100.7","PublicIPv6":"fd99::7","BackendType":"vxlan","BackendData":'
             '{"VNI":1,"VtepMAC":"02:00:00:00:00:07"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:07"}}')
    recs = [Record(k, value.replace(":07", f":{i:02x}").encode(), True, None, i + 1, i + 1) for i, k in enumerate(
        ["192.168.100.128-25&fd99:0:0:5::-64", "192.168.102.0-24&fd99::-64", "192.168.103.0-24&fd99:0:0:6::-64"])]
    book.reset(recs)
    assert set(book.accepted) == {r.key for r in recs}
    book.set_host_networks(under)
    assert set(book.accepted) == {"192.168.103.0-24&fd99:0:0:6::-64"}
    assert "overlaps this host's underlay network 192.168.100.0/24" in book.rejected["192.168.100.128-25&fd99:0:0:5::-64"]
    assert "IPv6 subnet fd99::/64 overlaps this host's underlay network fd99::/64" in book.rejected[
        "192.168.102.0-24&fd99::-64"]


def test_out_of_subnets_names_the_underlay_that_fills_the_pool():
    """Network = the underlay itself: every subnet overlaps it; the error says so, not only "leased"."""
    cfg = parse_config('{"Network":"192.168.100.0/24","SubnetLen":28,"Backend":{"Type":"vxlan"}}')

    async def main():
        m = SubnetManager(MemStore(), cfg, ttl_s=60, renew_margin_s=10)
        m.book.set_host_networks((IPv4Network("192.168.100.0/24"),))
        await m.try_acquire(ATTRS)

    with pytest.raises(PoolExhausted, match=r"are leased or in this host's underlay 192\.168\.100\.0/24; free one"):
        asyncio.run(main())
