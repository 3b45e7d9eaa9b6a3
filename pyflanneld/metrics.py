"""Prometheus metrics: every series pyflanneld exports is defined here; ``/metrics`` on the health
port (``--healthz-ip``/``--healthz-port``) renders them (:func:`render`).

The names are fixed (dashboards and the alert rules in ``docs/`` rely on them):

* gauges read from the daemon at each scrape (:class:`State`): ``pyflanneld_ready`` (0/1, the
  converger's readiness facts — what /readyz answers), ``pyflanneld_peers{backend}`` (peer leases
  the backend has applied), ``pyflanneld_lease_info{subnet,public_ip,backend}`` (1),
  ``pyflanneld_lease_expiry_timestamp_seconds`` (absent for a reservation: it never expires);
* counters, each increased by one call where the event happens: ``pyflanneld_lease_renewals_total``,
  ``pyflanneld_datastore_errors_total{op}`` (:data:`DATASTORE_OPS`), ``pyflanneld_watch_reconnects_total``,
  ``pyflanneld_kernel_repairs_total{kind}`` (:data:`REPAIR_KINDS`), ``pyflanneld_leases_rejected_total``;
* the histogram ``pyflanneld_peer_programming_seconds``: per peer lease, from the moment its event
  arrived from the datastore to the end of the batch that programmed it (:data:`LEASE_EVENTS`);
* udp backend only, from the forwarder's worker processes: ``pyflanneld_udp_{forwarded,dropped}_
  {packets,bytes}_total{direction}`` (``egress``: TUN → UDP, leaving this host; ``ingress``: UDP →
  TUN) — see :func:`forwarder_families`.

Memory: only prometheus_client's metric classes and registry are loaded: +0.15 MiB when imported
after the rest of the daemon, +0.55 MiB RSS of a running vxlan daemon after scrapes (60.2 → 60.8
MiB, three daemons each; imported early, its objects keep allocator arenas in use). Its package
``__init__`` is not run (:mod:`pyflanneld.lean_imports`): it imports ``exposition``, whose HTTP
servers pull in http.server, email, urllib.request and wsgiref (+1.8 MiB more). So the text format
(0.0.4) is written here by :func:`text_format`, byte for byte what
``prometheus_client.exposition.generate_latest`` writes for these series (tests compare the two).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.metrics import Counter, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DATASTORE_OPS = ("acquire", "renew", "watch", "update", "config")
REPAIR_KINDS = ("route", "neigh", "fdb", "device", "rule")
PROGRAMMING_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

disable_created_metrics()  # no *_created series: nothing here needs them, and they double the output
REGISTRY = CollectorRegistry(auto_describe=False)

LEASE_RENEWALS = Counter(
    "pyflanneld_lease_renewals", "Renewals of this host's subnet lease written to the datastore.",
    registry=REGISTRY)
DATASTORE_ERRORS = Counter(
    "pyflanneld_datastore_errors", "Datastore operations that failed and are retried, by operation "
    "(acquire: getting a lease; renew; watch: the lease watch or its relist; update: new lease data "
    "after an interface change; config: reading the network config).", ["op"], registry=REGISTRY)
WATCH_RECONNECTS = Counter(
    "pyflanneld_watch_reconnects", "Times the datastore watch broke and was set up again (with a relist).",
    registry=REGISTRY)
KERNEL_REPAIRS = Counter(
    "pyflanneld_kernel_repairs", "Kernel entries put back or corrected after they drifted from the leases "
    "(deleted by hand, device gone, rules flushed), by kind.", ["kind"], registry=REGISTRY)
LEASES_REJECTED = Counter(
    "pyflanneld_leases_rejected", "Lease entries in the datastore refused by the validation gate "
    "(one per entry and change; /readyz lists the current ones).", registry=REGISTRY)
PEER_PROGRAMMING = Histogram(
    "pyflanneld_peer_programming_seconds", "From a peer lease's event arriving to its kernel entries "
    "being in place (the end of the batch that programmed it).", buckets=PROGRAMMING_BUCKETS_S,
    registry=REGISTRY)
for _op in DATASTORE_OPS:  # every series exists from the start (0), so rates and alerts see it
    DATASTORE_ERRORS.labels(_op)
for _kind in REPAIR_KINDS:
    KERNEL_REPAIRS.labels(_kind)


class ProgrammingClock:
    """When each peer lease's event arrived, until the batch that programmed it ended.

    The manager calls :meth:`arrived` per put event; the converger :meth:`take`s the times at the
    start of a batch (everything that arrived before is in the batch) and calls :meth:`programmed`
    with the keys it handed the backend once the backend is done. Times of events that changed
    nothing programmable (a rejected or unchanged lease) are dropped with the batch.
    """

    def __init__(self) -> None:
        self._arrived: dict[str, float] = {}

    def arrived(self, key: str) -> None:
        """A lease event for ``key`` arrived (the first one since the last batch counts)."""
        self._arrived.setdefault(key, time.monotonic())

    def take(self) -> dict[str, float]:
        """The arrival times (key → monotonic seconds) pending now; the clock starts afresh."""
        taken, self._arrived = self._arrived, {}
        return taken

    def programmed(self, arrived: Mapping[str, float], keys: Iterable[str]) -> None:
        """The batch that ``arrived`` was taken for programmed ``keys``: one observation each."""
        now = time.monotonic()
        for key in keys:
            t = arrived.get(key)
            if t is not None:
                PEER_PROGRAMMING.observe(now - t)


LEASE_EVENTS = ProgrammingClock()


@dataclass(frozen=True)
class State:
    """The daemon's state at a scrape. ``backend``: the backend type ("" before the config is
    read); ``subnet``/``public_ip``: the own lease ("" without one); ``lease_expiry_s``: unix time
    the lease runs out (None: no lease, or a reservation)."""

    ready: bool
    backend: str = ""
    peers: int = 0
    subnet: str = ""
    public_ip: str = ""
    lease_expiry_s: float | None = None


def state_families(s: State) -> Iterator[Metric]:
    """The gauges of :class:`State`."""
    yield GaugeMetricFamily("pyflanneld_ready", "1 when every readiness fact holds (what /readyz says), else 0.",
                            value=1 if s.ready else 0)
    peers = GaugeMetricFamily("pyflanneld_peers", "Peer leases the backend has applied.", labels=["backend"])
    if s.backend:
        peers.add_metric([s.backend], s.peers)
    yield peers
    info = GaugeMetricFamily("pyflanneld_lease_info", "This host's subnet lease (always 1).",
                             labels=["subnet", "public_ip", "backend"])
    if s.subnet:
        info.add_metric([s.subnet, s.public_ip, s.backend], 1)
    yield info
    expiry = GaugeMetricFamily("pyflanneld_lease_expiry_timestamp_seconds",
                               "Unix time this host's lease expires unless renewed (absent for a reservation).")
    if s.lease_expiry_s is not None:
        expiry.add_metric([], s.lease_expiry_s)
    yield expiry


# (series, help, worker counter for egress, worker counter for ingress): see pyflanneld.udpfwd.worker.Stats
_FORWARDER_SERIES = (
    ("pyflanneld_udp_forwarded_packets", "Packets the udp forwarder forwarded.", "udp_tx", "tun_tx"),
    ("pyflanneld_udp_forwarded_bytes", "Bytes (inner IP packets) the udp forwarder forwarded.", "tx_bytes", "rx_bytes"),
    ("pyflanneld_udp_dropped_packets", "Packets the udp forwarder dropped (malformed, no route, TTL "
     "exceeded, refused by the kernel).", "tx_drop", "rx_drop"),
    ("pyflanneld_udp_dropped_bytes", "Bytes of the packets the udp forwarder dropped.", "tx_drop_bytes",
     "rx_drop_bytes"),
)


def forwarder_families(counters: Mapping[str, int]) -> Iterator[Metric]:
    """The udp forwarder's counters (its workers' :class:`~pyflanneld.udpfwd.worker.Stats`
    summed); nothing when ``counters`` is empty (no userspace forwarder)."""
    if not counters:
        return
    for name, doc, egress, ingress in _FORWARDER_SERIES:
        fam = CounterMetricFamily(name, doc + " direction: egress = TUN to UDP, ingress = UDP to TUN.",
                                  labels=["direction"])
        fam.add_metric(["egress"], counters.get(egress, 0))
        fam.add_metric(["ingress"], counters.get(ingress, 0))
        yield fam


def render(state: State, forwarder: Mapping[str, int] | None = None) -> bytes:
    """The body of ``/metrics``: the counters and histogram above, the gauges of ``state``, and the
    udp forwarder's counters (``forwarder``, see :func:`forwarder_families`)."""
    return text_format([*REGISTRY.collect(), *state_families(state), *forwarder_families(forwarder or {})])


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def text_format(families: Iterable[Metric]) -> bytes:
    """Prometheus text format 0.0.4 of counter, gauge and histogram families with valid (legacy)
    names — what ``prometheus_client.exposition.generate_latest`` writes for them."""
    out = []
    for m in families:
        name = m.name + "_total" if m.type == "counter" else m.name
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {m.type}\n")
        for s in m.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                       else f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode()
