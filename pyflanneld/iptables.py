"""Masquerade and forward rules: upstream ``pkg/trafficmngr/iptables``, kept in place better.

Rules are exactly upstream's (chains, comments, order; the list the upstream e2e suite diffs), for
IPv4 with ``iptables`` and, for the IPv6 network, the same chains with ``ip6tables``
(:class:`TrafficRules` with ``iptables="ip6tables"``; the multicast range never masqueraded is
``ff00::/8`` there, upstream MasqIP6Rules):

* ``--ip-masq``: nat ``POSTROUTING -j FLANNEL-POSTRTG`` and in ``FLANNEL-POSTRTG`` the kube-proxy
  mark RETURN, pod↔cluster RETURNs, and two MASQUERADE rules (``--random-fully`` when iptables
  supports it and ``--ip-masq-fully-random-disable`` is not given);
* ``--iptables-forward-rules`` (default on): filter ``FORWARD -j FLANNEL-FWD`` with ``-s``/``-d``
  Network ACCEPT.

Differences from upstream, all on the safe side:

* a chain is (re)written by one ``iptables-restore --noflush -w`` transaction that declares the
  chain (create-or-flush) and appends its rules: never an empty chain in between (upstream #2237);
* the check every ``--iptables-resync`` seconds compares the chain to the expected list — presence,
  order and duplicates (upstream only ``-C``s each rule, #1337) — and that the jump exists once;
* rules of a previous Network/subnet (from the old subnet.env) disappear with the chain rewrite;
  with ``--ip-masq`` now off, the previous masquerade rules are deleted;
* every command is an asyncio subprocess: the event loop never blocks.

Like upstream, rules stay in place when the daemon stops.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import structlog

from . import metrics
from .rulecmd import RulesError, run_command

log = structlog.get_logger()

KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_COMMENT = '-m comment --comment "flanneld masq"'
FWD_COMMENT = '-m comment --comment "flanneld forward"'
POSTRTG = "FLANNEL-POSTRTG"
FWD = "FLANNEL-FWD"
MISSING_IPTABLES = ("{tool} not found: install the iptables package (apt-get install iptables), "
                    "or run without --ip-masq and with --iptables-forward-rules=false")
# IP version → the multicast range that is never masqueraded
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class RuleSet:
    """One chain of ours and the jump to it, in ``iptables -S`` form (also valid restore input)."""

    table: str
    chain: str
    jump: str  # e.g. '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    rules: tuple[str, ...]  # '-A FLANNEL-POSTRTG ...', in order

    @property
    def parent(self) -> str:
        """The built-in chain that jumps to this rule set's chain (``POSTROUTING``, ``FORWARD``)."""
        return self.jump.split()[1]

    def golden(self) -> list[str]:
        """Upstream's rule list as the e2e suite sees it: the jump, then the chain's rules."""
        return [self.jump, *self.rules]


def masq_rules(network: Network, subnet: Network, fully_random: bool) -> RuleSet:
    """Upstream masqRules(cluster_cidr=network, pod_cidr=subnet), or MasqIP6Rules for an IPv6
    network (the same rules with ``ff00::/8``; load them with ip6tables)."""
    n, s = network, subnet
    rf = " --random-fully" if fully_random else ""
    c = MASQ_COMMENT
    return RuleSet("nat", POSTRTG, f"-A POSTROUTING {c} -j {POSTRTG}", (
        f"-A {POSTRTG} -m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN",
        f"-A {POSTRTG} -s {s} -d {n} {c} -j RETURN",
        f"-A {POSTRTG} -s {n} -d {s} {c} -j RETURN",
        f"-A {POSTRTG} ! -s {n} -d {s} {c} -j RETURN",
        f"-A {POSTRTG} -s {n} ! -d {MULTICAST[n.version]} {c} -j MASQUERADE{rf}",
        f"-A {POSTRTG} ! -s {n} -d {n} {c} -j MASQUERADE{rf}",
    ))


def forward_rules(network: Network) -> RuleSet:
    """Upstream forwardRules(network) (IPv4 or IPv6: the same rules)."""
    c = FWD_COMMENT
    return RuleSet("filter", FWD, f"-A FORWARD {c} -j {FWD}", (
        f"-A {FWD} -s {network} {c} -j ACCEPT",
        f"-A {FWD} -d {network} {c} -j ACCEPT",
    ))


@dataclass(frozen=True)
class ChainState:
    """What ``iptables -S`` shows of one of our chains: whether it exists, its rules in order, and how
    many jump rules to it the parent chain holds."""
    exists: bool
    rules: tuple[str, ...]  # '-A CHAIN ...' lines of the chain, in order
    jumps: int  # how often the jump rule is in the parent chain

    def matches(self, rs: RuleSet) -> bool:
        """True when the chain is exactly as ``rs`` wants it: present, the same rules in the same order,
        one jump."""
        return self.exists and self.rules == rs.rules and self.jumps == 1


