"""gce: this host's subnet as a route in the GCE network (upstream ``backend/gce``, ≤ v0.19).

Sequence (in ``start``, after the lease is ours; retried in the background on failure, see
:mod:`.cloudhttp`):

1. Metadata server (``Metadata-Flavor: Google``): project id, zone, instance name, the network of
   the NIC holding the interface address (NIC 0 otherwise), and the service account's token.
2. Compute API (Google's client, static discovery document): ``networks.get``, ``instances.get``,
   ``routes.get`` of ``flannel-<subnet with . and / as ->`` (e.g. ``flannel-10-1-5-0-24``).
3. Already pointing at this instance → nothing to do. Pointing elsewhere → ``routes.delete``.
   Then ``routes.insert`` {destRange = subnet, network, nextHopInstance = this instance, priority
   1000}. Every operation is waited for (``globalOperations.get`` every second, up to 100 s).
4. An instance without IP forwarding gets its route, and one error line until it can forward.

Settings: ``PYFLANNELD_GCE_API_ENDPOINT`` / ``Backend.Endpoint`` (root URL of the Compute API,
``compute/v1/`` is appended; default ``https://compute.googleapis.com/``),
``PYFLANNELD_GCE_METADATA_URL`` / ``Backend.MetadataEndpoint`` (default
``http://169.254.169.254``). Nothing is programmed in the kernel; the route stays on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network
from typing import Any

import httpx
import structlog

from ..subnet.lease import Lease
from .base import BackendContext, register_backend
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
SCOPE_HINT = ("the instance's service account lacks the compute-rw scope "
              "(https://www.googleapis.com/auth/compute); stop the instance and run "
              "'gcloud compute instances set-service-account INSTANCE --scopes compute-rw'")


def route_name(subnet: IPv4Network) -> str:
    """flannel-10-1-5-0-24 for 10.1.5.0/24 (upstream's formatRouteName)."""
    return "flannel-" + str(subnet).replace(".", "-").replace("/", "-")


def same_resource(a: str | None, b: str | None) -> bool:
    """Two resource URLs name the same resource (hosts differ: www.googleapis.com vs compute.googleapis.com)."""
    if not a or not b:
        return False

    def tail(u: str) -> str:
        i = u.find("projects/")
        return u[i:] if i >= 0 else u

    return tail(a) == tail(b)


class GceApiError(CloudError):
    def __init__(self, message: str, status: int, retryable: bool = False):
        super().__init__(message, retryable)
        self.status = status


@register_backend
class GceBackend(CloudRouteBackend):
    type_name = "gce"
    cloud_name = "GCE"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.api_base = DEFAULT_API + "compute/v1/"
        self.custom_api = False
        self.metadata_url = DEFAULT_METADATA
        self.project = self.zone = self.instance = self.network_name = ""
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
            zone = (await get("instance/zone")).rsplit("/", 1)[-1]
            name = await get("instance/name", missing_ok=True) or (await get("instance/hostname")).split(".", 1)[0]
            nic = "0"
            for entry in (await get("instance/network-interfaces/", missing_ok=True)).split():
                idx = entry.strip("/")
                if await get(f"instance/network-interfaces/{idx}/ip", missing_ok=True) == str(self.ctx.ext.ip):
                    nic = idx
                    break
            network = (await get(f"instance/network-interfaces/{nic}/network")).rsplit("/", 1)[-1]
        self.project, self.zone, self.instance, self.network_name = project, zone, name, network
        log.info("GCE instance identity", project=project, zone=zone, instance=name, network=network)

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
        except (ValueError, KeyError, TypeError):
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
        return await self.in_thread(self._execute, label, make)

    def quota_error(self, code: str, message: str) -> CloudError:
        return CloudError(f"route quota exceeded ({code}: {message}): project {self.project} can hold no more routes; "
                          "ask for a higher ROUTES quota or delete unused routes")

    def explain(self, label: str, e: Any) -> GceApiError:
        status = int(getattr(e.resp, "status", 0) or 0)
        try:
            err = json.loads(e.content).get("error", {})
        except (ValueError, AttributeError, TypeError):
            err = {}
        message = (err.get("message") or getattr(e, "reason", "") or "").strip()
        reasons = [x.get("reason", "") for x in err.get("errors") or [] if isinstance(x, dict)]
        reason = reasons[0] if reasons else ""
        if status == 403 and "insufficientPermissions" in reasons:
            return GceApiError(f"{label} forbidden (403 insufficientPermissions: {message}): {SCOPE_HINT}", status)
        if status == 403 and "quotaExceeded" in reasons:
            q = self.quota_error("quotaExceeded", message)
            return GceApiError(str(q), status)
        if status == 429 or status >= 500 or {"rateLimitExceeded", "userRateLimitExceeded"} & set(reasons):
            return GceApiError(f"{label} failed ({status} {reason}: {message})", status, retryable=True)
        if status == 403 and "accessNotConfigured" in reasons:
            return GceApiError(f"{label} forbidden (403 accessNotConfigured: {message}): enable the Compute Engine "
                               f"API for project {self.project}", status)
        if status == 403:
            return GceApiError(f"{label} forbidden (403 {reason}: {message}): grant the instance's service account "
                               "the permission (e.g. roles/compute.networkAdmin)", status)
        if status == 401:
            return GceApiError(f"{label}: the Compute API rejected the service account token (401 {reason}: "
                               f"{message})", status)
        if status == 409:
            return GceApiError(f"{label}: conflict (409 {reason}: {message})", status, retryable=True)
        return GceApiError(f"{label} failed ({status} {reason}: {message})", status)

    async def wait_operation(self, label: str, op: dict) -> None:
        name = op.get("name", "")
        for _ in range(OP_POLLS):
            if op.get("status") == "DONE":
                break
            await asyncio.sleep(OP_POLL_INTERVAL)
            op = await self.api("compute.globalOperations.get",
                                lambda s: s.globalOperations().get(project=self.project, operation=name))
        else:
            raise CloudError(f"{label}: operation {name} not done after {int(OP_POLLS * OP_POLL_INTERVAL)} s",
                             retryable=True)
        errors = (op.get("error") or {}).get("errors") or []
        if errors:
            code, message = errors[0].get("code", "?"), errors[0].get("message", "")
            if code == "QUOTA_EXCEEDED":
                raise self.quota_error(code, message)
            raise CloudError(f"{label}: operation {name} failed ({code}: {message})")
        for w in op.get("warnings") or []:
            log.warning("GCE operation warning", operation=name, code=w.get("code"), message=w.get("message"))

    # --- the sequence ------------------------------------------------------------------------
    async def ensure_route(self, lease: Lease) -> None:
        if not self.instance:
            await self.read_metadata()
        subnet = lease.subnet
        p = self.project
        net = await self.api("compute.networks.get", lambda s: s.networks().get(project=p, network=self.network_name))
        inst = await self.api("compute.instances.get",
                              lambda s: s.instances().get(project=p, zone=self.zone, instance=self.instance))
        name = route_name(subnet)
        try:
            route: dict | None = await self.api("compute.routes.get", lambda s: s.routes().get(project=p, route=name))
        except GceApiError as e:
            if e.status != 404:
                raise
            route = None
        if (route is not None and same_resource(route.get("nextHopInstance"), inst.get("selfLink"))
                and route.get("destRange") == str(subnet)):
            log.info("route already in place", route=name, subnet=str(subnet), instance=self.instance)
        else:
            if route is not None:
                previous = route.get("nextHopInstance") or route.get("nextHopIp") or route.get("nextHopGateway") or "?"
                log.info("deleting conflicting route", route=name, previous=previous)
                op = await self.api("compute.routes.delete", lambda s: s.routes().delete(project=p, route=name))
                await self.wait_operation("compute.routes.delete", op)
            body = {"name": name, "destRange": str(subnet), "network": net["selfLink"],
                    "nextHopInstance": inst["selfLink"], "priority": 1000, "tags": [],
                    "description": "flannel subnet route (pyflanneld)"}
            log.info("inserting route", route=name, subnet=str(subnet), instance=self.instance)
            op = await self.api("compute.routes.insert", lambda s: s.routes().insert(project=p, body=body))
            await self.wait_operation("compute.routes.insert", op)
            log.info("route created", route=name, subnet=str(subnet), instance=self.instance)
        if not inst.get("canIpForward", False):
            raise CloudError(f"instance {self.instance} cannot forward IP packets (canIpForward is false): GCE drops "
                             f"traffic for {subnet} routed to it; enable --can-ip-forward (at instance creation, or "
                             "update the instance while it is stopped)")
