"""An EC2 instance metadata service (IMDS) for tests, and the helper that puts metadata servers at
169.254.169.254 inside a lab host.

Server (inside a host namespace)::

    python -m lab.fakemeta --instance-id i-0abc --region eu-west-1 \\
        [--az eu-west-1a] [--local-ipv4 192.168.100.1] [--mode optional|required|v1|disabled] \\
        [--token-answer-lost] \\
        [--role NAME --access-key AK --secret-key SK] [--address 169.254.169.254] [--port 80]

What it answers, as EC2 does:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` → a session
  token (IMDSv2); 400 without/with a bad TTL header; 403 when ``X-Forwarded-For`` is present.
  ``--mode v1`` emulates an IMDS without IMDSv2: the PUT gets 405. ``--token-answer-lost``: the
  PUT is read but its answer never comes (held until the client gives up), as when the
  instance's ``HttpPutResponseHopLimit`` is lower than the caller's distance (a container behind
  a bridge with the default hop limit 1: the answer's TTL runs out on the way).
* ``--mode disabled``: the service is turned off (``HttpEndpoint=disabled``): every request gets
  403 Forbidden.
* ``GET /latest/meta-data/{instance-id,placement/region,placement/availability-zone,local-ipv4}``,
  ``/latest/dynamic/instance-identity/document`` (JSON) and, with ``--role``,
  ``/latest/meta-data/iam/security-credentials/`` + ``.../<role>`` (temporary credentials JSON).
  A bad token is 401; no token is 401 with ``--mode required``, served otherwise.

Every request is logged as one line (``GET /path v2`` / ``v1``), so tests can see which flavour
the client used.

Lab API::

    p = start_metadata_server(host, [sys.executable, "-m", "lab.fakemeta", ...])
        # adds 169.254.169.254/32 to the host's lo (inside the host namespace) and waits until
        # the server answers; returns the LabProcess (stopped with the lab)
"""

from __future__ import annotations

import argparse
import json
import secrets
import socketserver
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .netns import Host, LabProcess

LINK_LOCAL = "169.254.169.254"
LOST_ANSWER_HOLD = 30.0  # seconds a "lost" token answer is held back (clients time out well before)


def start_metadata_server(host: Host, argv: Sequence[str], timeout: float = 15,
                          address: str = LINK_LOCAL) -> LabProcess:
    """Run a metadata server (argv) in host's namespace at address:80 and wait until it listens."""
    present = host.ip("-4", "addr", "show", "dev", "lo")
    if f"inet {address}/" not in present:
        host.ip("addr", "add", f"{address}/32", "dev", "lo")
    proc = host.popen(*argv, name=f"{host.name}-metadata")
    proc.wait_log("listening", timeout, what=f"the metadata server on {host.name}")
    return proc


class _Imds(BaseHTTPRequestHandler):
    server: ImdsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, code: int, body: str = "", ctype: str = "text/plain", headers: dict | None = None) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:  # noqa: N802 - stdlib name
        s = self.server
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        print(f"PUT {self.path}", flush=True)
        if s.mode == "disabled":
            return self._send(403, "Forbidden")
        if self.path != "/latest/api/token":
            return self._send(404, "Not Found")
        if s.a.token_answer_lost:
            time.sleep(LOST_ANSWER_HOLD)  # the answer "never arrives": the client times out first
            self.close_connection = True
            return None
        if s.mode == "v1":
            return self._send(405, "Method Not Allowed")
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, "Bad Request")
        token = secrets.token_urlsafe(32)
        s.tokens[token] = time.monotonic() + int(ttl)
        self._send(200, token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        s = self.server
        token = self.headers.get("X-aws-ec2-metadata-token")
        print(f"GET {self.path} {'v2' if token else 'v1'}", flush=True)
        if s.mode == "disabled":
            return self._send(403, "Forbidden")
        if token is not None:
            if s.tokens.get(token, 0) < time.monotonic():
                return self._send(401, "Unauthorized")
        elif s.mode == "required":
            return self._send(401, "Unauthorized")
        body = s.answer(self.path)
        if body is None:
            return self._send(404, "Not Found")
        ctype = "application/json" if body.startswith("{") else "text/plain"
        self._send(200, body, ctype)


class QuickHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer without the reverse DNS lookup of its own address in server_bind (a
    lab namespace has no DNS: the lookup would stall start-up for the resolver's timeouts)."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class ImdsServer(QuickHTTPServer):

    def __init__(self, addr: tuple[str, int], a: argparse.Namespace):
        super().__init__(addr, _Imds)
        self.mode = a.mode
        self.tokens: dict[str, float] = {}
        self.a = a

    def answer(self, path: str) -> str | None:
        a = self.a
        az = a.az or f"{a.region}a"
        md = {
            "instance-id": a.instance_id,
            "placement/region": a.region,
            "placement/availability-zone": az,
            "local-ipv4": a.local_ipv4 or "",
            "ami-id": "ami-12c6146b",
            "instance-type": "t3.micro",
        }
        path = path.split("?", 1)[0]
        if path in ("/latest/meta-data", "/latest/meta-data/"):
            return "\n".join(sorted({k.split("/")[0] + ("/" if "/" in k else "") for k in md}))
        if path.startswith("/latest/meta-data/iam/security-credentials"):
            if not a.role:
                return None
            rest = path.removeprefix("/latest/meta-data/iam/security-credentials").strip("/")
            if rest == "":
                return a.role
            if rest != a.role:
                return None
            now = datetime.now(UTC)
            return json.dumps({
                "Code": "Success", "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "Type": "AWS-HMAC",
                "AccessKeyId": a.access_key, "SecretAccessKey": a.secret_key, "Token": "fake-session-token",
                "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            })
        if path.startswith("/latest/meta-data/"):
            return md.get(path.removeprefix("/latest/meta-data/").rstrip("/"))
        if path == "/latest/dynamic/instance-identity/document":
            return json.dumps({
                "accountId": "123456789012", "architecture": "x86_64", "availabilityZone": az,
                "imageId": "ami-12c6146b", "instanceId": a.instance_id, "instanceType": "t3.micro",
                "privateIp": a.local_ipv4 or "", "region": a.region, "version": "2017-09-30",
            }, indent=2)
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.fakemeta")
    p.add_argument("--instance-id", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--az", default="")
    p.add_argument("--local-ipv4", default="")
    p.add_argument("--mode", choices=("optional", "required", "v1", "disabled"), default="optional")
    p.add_argument("--token-answer-lost", action="store_true")
    p.add_argument("--role", default="")
    p.add_argument("--access-key", default="")
    p.add_argument("--secret-key", default="")
    p.add_argument("--address", default=LINK_LOCAL)
    p.add_argument("--port", type=int, default=80)
    a = p.parse_args(argv)
    srv = ImdsServer((a.address, a.port), a)
    print(f"fakemeta: EC2 IMDS for {a.instance_id} ({a.region}, mode {a.mode}) listening on "
          f"{a.address}:{a.port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