def chain_state(save: str, rs: RuleSet) -> ChainState:
    """Parse ``iptables -t TABLE -S`` output for one of our chains."""
    lines = [ln.strip() for ln in save.splitlines()]
    prefix = f"-A {rs.chain} "
    return ChainState(
        exists=f"-N {rs.chain}" in lines,
        rules=tuple(ln for ln in lines if ln.startswith(prefix)),
        jumps=sum(1 for ln in lines if ln == rs.jump),
    )


def restore_payload(rs: RuleSet, state: ChainState) -> str:
    """One transaction: declare (create or flush) the chain, refill it, exactly one jump."""
    out = [f"*{rs.table}", f":{rs.chain} - [0:0]"]
    delete_jump = "-D" + rs.jump[2:]
    out += [delete_jump] * max(0, state.jumps - 1)
    if state.jumps == 0:
        out.append(rs.jump)
    out += list(rs.rules)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def delete_payload(table: str, rules: list[str]) -> str:
    """Delete the given '-A CHAIN ...' rules (they must exist) in one transaction."""
    return "\n".join([f"*{table}", *("-D" + r[2:] for r in rules), "COMMIT"]) + "\n"


def supports_random_fully(version_output: str) -> bool:
    """``--random-fully`` needs iptables ≥ 1.6.2 (what go-iptables' HasRandomFully checks)."""
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", version_output)
    return bool(m) and tuple(int(x) for x in m.groups()) >= (1, 6, 2)


