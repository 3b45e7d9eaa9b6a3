"""An EC2 API for tests: moto's server, plus two AWS behaviours moto leaves out, and a driver.

Server (run inside a lab namespace; hosts reach it at http://192.168.100.254:PORT)::

    python -m lab.fakeec2 serve --host 0.0.0.0 --port PORT [--route-limit 50]

It is moto's own server (``moto.server``: werkzeug, AWS's query protocol and error XML) with:

* **Route limit**: ``CreateRoute`` into a table that already holds ``--route-limit`` non-local
  routes fails with ``RouteLimitExceeded`` (HTTP 400, EC2's ``<Response><Errors>`` XML), as AWS
  does at its default quota "Routes per route table" = 50. moto enforces no limit.
* **Blackhole routes**: a route whose target ENI was deleted (or whose target instance is
  terminated) reports ``State: blackhole``, as AWS does; moto reports every route "active".
* **EC2's denial code**: with IAM enforced, an EC2 action the caller's policies do not allow
  fails with ``UnauthorizedOperation`` (HTTP 403) as on AWS; moto says ``AccessDenied``.
* **Faults** for requests from the hosts (not from 127.0.0.1, the driver): ``POST /_fake/faults``
  with a JSON list of rules replaces the rules. ``{"action": "CreateRoute", "code":
  "RequestLimitExceeded", "status": 503, "count": N}`` answers N matching requests (count
  absent: until replaced; ``"table"``: only requests for that RouteTableId) with EC2's error XML,
  as AWS's throttling does. ``{"action": "ReplaceRoute", "vanish": true}``: the route the request
  names is deleted just before the request is handled, as when someone removes it between a
  client's DescribeRouteTables and its ReplaceRoute; AWS (and moto) then answer
  ``InvalidParameterValue`` "There is no route defined for '…' in the route table. Use
  CreateRoute instead."

Everything else is moto unchanged. Enforce IAM by POSTing ``0`` to ``/moto-api/reset-auth`` (moto).

Driver (the test's hands on the API, run in the same namespace; boto3 over 127.0.0.1)::

    python -m lab.fakeec2 driver --endpoint http://127.0.0.1:PORT --region eu-west-1

reads one JSON request per stdin line and answers one JSON line on stdout:
``{"op": "create_vpc", "args": {...}, "service": "ec2"}`` → ``{"ok": <boto3 result>}`` or
``{"error": {"code": ..., "message": ...}}``. Special ops: ``credentials`` (args ``key``,
``secret``: sign later calls with them), ``reset_auth`` (args ``count``: moto's IAM switch),
``faults`` (args ``rules``: the fault rules above).

Lab API (from the test process)::

    srv = Ec2Server(lab.switch, region="eu-west-1", route_limit=50).start()
    srv.endpoint                      # "http://192.168.100.254:PORT" as the hosts see it
    srv.call("describe_route_tables", RouteTableIds=[rtb])   # via the driver; raises Ec2Error
    srv.faults([{"action": "CreateRoute", "code": "RequestLimitExceeded", "status": 503}])
    srv.faults([])                    # no more faults
    srv.block(drop=False) / srv.unblock()  # outage: REJECT (or DROP) new connections (iptables in
                                      # the server's namespace) / allow them again
    srv.close()
"""

from __future__ import annotations

import argparse
import contextlib
import http
import io
import json
import os
import random
import subprocess
import sys
import threading
import urllib.parse
import uuid
from typing import Any

from .netns import Host, LabError, LabProcess
from .outage import BlockablePort
from .wait import WaitTimeout, wait_for

DEFAULT_ROUTE_LIMIT = 50
VANISHING: set[tuple[str, str]] = set()  # (table, cidr) to delete when the next ReplaceRoute for it arrives
ROUTE_LIMIT_MESSAGE = "You've reached the limit on the number of routes that you can add to a route table."


