"""nftables mode (``EnableNFTables: true``): upstream ``pkg/trafficmngr/nftables`` (v0.25+), kept in place.

The ruleset is exactly upstream's (tables, comments, chain types/hooks/priorities, rules, order)::

    table ip flannel-ipv4 {
        comment "rules for flannel-ipv4"
        chain postrtg {                                   # with --ip-masq
            comment "chain to manage traffic masquerading by flannel"
            type nat hook postrouting priority srcnat; policy accept;
            meta mark 0x4000 return
            ip saddr S ip daddr N return
            ip saddr N ip daddr S return
            ip saddr != S ip daddr N return
            ip saddr N ip daddr != 224.0.0.0/4 masquerade fully-random
            ip saddr != N ip daddr N masquerade fully-random
        }
        chain forward {                                   # with --iptables-forward-rules
            comment "chain to accept flannel traffic"
            type filter hook forward priority filter; policy accept;
            ip saddr N accept
            ip daddr N accept
        }
    }
    table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" }   # same chains once IPv6 is on

(N = Network, S = this host's subnet; ``fully-random`` only when the kernel takes it — probed
with ``nft --check`` like upstream — and ``--ip-masq-fully-random-disable`` is not given.)

Differences from upstream, all on the safe side:

* every table is replaced in one ``nft -f`` transaction (``add table; delete table; table {…}``):
  never a moment without rules, and nothing stale (a previous Network/subnet) survives;
* the tables are checked every ``--iptables-resync`` seconds (upstream installs them once): the
  listing (``nft -j list table``, handles dropped) is compared with the one taken right after our
  own transaction, and any difference — a flushed or deleted chain, a rule added, removed or
  changed, a table deleted — is repaired by the same transaction;
* at start the iptables chains of the other mode are removed (by the caller's ``cleanup``), after
  our tables are in place; iptables mode removes these tables in turn;
* the tables stay when the daemon stops (upstream deletes them), like the iptables rules, so pods
  keep their masquerade across a restart.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import structlog

from . import metrics
from .rulecmd import RulesError, run_command

log = structlog.get_logger()

Network = IPv4Network | IPv6Network

KUBE_PROXY_MARK = "0x4000"
POSTRTG = "postrtg"
FORWARD = "forward"
POSTRTG_COMMENT = "chain to manage traffic masquerading by flannel"
FORWARD_COMMENT = "chain to accept flannel traffic"
# IP version → (nft family and match keyword, table name, multicast range never masqueraded)
FAMILIES = {4: ("ip", "flannel-ipv4", "224.0.0.0/4"), 6: ("ip6", "flannel-ipv6", "ff00::/8")}
MISSING_NFT = ("EnableNFTables is set but the nft command was not found: install the nftables package "
               "(apt-get install nftables), or set EnableNFTables to false in the network config")


@dataclass(frozen=True)
class Chain:
    """One base chain of ours: name, comment, ``type … hook … priority …; policy …;`` and its rules."""

    name: str
    comment: str
    spec: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """One of upstream's tables (``ip flannel-ipv4`` / ``ip6 flannel-ipv6``) with the chains it should hold."""

    family: str
    name: str
    chains: tuple[Chain, ...] = ()

    @property
    def comment(self) -> str:
        """The table's comment (``rules for <name>``), as upstream's nftables mode sets it."""
        return f"rules for {self.name}"

    def render(self) -> str:
        """The table as ``nft -f`` input (the syntax ``nft list`` prints)."""
        out = [f"table {self.family} {self.name} {{", f'\tcomment "{self.comment}"']
        for c in self.chains:
            out += [f"\tchain {c.name} {{", f'\t\tcomment "{c.comment}"', f"\t\t{c.spec}"]
            out += [f"\t\t{r}" for r in c.rules]
            out.append("\t}")
        out.append("}")
        return "\n".join(out)


def masq_chain(network: Network, subnet: Network, fully_random: bool) -> Chain:
    """Upstream addMasqRules(clusterCidr=network, podCidr=subnet) for the network's IP version."""
    fam, _, multicast = FAMILIES[network.version]
    n, s = network, subnet
    masq = "masquerade fully-random" if fully_random else "masquerade"
    return Chain(POSTRTG, POSTRTG_COMMENT, "type nat hook postrouting priority srcnat; policy accept;", (
        f"meta mark {KUBE_PROXY_MARK} return",
        f"{fam} saddr {s} {fam} daddr {n} return",
        f"{fam} saddr {n} {fam} daddr {s} return",
        f"{fam} saddr != {s} {fam} daddr {n} return",
        f"{fam} saddr {n} {fam} daddr != {multicast} {masq}",
        f"{fam} saddr != {n} {fam} daddr {n} {masq}",
    ))