class TrafficRules:
    """Install flannel's iptables rules and keep them exactly in place (a :class:`~pyflanneld.trafficmngr.TrafficManager`).

    ``await setup()`` once (after the lease, before subnet.env), then ``await run()`` as a task
    (the resync loop, every ``resync_s`` seconds); ``await close()`` on shutdown (rules stay).
    ``cleanup``, when given, runs at the end of ``setup()``: the daemon passes the removal of the
    nftables mode's tables (:func:`pyflanneld.nftables.remove_tables`).

    IPv6: ``TrafficRules(ipv6_network, own_ipv6_subnet, ..., iptables="ip6tables",
    iptables_restore="ip6tables-restore")`` (previous network/subnet from FLANNEL_IPV6_*); the
    daemon gets both through :func:`pyflanneld.trafficmngr.traffic_manager`.
    """

    def __init__(self, network: Network, own_subnet: Network, ip_masq: bool,
                 fully_random: bool = True, forward_rules: bool = True, resync_s: float = 5,
                 prev_network: Network | None = None, prev_subnet: Network | None = None,
                 iptables: str = "iptables", iptables_restore: str = "iptables-restore",
                 cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        self.network = network
        self.own_subnet = own_subnet
        self.ip_masq = ip_masq
        self.fully_random = fully_random
        self.forward = forward_rules
        self.resync_s = resync_s
        self.prev_network = prev_network
        self.prev_subnet = prev_subnet
        self.iptables = iptables
        self.iptables_restore = iptables_restore
        self.cleanup = cleanup
        self.rulesets: list[RuleSet] = []
        self.available = True
        self._closed = False

    # --- public ---------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Compute the rule sets and apply them (one transaction per table); then ``cleanup()``
        removes what the other rules mode left behind (the nftables tables)."""
        await self._install()
        if self.cleanup is not None:
            await self.cleanup()

    async def _install(self) -> None:
        if shutil.which(self.iptables) is None or shutil.which(self.iptables_restore) is None:
            if self.ip_masq or self.forward:
                log.error(MISSING_IPTABLES.format(tool="ip6tables" if self.network.version == 6 else "iptables"))
            self.available = False
            return
        self.rulesets = []
        if self.ip_masq:
            random_fully = False
            if self.fully_random:
                try:
                    random_fully = supports_random_fully(await run_command([self.iptables, "--version"]))
                except RulesError as e:
                    log.warning("could not read the iptables version", error=str(e))
            if self._network_changed():
                log.info("network or subnet changed; recycling old iptables rules",
                         network=str(self.network), subnet=str(self.own_subnet),
                         prev_network=str(self.prev_network), prev_subnet=str(self.prev_subnet))
            log.info("setting up masking rules", network=str(self.network), subnet=str(self.own_subnet),
                     random_fully=random_fully)
            self.rulesets.append(masq_rules(self.network, self.own_subnet, random_fully))
        elif self.prev_network is not None and self.prev_subnet is not None:
            await self._remove_previous_masq()
        if self.forward:
            log.info("setting up forward rules", network=str(self.network))
            self.rulesets.append(forward_rules(self.network))
        await self.ensure(initial=True)

    async def ensure(self, initial: bool = False) -> bool:
        """Check every chain (content, order, duplicates, the jump) and rewrite the ones that differ.
        Returns True when everything is (now) in place."""
        ok = True
        for rs in self.rulesets:
            try:
                state = chain_state(await self._listing(rs), rs)
                if state.matches(rs):
                    continue
                if not initial:
                    log.warning("iptables rules differ from the expected ones; restoring", tool=self.iptables,
                                table=rs.table, chain=rs.chain, found=len(state.rules), expected=len(rs.rules),
                                jumps=state.jumps)
                await run_command([self.iptables_restore, "--noflush", "-w"], stdin=restore_payload(rs, state))
                if not initial:
                    metrics.KERNEL_REPAIRS.labels("rule").inc()
            except RulesError as e:
                ok = False
                log.error("failed to ensure iptables rules", tool=self.iptables, table=rs.table, chain=rs.chain,
                          error=str(e))
        return ok

    async def check(self) -> bool:
        """True when all our chains are exactly as expected (no change made)."""
        for rs in self.rulesets:
            if not chain_state(await self._listing(rs), rs).matches(rs):
                return False
        return True

    async def run(self) -> None:
        """The resync loop: every ``resync_s`` seconds, ``ensure()``. Cancel to stop."""
        if not self.available or not self.rulesets or self.resync_s <= 0:
            return
        while not self._closed:
            await asyncio.sleep(self.resync_s)
            await self.ensure()

    async def close(self) -> None:
        """Stop the resync loop (see :meth:`run`); the rules stay, as upstream leaves them."""
        self._closed = True

    # --- internals ------------------------------------------------------------------------------
    def _network_changed(self) -> bool:
        return (self.prev_network is not None and self.prev_network != self.network) or \
            (self.prev_subnet is not None and self.prev_subnet != self.own_subnet)

    async def _save(self, table: str, chain: str | None = None) -> str:
        return await run_command([self.iptables, "-w", "-t", table, "-S", *([chain] if chain else [])])

    async def _listing(self, rs: RuleSet) -> str:
        """``-S PARENT`` + ``-S CHAIN`` (not the whole table: kube-proxy's nat table can be huge).
        A failing chain listing means the chain is missing (the messages differ per backend)."""
        parent = await self._save(rs.table, rs.parent)
        try:
            chain = await self._save(rs.table, rs.chain)
        except RulesError:
            chain = ""
        return parent + chain

    async def _remove_previous_masq(self) -> None:
        """--ip-masq is off now: delete the masquerade rules a previous run installed."""
        assert self.prev_network is not None and self.prev_subnet is not None
        try:
            try:
                save = await self._save("nat", POSTRTG)
            except RulesError:
                return  # no chain, nothing to remove
            present = set(save.splitlines())
            candidates = [r for rf in (True, False)
                          for r in masq_rules(self.prev_network, self.prev_subnet, rf).rules]
            old = [r for r in dict.fromkeys(candidates) if r in present]
            if old:
                log.info("removing previous masquerade rules", count=len(old), prev_network=str(self.prev_network))
                await run_command([self.iptables_restore, "--noflush", "-w"], stdin=delete_payload("nat", old))
        except RulesError as e:
            log.error("failed to remove previous masquerade rules", error=str(e))


async def remove_chains(iptables: str = "iptables", iptables_restore: str = "iptables-restore") -> None:
    """Delete everything flannel keeps in iptables: the rules in ``POSTROUTING``/``FORWARD`` that
    carry flannel's comments (our jumps, and the rules upstream ≤ v0.17 put there directly) and the
    ``FLANNEL-POSTRTG``/``FLANNEL-FWD`` chains, one restore transaction per table.

    Used in nftables mode, where upstream (≥ v0.27) clears the iptables manager at start. Nothing
    to do when the iptables tools are absent; failures are logged, never raised. The binaries are
    parameters so that ip6tables can be cleaned the same way.
    """
    if shutil.which(iptables) is None or shutil.which(iptables_restore) is None:
        return
    for table, parent, chain, comment in (("nat", "POSTROUTING", POSTRTG, MASQ_COMMENT),
                                          ("filter", "FORWARD", FWD, FWD_COMMENT)):
        try:
            listing = (await run_command([iptables, "-w", "-t", table, "-S", parent])).splitlines()
            ours = [ln for ln in listing if ln.startswith(f"-A {parent} ") and comment in ln]
            try:
                await run_command([iptables, "-w", "-t", table, "-S", chain])
                exists = True
            except RulesError:
                exists = False
            if not ours and not exists:
                continue
            payload = [f"*{table}", *("-D" + r[2:] for r in ours)]
            if exists:
                payload += [f"-F {chain}", f"-X {chain}"]
            await run_command([iptables_restore, "--noflush", "-w"], stdin="\n".join([*payload, "COMMIT"]) + "\n")
            log.info("removed flannel's iptables rules (nftables mode is in use)", tool=iptables, table=table,
                     chain=chain, rules=len(ours))
        except RulesError as e:
            log.warning("could not remove flannel's iptables rules", tool=iptables, table=table, chain=chain,
                        error=str(e))
