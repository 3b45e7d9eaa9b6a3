"""The health port (issue 11.3): open on 0.0.0.0 by default, so what any host can send must neither
spill tracebacks nor starve the daemon. Pure request parsing first, then the real daemon in a lab
host: the protocol's answers, and a flood (1,100 slowloris connections + a 100 KB request line)
under a low RLIMIT_NOFILE while a normal client keeps getting /healthz 200 and the daemon keeps
programming peers.
"""

from __future__ import annotations

import json
import sys

import pytest
from e2e_helpers import config
from helpers import PREFIX, http_get, key_of, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.cluster import pyflanneld_argv, start_daemon
from pyflanneld.health import MAX_HEAD_BYTES, BadRequest, Response, parse_request_head, render

PORT = 8471
BAD_LOG = ("Traceback", "Unhandled exception", "out of system resource", "Too many open files",
           "background task failed")


# --- pure -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head,want", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/healthz")),
    (b"HEAD /readyz?verbose=1 HTTP/1.0\n\n", ("HEAD", "/readyz")),
    (b"GET /peers HTTP/1.1\r\n\r\n", ("GET", "/peers")),
    # absolute-form (through a proxy; RFC 9112 3.2.2: a server must accept it, Go's net/http does)
    (b"GET http://10.0.0.1:8471/healthz HTTP/1.1\r\n\r\n", ("GET", "/healthz")),
    (b"HEAD HTTP://[fd00::1]:8471/readyz?x=1 HTTP/1.1\r\n\r\n", ("HEAD", "/readyz")),
    (b"GET https://h HTTP/1.1\r\n\r\n", ("GET", "/")),
])
def test_parse_request_head(head, want):
    assert parse_request_head(head) == want


