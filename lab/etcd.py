"""Real etcd 3.4 servers inside a lab namespace, plus helpers to read/write them as a user would.

Public API::

    etcd = EtcdServer(lab, ns=None, ip="192.168.100.254", name="etcd0", enable_v2=True,
                      tls=None, client_cert_auth=False, client_port=None, peer_port=None,
                      initial_cluster=None, cluster_token=None, heartbeat_ms=None,
                      election_ms=None, auth_token_ttl=None, extra_args=(), data_dir=None)
    etcd.start(wait=True, timeout=10) -> EtcdServer      # or lab.start_etcd(**same kwargs)
    etcd.endpoint        # "http://192.168.100.254:PORT" ("https://..." with tls), as hosts see it
    etcd.local_endpoint  # "http://127.0.0.1:PORT" inside the etcd namespace
    etcd.client_port, etcd.peer_port, etcd.peer_url, etcd.data_dir, etcd.process, etcd.alive
    etcd.wait_healthy(timeout=10); etcd.healthy() -> bool
    etcd.stop(timeout=5) -> int; etcd.kill(); etcd.restart(wait=True) (same data dir and ports)
    etcd.etcdctl("get", "k", check=True) -> str          # ETCDCTL_API=3 inside the namespace,
                                                       # with TLS flags and root auth added
    etcd.put(key, value, ttl=None) -> lease id (hex str) or None
    etcd.get(key) -> str | None;  etcd.get_prefix(prefix) -> dict[str, str]; etcd.delete(key) -> int
    etcd.revision() -> int; etcd.compact(rev, physical=True); etcd.defrag()
    etcd.v2_put(key, value, ttl=None) -> dict; etcd.v2_get(key) -> str | None; etcd.v2_delete(key)
    etcd.enable_auth(user="flannel", password="flannelpw", prefix="/coreos.com/network/",
                     root_password="rootpw", role=None)
    etcd.curl(path, *curl_args) -> CompletedProcess        # curl on local_endpoint (+ TLS flags)
    with etcd.partitioned(host): ...   # silent partition: the switch DROPs host<->etcd packets
    etcd.slow_endpoint(6.0) -> URL     # through a proxy adding 6 s to each round trip (lab.delayproxy)

    cluster = EtcdCluster(lab, size=3, ns=None, enable_v2=True, tls=None)   # members etcd0..2
    cluster.start(timeout=15); cluster.members; cluster.endpoints ("a,b,c"); cluster.endpoint_list
    cluster.wait_healthy(); cluster.stop(); cluster[i] -> EtcdServer
    cluster.leader() -> EtcdServer | None; cluster.wait_leader(timeout=10) -> EtcdServer

    tls = make_tls_certs(dir, ips=("192.168.100.254", "127.0.0.1"), client_cn="client")
    tls.ca, tls.server_cert, tls.server_key, tls.client_cert, tls.client_key (Paths)
    cert, key = make_client_cert(tls, dir, name="expired", not_before=-10 * DAY, not_after=-DAY)
        # another client cert signed by the lab CA, validity relative to now (seconds)

Servers are processes of the lab (stopped on lab.close()); data dirs live in lab.tmp.
The first server started in a lab becomes ``lab.etcd`` (used by start_daemon as default).
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .netns import UNDERLAY_GW, Lab, LabError, LabProcess, run
from .wait import WaitTimeout, wait_for

PORT_RANGE = (20000, 40000)
_BIND_ERRORS = ("address already in use", "bind:")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a test CA, a server cert/key and a client cert/key (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def ca_key(self) -> Path:
        """The CA's private key (make_tls_certs writes it next to the CA certificate)."""
        return self.ca.with_name("ca-key.pem")


