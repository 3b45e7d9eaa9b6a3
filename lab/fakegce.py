"""A Compute Engine API and a GCE metadata server for tests (what the gce backend calls, no more).

Compute API (one process, e.g. in the lab's switch namespace)::

    python -m lab.fakegce api --port PORT

Google's shapes and error format, under ``/compute/v1/projects/{project}/``:

* ``GET global/networks/{n}``, ``GET zones/{z}/instances/{i}`` (``canIpForward``, ``selfLink``)
* ``GET|DELETE global/routes/{r}``, ``GET global/routes`` (pages: ``maxResults`` ≤ 500,
  ``pageToken``), ``POST global/routes`` (insert: validates name, destRange, network and
  nextHopInstance — an instance of another project is invalid, as on GCE, where a Shared VPC
  host project's routes name the next hop by address, ``nextHopIp``; 409 ``alreadyExists``; the
  ROUTES quota). Routes carry GCE's warnings about their next-hop instance, evaluated when read:
  ``NEXT_HOP_INSTANCE_NOT_FOUND`` once it is deleted, ``NEXT_HOP_CANNOT_IP_FORWARD``.
* ``GET global/operations/{op}``: inserts and deletes are global operations, ``RUNNING`` until
  ``operation_seconds`` have passed, then ``DONE`` (the change is applied at that moment).
* ``{project}`` is a project id or its number (as the metadata server's paths use).
* Auth: ``Authorization: Bearer <token>``; no token or an unknown one → 401; a token whose scopes
  lack compute (read-write) or cloud-platform on a write, or any compute scope on a read → 403
  ``insufficientPermissions``, as Google answers.
* Quota: with ``route_quota`` routes in the project an insert fails with ``QUOTA_EXCEEDED`` in
  the operation's error (``quota_error: "operation"``, the default) or with HTTP 403
  ``quotaExceeded`` on the request (``"request"``); the message is Google's
  ``Quota 'ROUTES' exceeded.  Limit: N.0 globally.``
* Faults: rules ``{"method": "POST", "path": <regex on the part after projects/{p}/>, "code":
  400, "reason": "resourceNotReady", "count": N}`` (count absent: until replaced) answer matching
  requests with Google's error for that reason: ``resourceNotReady`` (400, "The resource '…' is
  not ready"), ``rateLimitExceeded`` (403, "Rate Limit Exceeded", domain usageLimits), others
  with ``message``.

Self links use ``https://www.googleapis.com/compute/v1/`` whatever address the client used, as
the real API does. Test-only endpoints: ``POST /_fake/update`` (JSON: ``project`` plus any of
``number``, ``networks``, ``instances`` [{name, zone, canIpForward, network (a name, or
``projects/<host>/global/networks/<n>`` for a Shared VPC network), networkIP}],
``delete_instances`` [{name, zone}], ``routes`` [route bodies, stored at once without checks],
``route_quota``, ``quota_error``, ``operation_seconds``; and ``tokens`` {token: [scopes]},
``faults`` [rules, replacing the previous ones]), ``GET /_fake/log`` (one "METHOD path" per API
request, in order).

Metadata server (inside a host namespace, at 169.254.169.254:80, see fakemeta.start_metadata_server)::

    python -m lab.fakegce metadata --project P --project-number N --zone Z \\
        --instance NAME --network default [--network-project-number HOST] --ip 192.168.100.1 \\
        --token TOKEN [--scopes https://www.googleapis.com/auth/compute,...] [--no-service-account]

``/computeMetadata/v1/...`` with the ``Metadata-Flavor: Google`` request header required (403
without it), answered with the same header: project/project-id, project/numeric-project-id,
instance/{name,hostname,id,zone}, instance/network-interfaces/[0/{ip,network}],
instance/service-accounts/default/{token,scopes,email}.

Lab API::

    api = GceServer(lab.switch).start()
    api.endpoint                          # "http://192.168.100.254:PORT" as hosts see it
    api.update(project="p1", instances=[...], tokens={...})
    api.get("/compute/v1/projects/p1/global/routes", token="t")   # (status, json) via curl
    api.log() -> list[str]; api.block() / api.unblock(); api.close()
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import random
import re
import secrets
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from .fakemeta import LINK_LOCAL, QuickHTTPServer
from .netns import Host, LabError, LabProcess
from .outage import BlockablePort
from .wait import wait_for

LINK = "https://www.googleapis.com/compute/v1/"
SCOPE_RW = "https://www.googleapis.com/auth/compute"
SCOPE_RO = "https://www.googleapis.com/auth/compute.readonly"
SCOPE_CLOUD = "https://www.googleapis.com/auth/cloud-platform"
SCOPE_CLOUD_RO = "https://www.googleapis.com/auth/cloud-platform.read-only"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str, status: str = "", domain: str = "global"):
        super().__init__(message)
        self.code, self.message, self.reason, self.status, self.domain = code, message, reason, status, domain

    def body(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message,
                               "errors": [{"message": self.message if self.reason != "insufficientPermissions"
                                           else "Insufficient Permission", "domain": self.domain,
                                           "reason": self.reason}]}
        if self.status:
            err["status"] = self.status
        return {"error": err}


def not_found(path: str) -> ApiError:
    return ApiError(404, f"The resource '{path}' was not found", "notFound")


def now_rfc3339() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


# --- the Compute API ----------------------------------------------------------------------------
class Project:
    def __init__(self, name: str):
        self.name = name
        self.number = str(random.randint(10**11, 10**12 - 1))
        self.networks: dict[str, dict] = {}
        self.instances: dict[tuple[str, str], dict] = {}
        self.routes: dict[str, dict] = {}
        self.ops: dict[str, dict] = {}
        self.pending: dict[str, tuple[float, Any]] = {}  # op name → (done at, apply function)
        self.route_quota = 100
        self.quota_error = "operation"
        self.operation_seconds = 0.3

    def link(self, rest: str) -> str:
        return f"{LINK}projects/{self.name}/{rest}"

    def add_network(self, name: str) -> None:
        self.networks.setdefault(name, {
            "kind": "compute#network", "id": str(random.randint(10**18, 10**19 - 1)), "name": name,
            "creationTimestamp": now_rfc3339(), "selfLink": self.link(f"global/networks/{name}"),
            "autoCreateSubnetworks": True, "routingConfig": {"routingMode": "REGIONAL"},
        })

    def add_instance(self, spec: dict) -> None:
        zone, name = spec["zone"], spec["name"]
        net = spec.get("network", "default")
        if "/" in net:  # "projects/<host>/global/networks/<n>": a Shared VPC host project's network
            net_link = LINK + net
        else:
            self.add_network(net)
            net_link = self.networks[net]["selfLink"]
        self.instances[(zone, name)] = {
            "kind": "compute#instance", "id": str(random.randint(10**18, 10**19 - 1)), "name": name,
            "zone": self.link(f"zones/{zone}"), "status": "RUNNING", "machineType": self.link(
                f"zones/{zone}/machineTypes/e2-small"), "canIpForward": bool(spec.get("canIpForward", True)),
            "networkInterfaces": [{"kind": "compute#networkInterface", "name": "nic0",
                                   "network": net_link,
                                   "networkIP": spec.get("networkIP", "")}],
            "selfLink": self.link(f"zones/{zone}/instances/{name}"),
        }

    def tick(self) -> None:
        now = time.monotonic()
        for name, (due, apply) in list(self.pending.items()):
            if now >= due:
                del self.pending[name]
                op = self.ops[name]
                try:
                    apply()
                except ApiError as e:
                    op["error"] = {"errors": [{"code": e.reason, "message": e.message}]}
                    op["httpErrorStatusCode"] = e.code
                    op["httpErrorMessage"] = {403: "FORBIDDEN", 404: "NOT FOUND", 409: "CONFLICT"}.get(e.code, "ERROR")
                op.update(status="DONE", progress=100, endTime=now_rfc3339())

    def operation(self, kind: str, target: str, apply: Any) -> dict:
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        op = {"kind": "compute#operation", "id": str(random.randint(10**18, 10**19 - 1)), "name": name,
              "operationType": kind, "targetLink": target, "status": "RUNNING", "user": "flannel@example.iam",
              "progress": 0, "insertTime": now_rfc3339(), "startTime": now_rfc3339(),
              "selfLink": self.link(f"global/operations/{name}")}
        self.ops[name] = op
        self.pending[name] = (time.monotonic() + self.operation_seconds, apply)
        return dict(op)

    def find(self, ref: str, kind: str) -> str:
        """A full/partial URL of a network ("global/networks/x") or instance ("zones/z/instances/x") → key."""
        m = re.search(r"(?:projects/([^/]+)/)?" + kind + r"$", ref or "")
        if not m or (m.group(1) and m.group(1) != self.name):
            raise ApiError(400, f"Invalid value for field 'resource': '{ref}'.", "invalid")
        return m.group(0)

    def insert_route(self, body: dict) -> dict:
        name = body.get("name", "")
        if not NAME_RE.match(name):
            raise ApiError(400, f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'", "invalid")
        try:
            dest = str(ipaddress.ip_network(body.get("destRange", ""), strict=True))
        except ValueError:
            raise ApiError(400, f"Invalid value for field 'resource.destRange': '{body.get('destRange')}'. "
                                "Invalid IPv4 CIDR.", "invalid") from None
        net = self.find(body.get("network", ""), r"global/networks/([^/]+)")
        net_name = net.rsplit("/", 1)[1]
        if net_name not in self.networks:
            raise not_found(f"projects/{self.name}/global/networks/{net_name}")
        hop = body.get("nextHopInstance")
        inst = None
        if hop:
            key = self.find(hop, r"zones/([^/]+)/instances/([^/]+)").split("/")
            inst = self.instances.get((key[-3], key[-1]))
            if inst is None:
                raise not_found(f"projects/{self.name}/zones/{key[-3]}/instances/{key[-1]}")
        if name in self.routes:
            raise ApiError(409, f"The resource 'projects/{self.name}/global/routes/{name}' already exists",
                           "alreadyExists")
        quota_msg = f"Quota 'ROUTES' exceeded.  Limit: {float(self.route_quota)} globally."
        if len(self.routes) >= self.route_quota and self.quota_error == "request":
            raise ApiError(403, quota_msg, "quotaExceeded", "PERMISSION_DENIED", domain="usageLimits")
        route = {"kind": "compute#route", "id": str(random.randint(10**18, 10**19 - 1)), "name": name,
                 "creationTimestamp": now_rfc3339(), "network": self.networks[net_name]["selfLink"],
                 "destRange": dest, "priority": int(body.get("priority", 1000)), "tags": body.get("tags") or [],
                 "selfLink": self.link(f"global/routes/{name}"), "routeType": "STATIC"}
        if body.get("description"):
            route["description"] = body["description"]
        if inst is not None:
            route["nextHopInstance"] = inst["selfLink"]
        for k in ("nextHopIp", "nextHopGateway"):
            if body.get(k):
                route[k] = body[k]

        def apply() -> None:
            if len(self.routes) >= self.route_quota:
                raise ApiError(403, quota_msg, "QUOTA_EXCEEDED")
            self.routes[name] = route

        return self.operation("insert", route["selfLink"], apply)

    def view(self, route: dict) -> dict:
        """A route as the API shows it: with GCE's warnings about its next-hop instance (evaluated
        now: gone → NEXT_HOP_INSTANCE_NOT_FOUND, cannot forward → NEXT_HOP_CANNOT_IP_FORWARD)."""
        out = dict(route)
        hop = route.get("nextHopInstance")
        m = re.search(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$", hop or "")
        if m and m.group(1) == self.name:
            inst = self.instances.get((m.group(2), m.group(3)))
            if inst is None:
                out["warnings"] = [{"code": "NEXT_HOP_INSTANCE_NOT_FOUND", "message":
                                    f"Next hop instance '{hop}' does not exist.",
                                    "data": [{"key": "instance", "value": hop}]}]
            elif not inst["canIpForward"]:
                out["warnings"] = [{"code": "NEXT_HOP_CANNOT_IP_FORWARD", "message":
                                    f"Next hop instance '{hop}' cannot ip forward.",
                                    "data": [{"key": "instance", "value": hop}]}]
        return out

    def delete_route(self, name: str) -> dict:
        if name not in self.routes:
            raise not_found(f"projects/{self.name}/global/routes/{name}")
        return self.operation("delete", self.routes[name]["selfLink"], lambda: self.routes.pop(name, None))


class ComputeApi(QuickHTTPServer):
    def __init__(self, addr: tuple[str, int]):
        super().__init__(addr, _ApiHandler)
        self.lock = threading.Lock()
        self.projects: dict[str, Project] = {}
        self.tokens: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.faults: list[dict] = []

    def project(self, name: str) -> Project:
        """A project by id, or by number as the API also accepts (created on first use)."""
        if name.isdigit():
            for p in self.projects.values():
                if p.number == name:
                    return p
        if name not in self.projects:
            self.projects[name] = Project(name)
        return self.projects[name]

    def fault(self, method: str, project: Project, rest: str, body: bytes) -> ApiError | None:
        """The error a fault rule injects into this request, if one matches (its count goes down)."""
        for rule in self.faults:
            if rule.get("count", 1) == 0 or rule.get("method", method) != method:
                continue
            if not re.search(rule.get("path", ""), rest):
                continue
            if rule.get("count") is not None:
                rule["count"] -= 1
            reason = rule.get("reason", "backendError")
            if reason == "resourceNotReady":
                target = rest
                if method == "POST" and rest == "global/routes":
                    with contextlib.suppress(ValueError, AttributeError):
                        target = f"global/routes/{json.loads(body or b'{}').get('name', '')}"
                message = f"The resource 'projects/{project.name}/{target}' is not ready"
            elif reason in ("rateLimitExceeded", "userRateLimitExceeded"):
                message = "Rate Limit Exceeded"
            else:
                message = rule.get("message", reason)
            domain = "usageLimits" if "RateLimit" in reason or "rateLimit" in reason else "global"
            return ApiError(int(rule.get("code", 503)), message, reason, domain=domain)
        return None

    def update(self, spec: dict) -> dict:
        self.tokens.update(spec.get("tokens") or {})
        if "faults" in spec:
            self.faults = [dict(f) for f in spec["faults"]]
        if not spec.get("project"):
            return {}
        p = self.project(spec["project"])
        if spec.get("number"):
            p.number = str(spec["number"])
        for n in spec.get("networks") or []:
            p.add_network(n)
        for i in spec.get("instances") or []:
            p.add_instance(i)
        for i in spec.get("delete_instances") or []:
            p.instances.pop((i["zone"], i["name"]), None)
        for r in spec.get("routes") or []:
            p.routes[r["name"]] = {"kind": "compute#route", "selfLink": p.link(f"global/routes/{r['name']}"),
                                   "priority": 1000, **r}
        for k in ("route_quota", "quota_error", "operation_seconds"):
            if k in spec:
                setattr(p, k, spec[k])
        return {"project": p.name, "number": p.number}

    def authorize(self, header: str | None, write: bool) -> None:
        if not header or not header.startswith("Bearer "):
            raise ApiError(401, "Request is missing required authentication credential. Expected OAuth 2 access "
                                "token, login cookie or other valid authentication credential.", "required",
                           "UNAUTHENTICATED")
        scopes = self.tokens.get(header.removeprefix("Bearer ").strip())
        if scopes is None:
            raise ApiError(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                                "login cookie or other valid authentication credential.", "authError",
                           "UNAUTHENTICATED")
        ok = {SCOPE_RW, SCOPE_CLOUD} if write else {SCOPE_RW, SCOPE_CLOUD, SCOPE_RO, SCOPE_CLOUD_RO}
        if not ok & set(scopes):
            raise ApiError(403, "Request had insufficient authentication scopes.", "insufficientPermissions",
                           "PERMISSION_DENIED")

    def handle_api(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict]:
        m = re.match(r"^/compute/v1/projects/([^/]+)/(.*)$", path.split("?", 1)[0])
        if not m:
            raise ApiError(404, f"Not Found: {path}", "notFound")
        self.authorize(headers.get("Authorization"), write=method != "GET")
        p = self.project(m.group(1))
        p.tick()
        rest = m.group(2)
        injected = self.fault(method, p, rest, body)
        if injected is not None:
            raise injected
        if method == "GET" and (g := re.match(r"^global/networks/([^/]+)$", rest)):
            if g.group(1) not in p.networks:
                raise not_found(f"projects/{p.name}/global/networks/{g.group(1)}")
            return 200, p.networks[g.group(1)]
        if method == "GET" and (g := re.match(r"^zones/([^/]+)/instances/([^/]+)$", rest)):
            inst = p.instances.get((g.group(1), g.group(2)))
            if inst is None:
                raise not_found(f"projects/{p.name}/zones/{g.group(1)}/instances/{g.group(2)}")
            return 200, inst
        if rest == "global/routes":
            if method == "GET":
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
                size = min(500, int(query.get("maxResults", ["500"])[0]))
                start = int(query.get("pageToken", ["0"])[0])
                items = sorted(p.routes.values(), key=lambda r: r["name"])
                page = {"kind": "compute#routeList", "id": f"projects/{p.name}/global/routes",
                        "items": [p.view(r) for r in items[start:start + size]], "selfLink": p.link("global/routes")}
                if start + size < len(items):
                    page["nextPageToken"] = str(start + size)
                return 200, page
            if method == "POST":
                try:
                    data = json.loads(body or b"{}")
                except ValueError:
                    raise ApiError(400, "Invalid JSON payload received.", "parseError") from None
                return 200, p.insert_route(data)
        if (g := re.match(r"^global/routes/([^/]+)$", rest)):
            name = g.group(1)
            if method == "GET":
                if name not in p.routes:
                    raise not_found(f"projects/{p.name}/global/routes/{name}")
                return 200, p.view(p.routes[name])
            if method == "DELETE":
                return 200, p.delete_route(name)
        if method == "GET" and (g := re.match(r"^global/operations/([^/]+)$", rest)):
            op = p.ops.get(g.group(1))
            if op is None:
                raise not_found(f"projects/{p.name}/global/operations/{g.group(1)}")
            return 200, op
        raise ApiError(404, f"Not Found: {method} {path}", "notFound")


class _ApiHandler(BaseHTTPRequestHandler):
    server: ComputeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _reply(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        s = self.server
        with s.lock:
            if self.path == "/_fake/update" and method == "POST":
                return self._reply(200, s.update(json.loads(body or b"{}")))
            if self.path == "/_fake/log" and method == "GET":
                return self._reply(200, s.requests)
            s.requests.append(f"{method} {self.path.split('?', 1)[0]}")
            try:
                code, obj = s.handle_api(method, self.path, self.headers, body)
            except ApiError as e:
                code, obj = e.code, e.body()
        print(f"{method} {self.path} → {code}", flush=True)
        self._reply(code, obj)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib name
        self._handle("DELETE")


# --- the metadata server ------------------------------------------------------------------------
class _MetaHandler(BaseHTTPRequestHandler):
    server: MetadataServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, code: int, body: str, ctype: str = "application/text") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Server", "Metadata Server for VM")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        print(f"GET {self.path}", flush=True)
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._send(403, "Missing required header \"Metadata-Flavor\": \"Google\"", "text/html")
        body = self.server.answer(self.path.split("?", 1)[0].removeprefix("/computeMetadata/v1/"))
        if body is None:
            return self._send(404, "Not Found", "text/html")
        self._send(200, body, "application/json" if body.startswith("{") else "application/text")


class MetadataServer(QuickHTTPServer):
    def __init__(self, addr: tuple[str, int], a: argparse.Namespace):
        super().__init__(addr, _MetaHandler)
        self.a = a

    def answer(self, path: str) -> str | None:
        a = self.a
        values = {
            "project/project-id": a.project,
            "project/numeric-project-id": a.project_number,
            "instance/name": a.instance,
            "instance/hostname": f"{a.instance}.{a.zone}.c.{a.project}.internal",
            "instance/id": str(abs(hash(a.instance)) % 10**19),
            "instance/zone": f"projects/{a.project_number}/zones/{a.zone}",
            "instance/network-interfaces/": "0/\n",
            "instance/network-interfaces/0/ip": a.ip,
            "instance/network-interfaces/0/network":
                f"projects/{a.network_project_number or a.project_number}/networks/{a.network}",
        }
        if a.service_account:
            values.update({
                "instance/service-accounts/": "default/\n",
                "instance/service-accounts/default/email": f"{a.project_number}-compute@developer.gserviceaccount.com",
                "instance/service-accounts/default/scopes": "\n".join(a.scopes.split(",")) + "\n",
                "instance/service-accounts/default/token": json.dumps(
                    {"access_token": a.token, "expires_in": 3599, "token_type": "Bearer"}),
            })
        return values.get(path)


# --- the lab side -------------------------------------------------------------------------------
class GceServer(BlockablePort):
    """The fake Compute API in a lab namespace (normally the switch)."""

    def __init__(self, host: Host, port: int | None = None):
        self.host = host
        self.port = port or random.randint(20000, 40000)
        self.process: LabProcess | None = None
        self.blocked = ""  # "", "reject" or "drop"

    def start(self, timeout: float = 15) -> GceServer:
        for _ in range(5):
            self.process = self.host.popen(sys.executable, "-m", "lab.fakegce", "api", "--port",
                                           str(self.port), name=f"fakegce-{self.port}")
            proc = self.process
            wait_for(lambda p=proc: "listening" in p.log_text() or not p.alive, timeout, "fakegce listening",
                     interval=0.02, detail=lambda p=proc: p.log_text()[-2000:])
            if self.process.alive:
                return self
            if "in use" not in self.process.log_text():
                raise LabError(f"fakegce exited: {self.process.log_text()[-2000:]}")
            self.port = random.randint(20000, 40000)
        raise LabError("fakegce: no free port after 5 tries")

    def _curl(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        args = ["curl", "-s", "-X", method, "-w", "\n%{http_code}", f"http://127.0.0.1:{self.port}{path}"]
        if token:
            args += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        cp = self.host.run(*args, input=json.dumps(body) if body is not None else None)
        text, _, code = cp.stdout.rpartition("\n")
        return int(code or 0), (json.loads(text) if text.strip() else None)

    def update(self, **spec: Any) -> dict:
        return self._curl("POST", "/_fake/update", spec)[1]

    def log(self) -> list[str]:
        return self._curl("GET", "/_fake/log")[1]

    def get(self, path: str, token: str) -> tuple[int, Any]:
        return self._curl("GET", path, token=token)

    def post(self, path: str, body: Any, token: str) -> tuple[int, Any]:
        return self._curl("POST", path, body, token=token)

    def delete(self, path: str, token: str) -> tuple[int, Any]:
        return self._curl("DELETE", path, token=token)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.unblock()
        if self.process is not None:
            self.process.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.fakegce")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("api")
    s.add_argument("--address", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    m = sub.add_parser("metadata")
    m.add_argument("--project", required=True)
    m.add_argument("--project-number", default="123456789012")
    m.add_argument("--zone", required=True)
    m.add_argument("--instance", required=True)
    m.add_argument("--network", default="default")
    m.add_argument("--network-project-number", default="",
                   help="the network's project (a Shared VPC host project); default: the instance's project")
    m.add_argument("--ip", default="")
    m.add_argument("--token", default="")
    m.add_argument("--scopes", default=SCOPE_RW)
    m.add_argument("--no-service-account", dest="service_account", action="store_false")
    m.add_argument("--address", default=LINK_LOCAL)
    m.add_argument("--port", type=int, default=80)
    a = p.parse_args(argv)
    try:
        srv: QuickHTTPServer = ComputeApi((a.address, a.port)) if a.cmd == "api" else MetadataServer((a.address, a.port), a)
    except OSError as e:
        print(f"fakegce: cannot listen on {a.address}:{a.port}: {e.strerror} (address already in use?)", flush=True)
        raise SystemExit(1) from None
    print(f"fakegce: {a.cmd} listening on {a.address}:{a.port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