# --- the server ---------------------------------------------------------------------------------
def install_aws_behaviours(route_limit: int) -> None:
    """Teach moto's EC2 model the route limit and blackhole routes (see the module docstring)."""
    from moto.core.exceptions import AccessDeniedError
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.route_tables import Route, RouteBackend
    from moto.iam.access_control import IAMRequest

    original_create = RouteBackend.create_route
    original_replace = RouteBackend.replace_route

    def create_route(self, route_table_id, destination_cidr_block, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not kwargs.get("local"):
            table = self.get_route_table(route_table_id)
            used = sum(1 for r in table._routes.values() if not r.local)
            if used >= route_limit:
                raise EC2ClientError("RouteLimitExceeded", ROUTE_LIMIT_MESSAGE)
        return original_create(self, route_table_id, destination_cidr_block, *args, **kwargs)

    def state(self) -> str:  # type: ignore[no-untyped-def]
        backend = self.route_table.ec2_backend
        if self.interface is not None and self.interface.id not in backend.enis:
            return "blackhole"
        if self.instance is not None and getattr(self.instance, "state", "") in ("terminated", "shutting-down"):
            return "blackhole"
        return "active"

    class UnauthorizedOperation(AccessDeniedError):
        def __init__(self, user_arn: str, action: str):
            super(AccessDeniedError, self).__init__(
                "UnauthorizedOperation",
                f"You are not authorized to perform this operation. User: {user_arn} is not authorized to "
                f"perform: {action} because no identity-based policy allows the {action} action")

    original_denied = IAMRequest._raise_access_denied

    def raise_access_denied(self) -> None:  # type: ignore[no-untyped-def]
        if self._service == "ec2":
            raise UnauthorizedOperation(self._access_key.arn, self._action)
        original_denied(self)

    def replace_route(self, route_table_id, destination_cidr_block, *args, **kwargs):  # type: ignore[no-untyped-def]
        if (route_table_id, destination_cidr_block) in VANISHING:  # a "vanish" fault: gone just now
            VANISHING.discard((route_table_id, destination_cidr_block))
            with contextlib.suppress(EC2ClientError):
                self.delete_route(route_table_id, destination_cidr_block)
        return original_replace(self, route_table_id, destination_cidr_block, *args, **kwargs)

    RouteBackend.replace_route = replace_route  # type: ignore[method-assign]
    IAMRequest._raise_access_denied = raise_access_denied  # type: ignore[method-assign]
    RouteBackend.create_route = create_route  # type: ignore[method-assign]
    Route.state = property(state)  # type: ignore[assignment,method-assign]


class FaultInjector:
    """WSGI middleware in front of moto: the fault rules of the module docstring."""

    def __init__(self, app: Any):
        self.app = app
        self.rules: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/_fake/faults":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            rules = json.loads(environ["wsgi.input"].read(size) or b"[]")
            with self.lock:
                self.rules = [dict(r) for r in rules]
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({"rules": len(rules)}).encode()]
        if not self.rules or environ.get("REMOTE_ADDR") == "127.0.0.1":
            return self.app(environ, start_response)
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size) if size else b""
        environ["wsgi.input"] = io.BytesIO(body)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
        rule = self.match(params)
        if rule is None:
            return self.app(environ, start_response)
        if rule.get("vanish"):
            VANISHING.add((params.get("RouteTableId", ""), params.get("DestinationCidrBlock", "")))
            return self.app(environ, start_response)
        code = rule.get("code", "RequestLimitExceeded")
        message = rule.get("message") or {"RequestLimitExceeded": "Request limit exceeded."}.get(code, code)
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code><Message>'
               f"{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>")
        status = int(rule.get("status", 503))
        start_response(f"{status} {http.HTTPStatus(status).phrase}", [("Content-Type", "text/xml;charset=UTF-8")])
        return [xml.encode()]

    def match(self, params: dict[str, str]) -> dict | None:
        with self.lock:
            for rule in self.rules:
                if rule.get("count", 1) <= 0 or rule.get("action") != params.get("Action"):
                    continue
                if rule.get("table") and rule["table"] != params.get("RouteTableId"):
                    continue
                if rule.get("count") is not None:
                    rule["count"] -= 1
                return rule
        return None