@pytest.mark.parametrize("head,status", [
    (b"POST /healthz HTTP/1.1\r\n\r\n", 405), (b"DELETE / HTTP/1.1\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400), (b"GET healthz HTTP/1.1\r\n\r\n", 400), (b"GET /healthz HTTP/2\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\n\r\n", 400), (b"G(T / HTTP/1.1\r\n\r\n", 400), (b"\r\n\r\n", 400),
    (b"GET ftp://h/healthz HTTP/1.1\r\n\r\n", 400), (b"GET http:///healthz HTTP/1.1\r\n\r\n", 400),
])
def test_bad_requests(head, status):
    with pytest.raises(BadRequest) as ei:
        parse_request_head(head)
    assert ei.value.status == status


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_bad_request(head):
    try:
        method, path = parse_request_head(head)
    except BadRequest as e:
        assert e.status in (400, 405)
        return
    assert method in ("GET", "HEAD") and path.startswith("/")


def test_render_head_has_no_body():
    resp = Response.text(200, "flanneld is running")
    full, head = render(resp), render(resp, head_only=True)
    assert full.startswith(b"HTTP/1.1 200 OK\r\n") and full.endswith(b"\r\n\r\nflanneld is running")
    assert b"Content-Length: 19\r\n" in head and head.endswith(b"\r\n\r\n")


# --- the daemon's health port in a lab host ------------------------------------------------------

RAW_CLIENT = r"""
import socket, sys, time
port, payload, wait = int(sys.argv[1]), sys.argv[2].encode().decode("unicode_escape").encode("latin-1"), float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
t0 = time.monotonic()
try:
    s.sendall(payload)
except OSError:
    pass
time.sleep(wait)
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    pass
print(round(time.monotonic() - t0, 1))
print(data.decode("latin-1"), end="")
"""


def raw(host, payload: str, wait: float = 0.0) -> tuple[float, str]:
    """Send payload (Python escapes allowed) to the health port; (seconds until closed, response)."""
    out = host.run(sys.executable, "-c", RAW_CLIENT, str(PORT), payload, str(wait), timeout=60).stdout
    secs, _, resp = out.partition("\n")
    return float(secs), resp


@pytest.fixture
def daemon(lab, etcd):
    etcd.put(f"{PREFIX}/config", config({"Type": "alloc"}))
    h = lab.add_host("h1")
    d = start_daemon(h, "--iface", "eth0", "--healthz-port", str(PORT))
    d.wait_subnet_env()
    wait_for(lambda: http_get(h, PORT, "/readyz")[0] == 200, timeout=30, what="/readyz 200")
    return h, d


def test_health_port_answers_only_what_it_should(daemon):
    h, d = daemon
    assert http_get(h, PORT, "/healthz") == (200, "flanneld is running")
    assert http_get(h, PORT, "/nope") == (404, "not found")
    head = h.run("curl", "-s", "-I", f"http://127.0.0.1:{PORT}/readyz").stdout
    assert head.startswith("HTTP/1.1 200 OK") and "Content-Length: 17" in head
    post = h.run("curl", "-s", "-i", "-X", "POST", "-d", "x=1", f"http://127.0.0.1:{PORT}/healthz").stdout
    assert post.startswith("HTTP/1.1 405 Method Not Allowed") and "Allow: GET, HEAD" in post
    assert raw(h, "GARBAGE\\r\\n\\r\\n")[1].startswith("HTTP/1.1 400 Bad Request")
    long_line = "GET /" + "a" * 100_000 + " HTTP/1.1\\r\\n\\r\\n"
    assert raw(h, long_line)[1].startswith("HTTP/1.1 431 Request Header Fields Too Large")
    assert raw(h, "GET /healthz HTTP/1.1\\r\\n" + "X: y\\r\\n" * 2000)[1].startswith("HTTP/1.1 431")
    # a request that never ends is closed at the per-request deadline (5 s), unanswered: by the
    # server, not at the client's own timeout (30 s)
    secs, resp = raw(h, "GET /healthz HTTP/1.1\\r\\nX-Slow: 1\\r\\n", wait=0)
    assert resp == "" and 4 <= secs < 25, secs
    assert MAX_HEAD_BYTES < 100_000
    text = d.log_text()
    assert not [b for b in BAD_LOG if b in text]
    assert d.alive and http_get(h, PORT, "/healthz")[0] == 200


def test_empty_healthz_ip_listens_on_every_address_and_proxies_absolute_form_works(lab, etcd):
    """Upstream listens on Go's ":port" for --healthz-ip= (IPv6 and IPv4); pyflanneld exited with
    'Name or service not known'. A request through a proxy carries an absolute-form target."""
    etcd.put(f"{PREFIX}/config", config({"Type": "alloc"}))
    h = lab.add_host("h1")
    d = start_daemon(h, "--iface", "eth0", "--healthz-port", str(PORT), "--healthz-ip=")
    d.wait_subnet_env()
    for url in (f"http://127.0.0.1:{PORT}/healthz", f"http://[::1]:{PORT}/healthz", f"http://{h.address}:{PORT}/healthz"):
        wait_for(lambda url=url: h.run("curl", "-s", "-g", url, check=False).stdout == "flanneld is running",
                 timeout=30, what=url)
    resp = raw(h, f"GET http://{h.address}:{PORT}/readyz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")[1]
    assert resp.startswith("HTTP/1.1 200 OK") and resp.endswith("flanneld is ready"), resp
    assert d.alive and not [b for b in BAD_LOG if b in d.log_text()]


def test_flood_under_a_low_fd_limit_neither_starves_nor_spills(lab, etcd):
    """1,100 slowloris connections and a 100 KB request line against a daemon limited to 256
    descriptors: a probe keeps getting 200, the daemon keeps programming peers, nothing in the log."""
    etcd.put(f"{PREFIX}/config", config({"Type": "vxlan"}))
    h = lab.add_host("h1")
    d = start_daemon(h, "--iface", "eth0", "--healthz-port", str(PORT),
                     binary=["prlimit", "--nofile=256:256", *pyflanneld_argv()])
    d.wait_subnet_env()
    wait_for(lambda: http_get(h, PORT, "/readyz")[0] == 200, timeout=30, what="/readyz 200")

    flood = h.popen(sys.executable, "-m", "lab.slowloris", "--port", str(PORT), "--connections", "1100",
                    "--interval", "3", "--long-line", "100000", name="slowloris")
    try:
        wait_for(lambda: flood.log_text().count('"connects": ') >= 2, timeout=30, what="the flood running")
        # the daemon's etcd watch and netlink work need descriptors too
        etcd.put(key_of("10.5.77.0/24"), json.dumps({
            "PublicIP": "192.168.100.77", "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:77"}}))
        codes = [http_get(h, PORT, "/healthz")[0] for _ in range(20)]  # one after the other, during the flood
        assert flood.alive, flood.log_text()[-2000:]
        assert set(codes) == {200}, codes
        assert http_get(h, PORT, "/readyz")[0] == 200
        wait_for(lambda: "10.5.77.0/24 via 10.5.77.0 dev flannel.1 onlink" in h.ip("route"),
                 timeout=30, what="the peer's route, programmed during the flood")
        # every client got in at least once, idle connections were closed (not kept), the long line refused
        def flood_stats() -> dict:
            return json.loads(flood.log_text().splitlines()[-1])

        wait_for(lambda: (st := flood_stats())["connects"] >= 1100 and st["closed_by_server"] > 0
                 and st["long_line_status"] in ("431", "closed"), 60, "the flood's figures", detail=flood_stats)
    finally:
        flood.stop()
    text = d.log_text()
    assert not [b for b in BAD_LOG if b in text], text[-3000:]
    assert text.count("health server: connection limit reached") <= 1  # rate-limited, not per connection
    assert d.alive and http_get(h, PORT, "/healthz")[0] == 200
    assert "max_connections=32" in text  # 256 / 8: the rest is the daemon's