def forward_chain(network: Network) -> Chain:
    """Upstream SetupAndEnsureForwardRules for the network's IP version."""
    fam = FAMILIES[network.version][0]
    return Chain(FORWARD, FORWARD_COMMENT, "type filter hook forward priority filter; policy accept;", (
        f"{fam} saddr {network} accept",
        f"{fam} daddr {network} accept",
    ))


def tables(networks: Iterable[tuple[Network, Network]], ip_masq: bool, forward: bool,
           fully_random: bool) -> list[Table]:
    """Both of upstream's tables (it always creates both), each with the chains of the (Network,
    own subnet) pair of its IP version when one is given — postrtg first, as upstream adds it."""
    by_version = {net.version: (net, sn) for net, sn in networks}
    out = []
    for version, (family, name, _) in FAMILIES.items():
        chains: list[Chain] = []
        if version in by_version:
            net, sn = by_version[version]
            if ip_masq:
                chains.append(masq_chain(net, sn, fully_random))
            if forward:
                chains.append(forward_chain(net))
        out.append(Table(family, name, tuple(chains)))
    return out


def replace_payload(wanted: Iterable[Table]) -> str:
    """One ``nft -f`` transaction replacing each table whole (``add`` first so ``delete`` never
    fails on a missing table)."""
    out = []
    for t in wanted:
        out += [f"add table {t.family} {t.name}", f"delete table {t.family} {t.name}", t.render()]
    return "\n".join(out) + "\n"