def serve(host: str, port: int, route_limit: int) -> None:
    """moto's server (as ``moto.server.main`` runs it) with the AWS behaviours and the faults."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    install_aws_behaviours(route_limit)
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    print(f"fakeec2: route limit {route_limit}, listening on {host}:{port}", flush=True)
    run_simple(host, port, FaultInjector(app), threaded=True, request_handler=MotoRequestHandler)


# --- the driver ---------------------------------------------------------------------------------
def drive(endpoint: str, region: str) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions
    import httpx

    cfg = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30)
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    clients: dict[str, Any] = {}

    def client(service: str):  # type: ignore[no-untyped-def]
        if service not in clients:
            clients[service] = boto3.client(service, endpoint_url=endpoint, region_name=region, config=cfg,
                                            **creds)
        return clients[service]

    def answering() -> bool:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1, trust_env=False)
        except httpx.HTTPError:
            return False
        return True

    try:
        wait_for(answering, 30, f"the fake EC2 server at {endpoint}")
    except WaitTimeout:
        print(json.dumps({"error": {"code": "NotReady", "message": f"{endpoint} not answering"}}), flush=True)
        return
    print(json.dumps({"ok": "ready"}), flush=True)

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op, args = req["op"], req.get("args") or {}
        try:
            if op == "credentials":
                creds = {"aws_access_key_id": args["key"], "aws_secret_access_key": args["secret"]}
                clients.clear()
                result: Any = None
            elif op == "faults":
                r = httpx.post(f"{endpoint}/_fake/faults", json=args["rules"], trust_env=False)
                result = r.json()
            elif op == "reset_auth":
                r = httpx.post(f"{endpoint}/moto-api/reset-auth", content=str(args["count"]).encode(),
                               trust_env=False)
                result = r.json()
            else:
                result = getattr(client(req.get("service", "ec2")), op)(**args)
                if isinstance(result, dict):
                    result.pop("ResponseMetadata", None)
            out: dict[str, Any] = {"ok": result}
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            out = {"error": {"code": err.get("Code", ""), "message": err.get("Message", "")}}
        except Exception as e:  # noqa: BLE001 - reported to the test
            out = {"error": {"code": type(e).__name__, "message": str(e)}}
        print(json.dumps(out, default=str), flush=True)


# --- the lab side -------------------------------------------------------------------------------
class Ec2Error(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Ec2Server(BlockablePort):
    """The EC2 server and its driver in one lab namespace (normally the switch)."""

    def __init__(self, host: Host, region: str = "eu-west-1", route_limit: int = DEFAULT_ROUTE_LIMIT,
                 port: int | None = None):
        self.host = host
        self.region = region
        self.route_limit = route_limit
        self.port = port or random.randint(20000, 40000)
        self.process: LabProcess | None = None
        self._driver: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.blocked = ""  # "", "reject" or "drop"

    def start(self, timeout: float = 30) -> Ec2Server:
        for _ in range(5):
            self.process = self.host.popen(
                sys.executable, "-m", "lab.fakeec2", "serve", "--host", "0.0.0.0",
                "--port", str(self.port), "--route-limit", str(self.route_limit), name=f"fakeec2-{self.port}")
            self._driver = subprocess.Popen(
                self.host.exec_argv(sys.executable, "-m", "lab.fakeec2", "driver", "--endpoint",
                                    f"http://127.0.0.1:{self.port}", "--region", self.region),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True)
            ready = self._read(timeout, watch=self.process)
            if "ok" in ready:
                return self
            self._stop_driver()
            self.process.stop()
            if "already in use" not in self.process.log_text():
                raise LabError(f"fakeec2 did not start: {ready}; log:\n{self.process.log_text()[-2000:]}")
            self.port = random.randint(20000, 40000)
        raise LabError("fakeec2: no free port after 5 tries")

    def _read(self, timeout: float, watch: LabProcess | None = None) -> dict:
        """One answer line from the driver; {"error": ...} when `watch` (the server) dies first."""
        assert self._driver is not None and self._driver.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self._driver.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        try:
            wait_for(lambda: not t.is_alive() or (watch is not None and not watch.alive), timeout,
                     "an answer from the fakeec2 driver")
        except WaitTimeout:
            raise LabError(f"fakeec2 driver gave no answer within {timeout}s") from None
        if t.is_alive():  # the server died first
            return {"error": {"code": "ServerExited", "message": f"exit {watch.returncode}"}}  # type: ignore[union-attr]
        if not box or not box[0]:
            raise LabError("fakeec2 driver closed its output without an answer")
        return json.loads(box[0])

    def call(self, op: str, service: str = "ec2", **args: Any) -> Any:
        """A boto3 call (snake_case op name, boto3 keyword args); raises Ec2Error on an API error."""
        with self._lock:
            assert self._driver is not None and self._driver.stdin is not None
            self._driver.stdin.write(json.dumps({"op": op, "service": service, "args": args}) + "\n")
            self._driver.stdin.flush()
            out = self._read(60)
        if "error" in out:
            raise Ec2Error(out["error"]["code"], out["error"]["message"])
        return out["ok"]

    def faults(self, rules: list[dict]) -> None:
        """Replace the server's fault rules (see the module docstring); [] ends them."""
        self.call("faults", rules=rules)

    def _stop_driver(self) -> None:
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.stdin.close()  # type: ignore[union-attr]
            try:
                self._driver.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait(timeout=2)
            self._driver = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.unblock()
        self._stop_driver()
        if self.process is not None:
            self.process.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.fakeec2")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--route-limit", type=int, default=DEFAULT_ROUTE_LIMIT)
    d = sub.add_parser("driver")
    d.add_argument("--endpoint", required=True)
    d.add_argument("--region", default="eu-west-1")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.host, a.port, a.route_limit)
    else:
        drive(a.endpoint, a.region)


if __name__ == "__main__":
    main()
