"""An API outage on command for the lab's fake servers (lab.fakeec2, lab.fakegce): iptables in
the server's namespace refuses (or drops) every connection to its port that is not local."""

from __future__ import annotations

from .netns import Host


class BlockablePort:
    """Mixin for a server listening on ``self.port`` in ``self.host``'s namespace; ``blocked`` is
    "" (reachable), "reject" or "drop"."""

    host: Host
    port: int
    blocked: str = ""

    @property
    def endpoint(self) -> str:
        """The server's URL as the lab's hosts reach it."""
        return f"http://{self.host.address}:{self.port}"

    def _iptables(self, action: str) -> None:
        target = ["DROP"] if self.blocked == "drop" else ["REJECT", "--reject-with", "tcp-reset"]
        self.host.run("iptables", "-w", action, "INPUT", "-p", "tcp", "--dport", str(self.port),
                      "!", "-s", "127.0.0.1", "-j", *target)

    def block(self, drop: bool = False) -> None:
        """API outage as the hosts see it: connections to the port are refused (or, with drop,
        go unanswered: a black hole, clients wait for their timeouts)."""
        if not self.blocked:
            self.blocked = "drop" if drop else "reject"
            self._iptables("-I")

    def unblock(self) -> None:
        """End the outage."""
        if self.blocked:
            self._iptables("-D")
            self.blocked = ""