def make_tls_certs(directory: str | Path, ips: Sequence[str] = (UNDERLAY_GW, "127.0.0.1"),
                   client_cn: str = "client", dns: Sequence[str] = ("localhost",)) -> TlsFiles:
    """Create a CA, a server cert (SAN: ips + dns, server+client auth) and a client cert with openssl.

    ECDSA P-256 keys, so it takes ~30 ms.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem",
                     d / "client-key.pem")
    ca_key = d / "ca-key.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca, "-days", "3650",
         "-subj", "/CN=pyflanneld-lab-ca", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    san = ",".join([f"IP:{i}" for i in ips] + [f"DNS:{n}" for n in dns])

    def leaf(cert: Path, key: Path, cn: str, ext: str) -> None:
        csr = cert.with_suffix(".csr")
        extfile = cert.with_suffix(".ext")
        extfile.write_text(ext)
        run(["openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key,
             "-CAcreateserial", "-out", cert, "-days", "3650", "-extfile", extfile])
        csr.unlink()
        extfile.unlink()

    leaf(files.server_cert, files.server_key, "etcd-server",
         f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
         "keyUsage=critical,digitalSignature,keyEncipherment\n")
    leaf(files.client_cert, files.client_key, client_cn,
         "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    return files


DAY = 86400


def make_client_cert(tls: TlsFiles, directory: str | Path, name: str = "client2", cn: str = "client",
                     not_before: float = -60, not_after: float = 3650 * DAY) -> tuple[Path, Path]:
    """Another client certificate signed by tls's CA, valid from now+not_before to now+not_after
    (seconds; negative = in the past: an expired certificate). Returns (cert, key) paths, key 0600.

    Made with the `cryptography` package, because Debian 12's `openssl x509` cannot set a start
    date (its -not_before/-not_after came in OpenSSL 3.4).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(seconds=not_before))
            .not_valid_after(now + datetime.timedelta(seconds=not_after))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = d / f"{name}.pem", d / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode(errors="replace")


