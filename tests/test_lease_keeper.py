"""The subnet manager's lease keeper (keep_lease) against the in-memory store: what it does when
the store misbehaves under it. The lab tests (test_lifecycle.py) run the same against etcd."""

from __future__ import annotations

import asyncio
import random
from ipaddress import IPv4Address

from lab.memstore import MemStore
from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import LeaseAttrs
from pyflanneld.subnet.manager import SubnetManager

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
