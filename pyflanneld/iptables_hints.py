"""Warnings about iptables state outside pyflanneld's own chains that breaks pod traffic.

Two causes on the host, not in pyflanneld, that upstream flanneld leaves the operator to find:

* the FORWARD chain's policy is DROP (Docker sets it) while ``--iptables-forward-rules=false``:
  packets between pods on different hosts are dropped unless the operator's own rules accept the
  Network. In nftables mode (``EnableNFTables``) even with forward rules: an accept in flannel's
  table ``flannel-ipv4`` does not stop iptables' own FORWARD chain (another base chain on the same
  hook) from dropping the packet;
* flannel rules (FLANNEL-POSTRTG, FLANNEL-FWD, the "flanneld masq"/"flanneld forward" rules) in
  the *other* iptables backend than the one ``iptables`` runs — legacy vs nf_tables, e.g. left by a
  flanneld image built with the other one. The kernel applies both sets, so stale rules there still
  masquerade or forward pod traffic, and ``iptables -S`` does not show them. (The rules of the
  backend ``iptables`` runs are pyflanneld's own, or, in nftables mode, removed at start.)

Each finding is one warning line naming the cause and the fix, said once (again only after it went
away and came back). The check runs at start and every ``CHECK_INTERVAL_S``: Docker, which sets
the policy, usually starts after pyflanneld. Only listings are run (``iptables -S FORWARD``,
``iptables-<other>-save``); nothing is changed.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from ipaddress import IPv4Network

import structlog

from .iptables import FWD, POSTRTG
from .rulecmd import RulesError, run_command

log = structlog.get_logger()

CHECK_INTERVAL_S = 60.0
MARKERS = (POSTRTG, FWD, "flanneld masq", "flanneld forward")
OTHER_SAVE = {"nf_tables": ("iptables-legacy", "iptables-legacy-save"),
              "legacy": ("iptables-nft", "iptables-nft-save")}
_CHAIN_RE = re.compile(r"^(?::|-A |-I |-N )(\S+)")


def iptables_flavor(version_output: str) -> str:
    """``iptables --version`` → "nf_tables", "legacy" or "" (iptables < 1.8 has only legacy)."""
    m = re.search(r"\((nf_tables|legacy)\)", version_output)
    return m[1] if m else ""


def flannel_chains(save_output: str) -> list[str]:
    """``table/CHAIN`` of every chain in ``iptables-save`` output that holds or is a flannel rule."""
    found, table = set(), "?"
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif any(marker in line for marker in MARKERS):
            m = _CHAIN_RE.match(line)
            if m:
                found.add(f"{table}/{m[1]}")
    return sorted(found)


def forward_drops(forward_listing: str, network: IPv4Network) -> bool:
    """Does ``iptables -S FORWARD`` show policy DROP with no rule accepting the Network (or jumping
    to FLANNEL-FWD, left by an earlier run)?"""
    lines = [ln.strip() for ln in forward_listing.splitlines()]
    if "-P FORWARD DROP" not in lines:
        return False
    return not any(ln.startswith("-A FORWARD") and (str(network) in ln.split() or f"-j {FWD}" in ln)
                   for ln in lines)


class IptablesHints:
    """Check the host's iptables for the causes above and warn once per finding.

    ``await check()`` runs the checks once; ``await run()`` checks at once and then every
    ``interval_s`` seconds until cancelled. A failing listing is a debug line, never an error.
    """

    def __init__(self, network: IPv4Network, forward_rules: bool, nftables: bool = False,
                 iptables: str = "iptables", interval_s: float = CHECK_INTERVAL_S) -> None:
        self.network = network
        self.forward_rules = forward_rules
        self.nftables = nftables
        self.iptables = iptables
        self.interval_s = interval_s
        self._flavor: str | None = None
        self._warned: set[str] = set()

    async def run(self) -> None:
        """Check now and then every ``interval_s`` seconds, until cancelled. Never raises."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def check(self) -> None:
        """Run the checks once and warn (once per finding) about what would break the overlay: a FORWARD
        policy DROP that nothing opens for the Network, flannel chains left in the other iptables
        flavour (legacy vs nft). A listing that fails is a debug line."""
        if shutil.which(self.iptables) is None:
            return
        findings: dict[str, tuple[str, dict[str, str]]] = {}
        try:
            if self.nftables or not self.forward_rules:
                listing = await run_command([self.iptables, "-w", "-t", "filter", "-S", "FORWARD"])
                if forward_drops(listing, self.network):
                    findings["forward-drop"] = (self._forward_drop_hint(), {"network": str(self.network)})
            if self._flavor is None:
                self._flavor = iptables_flavor(await run_command([self.iptables, "--version"]))
            other = OTHER_SAVE.get(self._flavor)
            if other is not None and shutil.which(other[1]) is not None:
                chains = flannel_chains(await run_command([other[1]]))
                if chains:
                    ours = "nftables (EnableNFTables)" if self.nftables else \
                        "iptables-nft" if self._flavor == "nf_tables" else "iptables-legacy"
                    findings[f"other:{','.join(chains)}"] = (
                        f"flannel rules found in {other[0]}, but pyflanneld uses {ours}: the kernel applies "
                        f"both, so these stale rules still act on pod traffic; remove them, e.g. "
                        f"`{other[1]} | grep -v -e FLANNEL -e flanneld | {other[0]}-restore`",
                        {"chains": " ".join(chains)})
        except RulesError as e:
            log.debug("iptables check skipped", error=str(e))
            return
        for key, (message, fields) in findings.items():
            if key not in self._warned:
                log.warning(message, **fields)
        self._warned = set(findings)

    def _forward_drop_hint(self) -> str:
        n = self.network
        fix = f"`iptables -I FORWARD -s {n} -j ACCEPT; iptables -I FORWARD -d {n} -j ACCEPT`"
        if self.nftables:
            return ("the iptables FORWARD chain's policy is DROP: in nftables mode flannel's accept rules "
                    "(table flannel-ipv4) cannot override a drop in iptables' own table, so packets between "
                    f"pods on different hosts are dropped; accept the Network there too, e.g. {fix}")
        return ("the FORWARD chain's policy is DROP and --iptables-forward-rules is off: packets between "
                "pods on different hosts are dropped unless your own rules accept the Network; set "
                f"--iptables-forward-rules=true or accept it yourself, e.g. {fix}")
