"""gce: this host's subnet as a route in the GCE network (upstream ``backend/gce``, ≤ v0.19).

A pass (the first in ``start``, after the lease is ours; then periodically and on failure, see
:mod:`.cloudhttp`):

1. Metadata server (``Metadata-Flavor: Google``, first pass only): project id, zone, instance
   name, the network of the NIC holding the interface address (NIC 0 otherwise) with its
   project, and the service account's token. A network path naming another project
   (``projects/<host>/networks/<net>``) is a Shared VPC: the network and its routes live in that
   host project, and the route's next hop is this instance's address (``nextHopIp``): a route
   can name only an instance of its own project.
2. Compute API (Google's client, static discovery document): ``networks.get`` (once),
   ``instances.get`` (until the instance can forward IP), ``routes.get`` of
   ``flannel-<subnet with . and / as ->`` (e.g. ``flannel-10-1-5-0-24``), upstream's name.
3. In another network → another cluster's (same project, same Network range): left alone, one
   error line naming both networks. Already pointing at this instance → nothing to do. Pointing
   elsewhere → ``routes.delete``. Missing (or just deleted) → ``routes.insert`` {destRange =
   subnet, network, next hop, priority 1000}. Every operation is waited for
   (``globalOperations.get`` every second, up to 100 s).
4. Stale routes: ``routes.list``; a ``flannel-*`` route in our network, its destination inside
   Network, whose next-hop instance GCE flags as gone (``NEXT_HOP_INSTANCE_NOT_FOUND``) and
   ``instances.get`` answers 404 for, is deleted (a deleted node's; it held a ROUTES quota slot).
5. An instance without IP forwarding gets its route, and one error line until it can forward.

Settings: ``PYFLANNELD_GCE_API_ENDPOINT`` / ``Backend.Endpoint`` (root URL of the Compute API,
``compute/v1/`` is appended; default ``https://compute.googleapis.com/``),
``PYFLANNELD_GCE_METADATA_URL`` / ``Backend.MetadataEndpoint`` (default
``http://169.254.169.254``). Nothing is programmed in the kernel; the route stays on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network
from typing import Any

import httpx
import structlog

from ..oneline import one_line
from ..subnet.lease import Lease
from .base import BackendContext, in_daemon_thread, register_backend
from .cloudhttp import (
    METADATA_TIMEOUT,
    CloudError,
    CloudRouteBackend,
    MetadataSession,
    http_error,
    require,
    setting,
)

log = structlog.get_logger()

DEFAULT_METADATA = "http://169.254.169.254"
DEFAULT_API = "https://compute.googleapis.com/"
OP_POLL_INTERVAL = 1.0
OP_POLLS = 100
FLAVOR = {"Metadata-Flavor": "Google"}
MAX_ROUTE_PAGES = 100  # a project holds far fewer routes; a looping page token must not loop us
INSTANCE_URL = re.compile(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$")
SCOPE_HINT = ("the instance's service account lacks the compute-rw scope "
              "(https://www.googleapis.com/auth/compute); stop the instance and run "
              "'gcloud compute instances set-service-account INSTANCE --scopes compute-rw'")


def route_name(subnet: IPv4Network) -> str:
    """flannel-10-1-5-0-24 for 10.1.5.0/24 (upstream's formatRouteName)."""
    return "flannel-" + str(subnet).replace(".", "-").replace("/", "-")


def network_of(path: str, project: str, number: str) -> tuple[str, str]:
    """(project, network name) of a metadata network path ``projects/<id or number>/networks/<n>``;
    our own project (by id) when the path names ours (by id or number) or no project at all."""
    m = re.fullmatch(r"projects/([^/]+)/networks/([^/]+)", path.strip("/"))
    if not m:
        return project, path.rsplit("/", 1)[-1]
    owner = m.group(1)
    return (project if owner in (project, number) else owner), m.group(2)


def project_of(link: str | None) -> str:
    """The project of a resource URL (".../projects/<p>/..."), "" when there is none."""
    m = re.search(r"projects/([^/]+)/", link or "")
    return m.group(1) if m else ""


def short_name(link: str | None) -> str:
    """The last part of a resource URL ("net-a" for ".../global/networks/net-a")."""
    return (link or "?").rstrip("/").rsplit("/", 1)[-1]


def same_resource(a: str | None, b: str | None) -> bool:
    """Two resource URLs name the same resource (hosts differ: www.googleapis.com vs compute.googleapis.com)."""
    if not a or not b or not isinstance(a, str) or not isinstance(b, str):
        return False

    def tail(u: str) -> str:
        i = u.find("projects/")
        return u[i:] if i >= 0 else u

    return tail(a) == tail(b)


class GceApiError(CloudError):
    """A Compute API error answer: HTTP status and Google's first error reason (as .code)."""

    def __init__(self, message: str, status: int, retryable: bool = False, code: str = ""):
        super().__init__(message, retryable, code)
        self.status = status


@register_backend
class GceBackend(CloudRouteBackend):
    """The gce backend (upstream ``pkg/backend/gce``): a GCE route ``flannel-<subnet>`` for the own
    subnet to this instance (Shared VPC: in the network's host project); see the module docstring."""
    type_name = "gce"
    cloud_name = "GCE"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.api_base = DEFAULT_API + "compute/v1/"
        self.custom_api = False
        self.metadata_url = DEFAULT_METADATA
        self.project = self.zone = self.instance = self.network_name = ""
        self.network_path = ""  # the NIC's network as the metadata server names it: projects/<p>/networks/<n>
        self.network_project = ""  # the project in that path (a Shared VPC's host project, else ours)
        self.route_project = ""  # where routes and their operations live: the network's project
        self.net: dict | None = None  # networks.get of our network (kept once read)
        self.inst: dict | None = None  # instances.get of this instance (kept once it can forward IP)
        self.cleanup_error = ""  # the last stale-route clean-up failure (logged once per change)
        self._svc: Any = None

    def check_dependencies(self) -> None:
        ctx = self.ctx
        api = setting(ctx, "Endpoint", "PYFLANNELD_GCE_API_ENDPOINT", "")
        if api:
            api = api.rstrip("/") + "/"
            self.api_base = api if api.endswith("/compute/v1/") else api + "compute/v1/"
            self.custom_api = True
        self.metadata_url = setting(ctx, "MetadataEndpoint", "PYFLANNELD_GCE_METADATA_URL", DEFAULT_METADATA).rstrip("/")
        for module, package in (("googleapiclient.discovery", "google-api-python-client"),
                                ("google_auth_httplib2", "google-auth-httplib2"), ("httplib2", "httplib2")):
            require(module, self.type_name, package)
        # The client logs each retry/error itself; ours is the one line per failure.
        logging.getLogger("googleapiclient").setLevel(logging.ERROR)

    # --- metadata server -----------------------------------------------------------------------
    def _meta_url(self, path: str) -> str:
        return f"{self.metadata_url}/computeMetadata/v1/{path}"

    async def read_metadata(self) -> None:
        """Project, zone, instance name and the network of the NIC holding the interface address
        (NIC 0 if none does) from the metadata server. The network path names the network's project
        (``projects/<host>/networks/<net>``): another project than ours is a Shared VPC host project,
        where the network and so its routes live."""
        hint = ": is this a GCE instance? (PYFLANNELD_GCE_METADATA_URL sets another address)"
        async with MetadataSession("GCE metadata server", hint) as md:

            async def get(path: str, missing_ok: bool = False) -> str:
                r = await md.request("GET", self._meta_url(path), FLAVOR)
                if r.status_code == 404 and missing_ok:
                    return ""
                if r.status_code != 200:
                    raise CloudError(f"GCE metadata server: GET {self._meta_url(path)} returned HTTP {r.status_code}",
                                     retryable=r.status_code >= 500)
                if r.headers.get("Metadata-Flavor") != "Google":
                    raise CloudError(f"{self.metadata_url} is not a GCE metadata server (no Metadata-Flavor: Google "
                                     "in its answer)")
                return r.text.strip()

            project = await get("project/project-id")
            number = await get("project/numeric-project-id", missing_ok=True)
            zone = (await get("instance/zone")).rsplit("/", 1)[-1]
            name = await get("instance/name", missing_ok=True) or (await get("instance/hostname")).split(".", 1)[0]
            nic = "0"
            for entry in (await get("instance/network-interfaces/", missing_ok=True)).split():
                idx = entry.strip("/")
                if await get(f"instance/network-interfaces/{idx}/ip", missing_ok=True) == str(self.ctx.ext.ip):
                    nic = idx
                    break
            path = await get(f"instance/network-interfaces/{nic}/network")
        network_project, network = network_of(path, project, number)
        self.project, self.zone, self.instance, self.network_name = project, zone, name, network
        self.network_path, self.network_project = path, network_project
        log.info("GCE instance identity", project=project, zone=zone, instance=name, network=network,
                 **({"shared_vpc_host_project": network_project} if network_project != project else {}))

    def fetch_token(self) -> tuple[str, int]:
        """The default service account's access token (blocking; called by the credentials)."""
        url = self._meta_url("instance/service-accounts/default/token")
        try:
            r = httpx.get(url, headers=FLAVOR, timeout=METADATA_TIMEOUT, trust_env=False)
        except httpx.HTTPError as e:
            raise http_error("GCE metadata server", url, e) from None
        if r.status_code == 404:
            raise CloudError("the instance has no service account: attach one with the compute-rw scope "
                             "(gcloud compute instances set-service-account INSTANCE --scopes compute-rw)")
        if r.status_code != 200:
            raise CloudError(f"GCE metadata server: token request returned HTTP {r.status_code}",
                             retryable=r.status_code >= 500)
        try:
            data = r.json()
            return data["access_token"], int(data.get("expires_in", 300))
        except (ValueError, KeyError, TypeError, AttributeError):  # not a JSON object with a token
            raise CloudError(f"GCE metadata server: unexpected token answer from {url}") from None

    # --- Compute API -----------------------------------------------------------------------------
    def _service(self) -> Any:
        if self._svc is None:
            import google_auth_httplib2
            import httplib2
            from google.auth import credentials as ga_credentials
            from googleapiclient import discovery

            fetch = self.fetch_token

            class MetadataToken(ga_credentials.Credentials):
                def refresh(self, request: Any) -> None:
                    token, expires_in = fetch()
                    self.token = token
                    self.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=max(0, expires_in - 60))

            http = google_auth_httplib2.AuthorizedHttp(MetadataToken(), http=httplib2.Http(timeout=10))
            opts = {"api_endpoint": self.api_base} if self.custom_api else None
            self._svc = discovery.build("compute", "v1", http=http, static_discovery=True, cache_discovery=False,
                                        client_options=opts)
        return self._svc

    def _execute(self, label: str, make: Any) -> dict:
        import httplib2
        from googleapiclient.errors import HttpError

        try:
            return make(self._service()).execute(num_retries=1)
        except HttpError as e:
            raise self.explain(label, e) from None
        except CloudError:
            raise
        except (OSError, httplib2.HttpLib2Error) as e:
            raise http_error("Compute API", self.api_base, e) from None

    async def api(self, label: str, make: Any) -> dict:
        """One Compute API call off the loop; make(service) builds the request. Errors → CloudError."""
        return await in_daemon_thread(self._execute, label, make, name="gce-api")

    def quota_error(self, code: str, message: str) -> CloudError:
        """The CloudError (not retried soon, ``code`` kept) for a project at its ROUTES quota: the API's
        ``code`` and ``message`` verbatim, and the fix."""
        return CloudError(f"route quota exceeded ({code}: {message}): project {self.route_project or self.project} can "
                          "hold no more routes; ask for a higher ROUTES quota or delete unused routes", code=code)

    def explain(self, label: str, e: Any) -> GceApiError:
        """A Compute API error answer as one line with the operator's fix."""
        status = int(getattr(e.resp, "status", 0) or 0)
        try:
            err = json.loads(e.content).get("error")
        except (ValueError, AttributeError, TypeError):
            err = None
        if not isinstance(err, dict):  # not Google's error shape (e.g. OAuth's {"error": "invalid_token"})
            err = {"message": err} if isinstance(err, str) else {}
        message = one_line(err.get("message") or getattr(e, "reason", "") or "")
        errors = err.get("errors")
        reasons = [x["reason"] for x in errors if isinstance(x, dict) and isinstance(x.get("reason"), str)] \
            if isinstance(errors, list) else []
        reason = reasons[0] if reasons else ""
        transient = False
        if status == 403 and "insufficientPermissions" in reasons:
            text = f"{label} forbidden (403 insufficientPermissions: {message}): {SCOPE_HINT}"
        elif status == 403 and "quotaExceeded" in reasons:
            text = str(self.quota_error("quotaExceeded", message))
        elif status == 429 or status >= 500 or {"rateLimitExceeded", "userRateLimitExceeded"} & set(reasons):
            text, transient = f"{label} failed ({status} {reason}: {message})", True
        elif status == 400 and "resourceNotReady" in reasons:
            # another operation on the same resource is still running: GCE's "try again in a moment"
            text, transient = f"{label}: not ready yet (400 resourceNotReady: {message})", True
        elif status == 403 and "accessNotConfigured" in reasons:
            text = (f"{label} forbidden (403 accessNotConfigured: {message}): enable the Compute Engine API for "
                    f"project {self.project}")
        elif status == 403:
            text = (f"{label} forbidden (403 {reason}: {message}): grant the instance's service account the "
                    "permission (e.g. roles/compute.networkAdmin)")
        elif status == 401:
            text = f"{label}: the Compute API rejected the service account token (401 {reason}: {message})"
        elif status == 409:
            text, transient = f"{label}: conflict (409 {reason}: {message})", True
        else:
            text = f"{label} failed ({status} {reason}: {message})"
        return GceApiError(text, status, transient, reason)

    async def wait_operation(self, label: str, op: dict) -> None:
        """Poll the global operation ``op`` (the API's dict) every OP_POLL_INTERVAL seconds until DONE,
        at most OP_POLLS times (upstream's PollForOp); ``label`` names the step in errors, warnings are
        logged. Raises CloudError: retryable when it does not finish or is RESOURCE_NOT_READY,
        :meth:`quota_error` for QUOTA_EXCEEDED, the operation's error otherwise."""
        name = op.get("name", "")
        for _ in range(OP_POLLS):
            if op.get("status") == "DONE":
                break
            await asyncio.sleep(OP_POLL_INTERVAL)
            op = await self.api("compute.globalOperations.get",
                                lambda s: s.globalOperations().get(project=self.route_project, operation=name))
        else:
            raise CloudError(f"{label}: operation {name} not done after {int(OP_POLLS * OP_POLL_INTERVAL)} s",
                             retryable=True)
        error = op.get("error")
        errors = error.get("errors") if isinstance(error, dict) else error
        if errors and not (isinstance(errors, list) and isinstance(errors[0], dict)):  # not Google's shape
            raise CloudError(f"{label}: operation {name} failed ({one_line(json.dumps(error))[:200]})")
        if errors:
            code, message = str(errors[0].get("code", "?")), one_line(errors[0].get("message", ""))
            if code == "QUOTA_EXCEEDED":
                raise self.quota_error(code, message)
            raise CloudError(f"{label}: operation {name} failed ({code}: {message})",
                             retryable=code in ("RESOURCE_NOT_READY", "resourceNotReady"), code=code)
        warnings = op.get("warnings")
        for w in warnings if isinstance(warnings, list) else []:
            if isinstance(w, dict):
                log.warning("GCE operation warning", operation=name, code=w.get("code"), message=w.get("message"))

    # --- the sequence ------------------------------------------------------------------------
    async def fetch_network(self) -> dict:
        """Our network (networks.get in its project, a Shared VPC's host project too), read once.
        Sets route_project from its selfLink. A 404 gets a hint about the metadata's network path."""
        if self.net is None:
            p, n = self.network_project, self.network_name
            try:
                net = await self.api("compute.networks.get", lambda s: s.networks().get(project=p, network=n))
            except GceApiError as e:
                if e.status != 404:
                    raise
                if p != self.project:
                    hint = (f"the metadata server puts this instance's NIC on {self.network_path}, a Shared VPC "
                            f"network of host project {p}, where its routes live: check that the network exists "
                            "there and grant the instance's service account roles/compute.networkAdmin on the host "
                            "project")
                else:
                    hint = (f"the metadata server puts this instance's NIC on {self.network_path or n}; check "
                            f"'gcloud compute networks describe {n} --project {p}'; a Shared VPC network shows its "
                            "host project in that path")
                raise GceApiError(f"{e}: {hint}", e.status, e.retryable, e.code) from None
            self.net, self.route_project = net, project_of(net.get("selfLink")) or p
            if self.route_project != self.project:
                log.info("GCE Shared VPC: routes go to the host project, with our address as next hop",
                         host_project=self.route_project, network=n)
        return self.net

    async def instance_resource(self) -> dict:
        """This instance (instances.get), read again on each pass until it can forward IP."""
        if self.inst is None or not self.inst.get("canIpForward", False):
            p, z, i = self.project, self.zone, self.instance
            inst = await self.api("compute.instances.get", lambda s: s.instances().get(project=p, zone=z, instance=i))
            self.inst = inst
        return self.inst

    @property
    def shared_vpc(self) -> bool:
        """True when the network lives in another project than the instance (a Shared VPC host project)."""
        return bool(self.route_project) and self.route_project != self.project

    def next_hop(self, inst: dict, net: dict) -> dict[str, str]:
        """Our next hop: this instance by URL; in a Shared VPC (routes in the host project, which
        cannot name another project's instance) the instance's address in that network."""
        if not self.shared_vpc:
            return {"nextHopInstance": inst["selfLink"]}
        for nic in inst.get("networkInterfaces") or []:
            if same_resource(nic.get("network"), net.get("selfLink")) and nic.get("networkIP"):
                return {"nextHopIp": nic["networkIP"]}
        return {"nextHopIp": str(self.ctx.ext.ip)}

    def points_here(self, route: dict, hop: dict[str, str]) -> bool:
        """True when ``route`` (an API route dict) already sends traffic where ``hop`` says
        (``nextHopInstance`` or ``nextHopIp``)."""
        if "nextHopInstance" in hop:
            return same_resource(route.get("nextHopInstance"), hop["nextHopInstance"])
        return route.get("nextHopIp") == hop["nextHopIp"] and not route.get("nextHopInstance")

    async def ensure_route(self, lease: Lease) -> None:
        """One pass: our route flannel-<subnet> in our network to this instance (inserted when
        missing, replaced when it points elsewhere; a route of that name in another network is
        another cluster's and is left alone), then stale-route clean-up, then the IP-forwarding check."""
        if not self.instance:
            await self.read_metadata()
        subnet = lease.subnet
        net = await self.fetch_network()
        inst = await self.instance_resource()
        p, name = self.route_project, route_name(subnet)
        hop = self.next_hop(inst, net)
        try:
            route: dict | None = await self.api("compute.routes.get", lambda s: s.routes().get(project=p, route=name))
        except GceApiError as e:
            if e.status != 404:
                raise
            route = None
        our_net = short_name(net.get("selfLink"))
        if route is not None and not same_resource(route.get("network"), net.get("selfLink")):
            theirs = short_name(route.get("network"))
            raise CloudError(f"route {name} for {subnet} belongs to network {theirs}, not to ours ({our_net}): another "
                             f"flannel cluster in project {p} uses the same Network range, and GCE route names are "
                             "unique per project; pyflanneld leaves that route alone: give the clusters "
                             "non-overlapping Network ranges (or separate projects)")
        if route is not None and self.points_here(route, hop) and route.get("destRange") == str(subnet):
            if our_net not in self.seen:
                log.info("route already in place", route=name, subnet=str(subnet), instance=self.instance)
            self.route_seen(our_net)
        else:
            await self.put_route(name, subnet, route, net, hop)
        await self.drop_stale_routes(net, name)
        if not inst.get("canIpForward", False):
            raise CloudError(f"instance {self.instance} cannot forward IP packets (canIpForward is false): GCE drops "
                             f"traffic for {subnet} routed to it; enable --can-ip-forward (at instance creation, or "
                             "update the instance while it is stopped)")

    async def put_route(self, name: str, subnet: IPv4Network, route: dict | None, net: dict,
                        hop: dict[str, str]) -> None:
        """Insert our route, deleting first the one of that name that points elsewhere (`route`)."""
        p, network = self.route_project, short_name(net.get("selfLink"))
        previous = route and (route.get("nextHopInstance") or route.get("nextHopIp") or route.get("nextHopGateway") or "?")
        state = (f"route {name} missing in network {network}" if route is None
                 else f"route {name} in network {network} points at {previous}")
        self.route_lost(network, state, route=name, subnet=str(subnet))
        try:
            if route is not None:
                log.info("deleting conflicting route", route=name, previous=previous)
                op = await self.api("compute.routes.delete", lambda s: s.routes().delete(project=p, route=name))
                await self.wait_operation("compute.routes.delete", op)
            body = {"name": name, "destRange": str(subnet), "network": net["selfLink"], **hop, "priority": 1000,
                    "tags": [], "description": "flannel subnet route (pyflanneld)"}
            log.info("inserting route", route=name, subnet=str(subnet), instance=self.instance)
            op = await self.api("compute.routes.insert", lambda s: s.routes().insert(project=p, body=body))
            await self.wait_operation("compute.routes.insert", op)
        except CloudError as e:
            raise e.within(state) from None
        self.route_seen(network)
        log.info("route created", route=name, subnet=str(subnet), instance=self.instance)

    async def list_routes(self) -> list[dict]:
        """Every route of the route project (routes.list, up to MAX_ROUTE_PAGES pages of 500)."""
        p, out, token = self.route_project, [], None
        for _ in range(MAX_ROUTE_PAGES):
            page = await self.api("compute.routes.list",
                                  lambda s, t=token: s.routes().list(project=p, maxResults=500, pageToken=t))
            items = page.get("items")
            if isinstance(items, list):
                out.extend(x for x in items if isinstance(x, dict))
            token = page.get("nextPageToken")
            if not token or not isinstance(token, str):
                break
        return out

    def stale_candidates(self, routes: list[dict], net: dict, own: str) -> list[tuple[str, str, str, str]]:
        """(route, project, zone, instance) of each route that may be a deleted node's: named flannel-*
        (not ours), in our network, its destination inside Network, its next hop an instance GCE
        flags as not found (warning NEXT_HOP_INSTANCE_NOT_FOUND)."""
        out = []
        for r in routes:
            name, dest, hop, warnings = (r.get(k) for k in ("name", "destRange", "nextHopInstance", "warnings"))
            if not (isinstance(name, str) and isinstance(dest, str) and isinstance(hop, str)
                    and isinstance(warnings, list)):
                continue
            if not name.startswith("flannel-") or name == own:
                continue
            if not same_resource(r.get("network"), net.get("selfLink")):
                continue
            try:
                if not IPv4Network(dest).subnet_of(self.network):
                    continue
            except ValueError:
                continue
            if not any(isinstance(w, dict) and w.get("code") == "NEXT_HOP_INSTANCE_NOT_FOUND" for w in warnings):
                continue
            m = INSTANCE_URL.search(hop)
            if m:
                out.append((name, m.group(1), m.group(2), m.group(3)))
        return out

    async def drop_stale_routes(self, net: dict, own: str) -> None:
        """Delete flannel-* routes of our network whose next-hop instance no longer exists (checked
        with instances.get: only a 404 counts). Failures are logged once per change, never raised:
        our own route does not depend on this clean-up."""
        p = self.route_project
        try:
            candidates = self.stale_candidates(await self.list_routes(), net, own)
            for name, proj, zone, inst in candidates:
                try:
                    await self.api("compute.instances.get",
                                   lambda s, a=(proj, zone, inst): s.instances().get(project=a[0], zone=a[1], instance=a[2]))
                    continue  # it exists after all (GCE's flag lags): not stale
                except GceApiError as e:
                    if e.status != 404:
                        raise
                try:
                    op = await self.api("compute.routes.delete", lambda s, n=name: s.routes().delete(project=p, route=n))
                    await self.wait_operation("compute.routes.delete", op)
                except GceApiError as e:
                    if e.status == 404 or e.code == "resourceNotReady":
                        continue  # another node is removing it
                    raise
                log.info("removed stale route", route=name, next_hop_instance=f"projects/{proj}/zones/{zone}/instances/{inst}")
        except CloudError as e:
            if str(e) != self.cleanup_error:
                log.warning("stale route clean-up failed", error=str(e))
            self.cleanup_error = str(e)
        else:
            self.cleanup_error = ""