class EtcdServer:
    """One etcd member running inside a lab namespace (default: the switch namespace)."""

    def __init__(self, lab: Lab, *, ns: str | None = None, ip: str = UNDERLAY_GW, name: str = "etcd0",
                 enable_v2: bool = True, tls: TlsFiles | None = None, client_cert_auth: bool = False,
                 client_port: int | None = None, peer_port: int | None = None,
                 initial_cluster: str | None = None, cluster_token: str | None = None,
                 heartbeat_ms: int | None = None, election_ms: int | None = None,
                 auth_token_ttl: int | None = None,
                 extra_args: Sequence[str] = (), data_dir: str | Path | None = None):
        self.lab = lab
        self.ns = ns or lab.switch.ns
        self.ip = ip
        self.name = name
        self.enable_v2 = enable_v2
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self._auto_ports = client_port is None and peer_port is None and initial_cluster is None
        self.client_port = client_port or random.randint(*PORT_RANGE)
        self.peer_port = peer_port or self._other_port(self.client_port)
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token or f"lab-{lab.id}"
        # A single member elects itself at once; a short election timeout only speeds up clusters.
        self.heartbeat_ms = heartbeat_ms or (50 if initial_cluster else 25)
        self.election_ms = election_ms or (500 if initial_cluster else 250)
        self.auth_token_ttl = auth_token_ttl  # seconds an idle simple auth token lives (etcd: 300)
        self.extra_args = list(extra_args)
        self.data_dir = Path(data_dir) if data_dir else lab.tmp / f"etcd-{name}-{id(self):x}.data"
        self.process: LabProcess | None = None
        self.root_auth: str | None = None  # "root:password" once auth is enabled
        self._started_once = False
        lab.etcds.append(self)
        if lab.etcd is None:
            lab.etcd = self

    @staticmethod
    def _other_port(p: int) -> int:
        while True:
            q = random.randint(*PORT_RANGE)
            if q != p:
                return q

    # --- addresses ---------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        """Client URL as seen from the lab's hosts."""
        return f"{self.scheme}://{self.ip}:{self.client_port}"

    @property
    def local_endpoint(self) -> str:
        """Client URL on 127.0.0.1 inside the etcd namespace."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    # --- lifecycle ---------------------------------------------------------------------------
    def argv(self) -> list[str]:
        state = "existing" if self._started_once and (self.data_dir / "member").exists() else "new"
        a = [
            "etcd", "--name", self.name, "--data-dir", str(self.data_dir),
            "--logger=zap", "--log-level=error", "--log-outputs=stderr",
            "--listen-client-urls", f"{self.endpoint},{self.local_endpoint}",
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
        ]
        if self.enable_v2:
            a.append("--enable-v2=true")
        if self.tls:
            a += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key)]
            if self.client_cert_auth:
                a += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        if self.auth_token_ttl is not None:
            a += ["--auth-token-ttl", str(int(self.auth_token_ttl))]
        return a + self.extra_args

    def launch(self) -> LabProcess:
        """Start the etcd process without waiting."""
        if self.alive:
            raise LabError(f"etcd {self.name} is already running")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # At lab close a cluster member may wait for a leader transfer to peers that are stopping
        # too: nothing to save then, so SIGKILL soon.
        grace = 0.5 if self.initial_cluster else 2.0
        self.process = self.lab.spawn(self.ns, self.argv(), name=f"etcd-{self.name}", grace=grace)
        self._started_once = True
        return self.process

    def start(self, wait: bool = True, timeout: float = 10) -> EtcdServer:
        """Start etcd and (wait=True) block until /health is true. Retries other ports on bind errors."""
        for attempt in range(5):
            self.launch()
            if not wait:
                return self
            try:
                self.wait_healthy(timeout)
                return self
            except (LabError, WaitTimeout):
                log = self.process.log_text().lower() if self.process else ""
                bind_failed = any(e in log for e in _BIND_ERRORS)
                if not (bind_failed and self._auto_ports and attempt < 4):
                    raise
                self.kill()
                self.client_port = random.randint(*PORT_RANGE)
                self.peer_port = self._other_port(self.client_port)
        raise AssertionError("unreachable")

    def healthy(self) -> bool:
        cp = self.curl("/health", "--max-time", "1", check=False)
        return cp.returncode == 0 and '"health":"true"' in cp.stdout.replace(" ", "")

    def wait_healthy(self, timeout: float = 10) -> None:
        """Poll /health every 20 ms; LabError with the etcd log's tail if etcd exits,
        lab.wait.WaitTimeout (with that tail too) on timeout."""
        def healthy() -> bool:
            if self.process is not None and not self.process.alive:
                raise LabError(f"etcd {self.name} exited with {self.process.returncode}: "
                               f"{self.process.log_text()[-2000:]}")
            return self.healthy()

        wait_for(healthy, timeout, f"etcd {self.name} healthy at {self.endpoint}", interval=0.02,
                 detail=lambda: self.process.log_text()[-2000:] if self.process else "")

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM and wait (SIGKILL after timeout). Returns the exit code."""
        if self.process is None:
            return None
        return self.process.stop(timeout=timeout)

    def kill(self) -> int | None:
        """SIGKILL (a crash). Returns the exit code."""
        if self.process is None:
            return None
        return self.process.kill()

    def restart(self, wait: bool = True, timeout: float = 10) -> EtcdServer:
        """Stop (if running) and start again with the same data dir and ports."""
        self.stop()
        self.launch()
        if wait:
            self.wait_healthy(timeout)
        return self

    # --- client helpers ----------------------------------------------------------------------
    def _tls_curl_args(self) -> list[str]:
        if not self.tls:
            return []
        a = ["--cacert", str(self.tls.ca)]
        if self.client_cert_auth:
            a += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        return a

    def curl(self, path: str, *args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
        """curl -sS <local_endpoint><path> args... inside the etcd namespace."""
        argv = ["ip", "netns", "exec", self.ns, "curl", "-sS", *self._tls_curl_args(), *args,
                f"{self.local_endpoint}{path}"]
        return run(argv, check=check, timeout=timeout, env={"CURL_CA_BUNDLE": "", "REQUESTS_CA_BUNDLE": ""})

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15, auth: bool = True,
                input: str | None = None) -> str:
        """Run ``etcdctl`` (API v3) in the etcd namespace against this member; returns stdout."""
        argv = ["ip", "netns", "exec", self.ns, "etcdctl", f"--endpoints={self.local_endpoint}"]
        if self.tls:
            argv.append(f"--cacert={self.tls.ca}")
            if self.client_cert_auth:
                argv += [f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if auth and self.root_auth:
            argv.append(f"--user={self.root_auth}")
        argv += [str(a) for a in args]
        return run(argv, check=check, timeout=timeout, input=input, env={"ETCDCTL_API": "3"}).stdout

    def put(self, key: str, value: str, ttl: int | None = None) -> str | None:
        """v3 put; with ttl a lease is granted and attached. Returns the lease id (hex) or None."""
        lease = None
        if ttl is not None:
            out = self.etcdctl("lease", "grant", str(int(ttl)))
            m = re.search(r"lease ([0-9a-f]+) granted", out)
            if not m:
                raise LabError(f"unexpected etcdctl lease grant output: {out!r}")
            lease = m.group(1)
            self.etcdctl("put", f"--lease={lease}", "--", key, value)
        else:
            self.etcdctl("put", "--", key, value)
        return lease

    def _get_json(self, key: str, *flags: str) -> dict:
        return json.loads(self.etcdctl("get", "-w", "json", *flags, "--", key))

    def get(self, key: str) -> str | None:
        kvs = self._get_json(key).get("kvs") or []
        return _unb64(kvs[0]["value"]) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        kvs = self._get_json(prefix, "--prefix").get("kvs") or []
        return {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in kvs}

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete key (or every key under it with prefix=True); returns the number deleted."""
        out = self.etcdctl("del", *(["--prefix"] if prefix else []), "--", key).strip()
        return int(out) if out.isdigit() else 0

    def revision(self) -> int:
        st = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        return int(st[0]["Status"]["header"]["revision"])

    def compact(self, rev: int, physical: bool = True) -> None:
        self.etcdctl("compact", str(rev), *(["--physical"] if physical else []))

    def defrag(self) -> None:
        self.etcdctl("defrag")

    def v2_put(self, key: str, value: str, ttl: int | None = None) -> dict:
        """PUT on the v2 keys API; returns the JSON answer."""
        args = ["-X", "PUT", "--data-urlencode", f"value={value}"]
        if ttl is not None:
            args += ["-d", f"ttl={int(ttl)}"]
        out = self.curl(f"/v2/keys/{quote(key.lstrip('/'))}", *args).stdout
        ans = json.loads(out)
        if "errorCode" in ans:
            raise LabError(f"v2 put {key} failed: {out}")
        return ans

    def v2_get(self, key: str) -> str | None:
        """Value of a v2 key, None when it does not exist."""
        ans = json.loads(self.curl(f"/v2/keys/{quote(key.lstrip('/'))}").stdout)
        if ans.get("errorCode") == 100:
            return None
        if "errorCode" in ans:
            raise LabError(f"v2 get {key} failed: {ans}")
        return ans["node"].get("value")

    def v2_delete(self, key: str, recursive: bool = False) -> bool:
        q = "?recursive=true" if recursive else ""
        ans = json.loads(self.curl(f"/v2/keys/{quote(key.lstrip('/'))}{q}", "-X", "DELETE").stdout)
        return "errorCode" not in ans

    def enable_auth(self, user: str = "flannel", password: str = "flannelpw",
                    prefix: str = "/coreos.com/network/", root_password: str = "rootpw",
                    role: str | None = None) -> None:
        """Create root and user (readwrite on prefix through a role), then enable v3 auth."""
        role = role or f"{user}-role"
        self.etcdctl("user", "add", f"root:{root_password}")
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", "--prefix=true", role, "readwrite", prefix)
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")
        self.root_auth = f"root:{root_password}"

    # --- network faults between a host and this member ---------------------------------------
    @contextlib.contextmanager
    def partitioned(self, host):
        """A silent partition: the switch drops every packet between host and this member's client
        port (no RST, no ICMP), as a failed link or a firewall would. Removed on exit."""
        rules = [["INPUT", "-s", host.address, "-d", self.ip, "-p", "tcp", "--dport", str(self.client_port),
                  "-j", "DROP"],
                 ["OUTPUT", "-s", self.ip, "-d", host.address, "-p", "tcp", "--sport", str(self.client_port),
                  "-j", "DROP"]]
        sw = self.lab.switch
        for r in rules:
            sw.run("iptables", "-w", "-I", *r)
        try:
            yield
        finally:
            for r in rules:
                sw.run("iptables", "-w", "-D", *r, check=False)

    def slow_endpoint(self, round_trip_s: float) -> str:
        """A client URL to this member through a lab.delayproxy.DelayProxy that adds round_trip_s
        to every exchange (this kernel has no tc netem); the proxy stops with the lab."""
        from .delayproxy import DelayProxy

        proxy = DelayProxy(self.lab, self.ip, self.client_port, round_trip_s, ns=self.ns, ip=self.ip).start()
        return f"{self.scheme}://{proxy.address}"

    def __repr__(self) -> str:
        return f"<EtcdServer {self.name} {self.endpoint} ns={self.ns} alive={self.alive}>"


class EtcdCluster:
    """size etcd members in one namespace on different ports, one initial cluster."""

    def __init__(self, lab: Lab, size: int = 3, *, ns: str | None = None, ip: str = UNDERLAY_GW,
                 enable_v2: bool = True, tls: TlsFiles | None = None, client_cert_auth: bool = False,
                 heartbeat_ms: int = 50, election_ms: int = 500):
        ports = random.sample(range(*PORT_RANGE), 2 * size)
        token = f"lab-{lab.id}-c{random.randrange(1 << 16):04x}"
        names = [f"etcd{i}" for i in range(size)]
        initial = ",".join(f"{n}=http://{ip}:{ports[2 * i + 1]}" for i, n in enumerate(names))
        self.lab = lab
        default_was_free = lab.etcd is None
        self.members = [
            EtcdServer(lab, ns=ns, ip=ip, name=n, enable_v2=enable_v2, tls=tls,
                       client_cert_auth=client_cert_auth, client_port=ports[2 * i],
                       peer_port=ports[2 * i + 1], initial_cluster=initial, cluster_token=token,
                       heartbeat_ms=heartbeat_ms, election_ms=election_ms)
            for i, n in enumerate(names)
        ]
        if default_was_free:
            lab.etcd = self

    @property
    def endpoint_list(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoints(self) -> str:
        """Comma-separated client URLs (for --etcd-endpoints)."""
        return ",".join(self.endpoint_list)

    @property
    def endpoint(self) -> str:
        return self.endpoints

    def start(self, timeout: float = 15) -> EtcdCluster:
        for m in self.members:
            m.launch()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.alive:
                m.wait_healthy(max(0.1, deadline - time.monotonic()))

    def leader(self) -> EtcdServer | None:
        """The live member that the live members agree is leader, else None."""
        ids: dict[int, EtcdServer] = {}
        leaders = set()
        for m in self.members:
            if not m.alive:
                continue
            try:
                st = json.loads(m.etcdctl("endpoint", "status", "-w", "json", "--command-timeout=1s"))[0]
            except (LabError, subprocess.CalledProcessError, ValueError, IndexError):
                return None
            ids[int(st["Status"]["header"]["member_id"])] = m
            leaders.add(int(st["Status"].get("leader", 0)))  # 0 (omitted in JSON): no leader
        if len(leaders) == 1 and 0 not in leaders:
            return ids.get(leaders.pop())
        return None

    def wait_leader(self, timeout: float = 10) -> EtcdServer:
        """Wait until the live members agree on a live leader (e.g. after killing the old one).
        Note: a write that was forwarded to a dead leader is lost and times out on the client."""
        return wait_for(self.leader, timeout, "the etcd cluster's live members to agree on a live leader")

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """etcdctl against the first live member."""
        for m in self.members:
            if m.alive:
                return m.etcdctl(*args, check=check)
        raise LabError("no etcd member is running")

    def __getitem__(self, i: int) -> EtcdServer:
        return self.members[i]

    def __len__(self) -> int:
        return len(self.members)