def normalise_listing(listing: str) -> list[dict[str, Any]]:
    """``nft -j list table …`` output without the metainfo object and the (ever-changing) handles."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "handle"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    try:
        objs = json.loads(listing)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise RulesError(f"nft printed a listing that is not nftables JSON: {e}") from None
    return [strip(o) for o in objs if "metainfo" not in o]


def listing_matches(objs: list[dict[str, Any]], table: Table) -> bool:
    """Does a normalised listing hold exactly ``table``'s chains, each with its number of rules?
    (A plausibility check of the fingerprint, which nft's own rendering of our rules becomes.)"""
    chains = [o["chain"]["name"] for o in objs if "chain" in o]
    rules: dict[str, int] = {}
    for o in objs:
        if "rule" in o:
            rules[o["rule"].get("chain", "")] = rules.get(o["rule"].get("chain", ""), 0) + 1
    return (chains == [c.name for c in table.chains]
            and all(rules.get(c.name, 0) == len(c.rules) for c in table.chains)
            and sum(rules.values()) == sum(len(c.rules) for c in table.chains))


class NftRules:
    """Install upstream's nftables ruleset and keep it in place (a :class:`~pyflanneld.trafficmngr.TrafficManager`).

    ``network``/``own_subnet``: the IPv4 pair (None for IPv6-only); ``network6``/``own_subnet6``:
    the IPv6 pair when IPv6 is on (its chains go into ``ip6 flannel-ipv6``).

    ``await setup()`` once (after the lease, before subnet.env) — raises :class:`RulesError` when
    nft is missing or the kernel refuses the ruleset (upstream exits then too) —, then
    ``await run()`` as a task (check and repair every ``resync_s`` seconds); ``await close()`` on
    shutdown (the tables stay). ``cleanup``, when given, runs at the end of ``setup()``: the daemon
    passes the removal of the iptables chains (:func:`pyflanneld.iptables.remove_chains`).
    """

    def __init__(self, network: IPv4Network | None, own_subnet: IPv4Network | None, ip_masq: bool,
                 fully_random: bool = True, forward_rules: bool = True, resync_s: float = 5,
                 nft: str = "nft", cleanup: Callable[[], Awaitable[None]] | None = None, *,
                 network6: IPv6Network | None = None, own_subnet6: IPv6Network | None = None) -> None:
        # (Network, own subnet) per IP version in use: IPv4 unless None (IPv6-only), IPv6 when given
        pairs = [(network, own_subnet), (network6, own_subnet6)]
        self.networks: list[tuple[Network, Network]] = [(n, s) for n, s in pairs if n is not None and s is not None]
        self.ip_masq = ip_masq
        self.fully_random = fully_random
        self.forward = forward_rules
        self.resync_s = resync_s
        self.nft = nft
        self.cleanup = cleanup
        self.tables: list[Table] = []
        # what nft lists for each table right after our transaction (its rendering of our rules)
        self._fingerprints: dict[str, list[dict[str, Any]]] = {}
        self._closed = False

    # --- public ---------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Build and apply the tables (one transaction), then run ``cleanup``."""
        if shutil.which(self.nft) is None:
            raise RulesError(MISSING_NFT)
        fully_random = self.fully_random and self.ip_masq and await self._fully_random_supported()
        self.tables = tables(self.networks, self.ip_masq, self.forward, fully_random)
        for net, sn in self.networks:
            log.info("setting up nftables rules", network=str(net), subnet=str(sn), masquerade=self.ip_masq,
                     forward=self.forward, fully_random=fully_random)
        try:
            await self._apply()
        except RulesError as e:
            raise RulesError(f"cannot install the nftables rules: {e}") from None
        if self.cleanup is not None:
            await self.cleanup()

    async def ensure(self) -> bool:
        """Compare every table with its fingerprint; replace them all when one differs.
        Returns True when everything is (now) in place; failures are logged."""
        try:
            drifted = await self._drifted()
            if not drifted:
                return True
            log.warning("nftables rules differ from the expected ones; restoring", tables=drifted)
            await self._apply()
            metrics.KERNEL_REPAIRS.labels("rule").inc(len(drifted))
            return True
        except RulesError as e:
            log.error("failed to ensure nftables rules", error=str(e))
            return False

    async def check(self) -> bool:
        """True when every table lists exactly as right after our last transaction (no change made)."""
        return not await self._drifted()

    async def run(self) -> None:
        """The resync loop: every ``resync_s`` seconds, ``ensure()``. Cancel to stop."""
        if not self.tables or self.resync_s <= 0:
            return
        while not self._closed:
            await asyncio.sleep(self.resync_s)
            await self.ensure()

    async def close(self) -> None:
        """Stop the resync loop (see :meth:`run`); the tables stay."""
        self._closed = True

    # --- internals ------------------------------------------------------------------------------
    async def _fully_random_supported(self) -> bool:
        probe = tables(self.networks, ip_masq=True, forward=False, fully_random=True)
        try:
            await run_command([self.nft, "--check", "-f", "-"], stdin=replace_payload(probe))
            return True
        except RulesError as e:
            log.warning("nftables: random fully unsupported; masquerading without it", error=str(e))
            return False

    async def _drifted(self) -> list[str]:
        """The tables ("ip flannel-ipv4") that are missing or list otherwise than their fingerprint."""
        out = []
        for t in self.tables:
            fp = self._fingerprints.get(t.name)
            try:
                now = normalise_listing(await run_command([self.nft, "-j", "list", "table", t.family, t.name]))
            except RulesError:
                now = None  # the table is gone
            if fp is None or now != fp:
                out.append(f"{t.family} {t.name}")
        return out

    async def _apply(self) -> None:
        """Replace the tables in one transaction, then take each table's fingerprint."""
        self._fingerprints = {}
        await run_command([self.nft, "-f", "-"], stdin=replace_payload(self.tables))
        for t in self.tables:
            objs = normalise_listing(await run_command([self.nft, "-j", "list", "table", t.family, t.name]))
            if listing_matches(objs, t):
                self._fingerprints[t.name] = objs
            else:  # changed by someone in the instant between: repaired at the next check
                log.warning("nftables table changed right after it was written", table=f"{t.family} {t.name}")


async def remove_tables(nft: str = "nft") -> None:
    """Delete upstream's nftables tables (``ip flannel-ipv4``, ``ip6 flannel-ipv6``) if present, in
    one transaction. Used in iptables mode, as upstream does at start. Nothing to do without the
    nft command; failures are logged, never raised."""
    if shutil.which(nft) is None:
        return
    try:
        listing = await run_command([nft, "list", "tables"])
    except RulesError as e:  # e.g. a kernel without nf_tables: then there is nothing of ours either
        log.debug("cannot list nftables tables", error=str(e))
        return
    present = {tuple(ln.split()[1:3]) for ln in listing.splitlines() if ln.startswith("table ")}
    ours = [(fam, name) for fam, name, _ in FAMILIES.values() if (fam, name) in present]
    if not ours:
        return
    try:
        await run_command([nft, "-f", "-"], stdin="".join(f"delete table {f} {n}\n" for f, n in ours))
        log.info("removed flannel's nftables tables (iptables mode is in use)", tables=[f"{f} {n}" for f, n in ours])
    except RulesError as e:
        log.warning("could not remove flannel's nftables tables", error=str(e))
