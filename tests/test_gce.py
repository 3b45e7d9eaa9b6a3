"""gce end to end: pyflanneld daemons in lab hosts, each with its own GCE metadata server at
169.254.169.254, against the test Compute API (lab.fakegce: Google's JSON shapes,
error format, global operations, scopes and ROUTES quota) in the lab's switch namespace.

One lab, etcd and Compute API per module (per xdist worker); every test has its own project,
hosts and etcd prefix.
"""

from __future__ import annotations

import json
import secrets
import sys
from ipaddress import IPv4Network

import pytest
from cloud_lab import CloudLab, assert_clean, module_cloud
from helpers import http_get, subnet_of, wait_for

from lab.cluster import Daemon
from lab.fakegce import SCOPE_RO, SCOPE_RW, GceServer
from lab.fakemeta import start_metadata_server
from pyflanneld.backend.gce import route_name, same_resource

ZONE = "europe-west1-b"
NETWORK = "10.1.0.0/16"
CONFIG = {"Network": NETWORK, "Backend": {"Type": "gce"}}
LINK = "https://www.googleapis.com/compute/v1/projects"


class Cloud(CloudLab):
    """The lab, its etcd and Compute API server, and helpers to build projects and instances."""

    prefix_tag = "gce"

    def start_server(self, switch) -> GceServer:
        return GceServer(switch).start()

    @property
    def api(self) -> GceServer:
        return self.server

    def project(self, **settings) -> str:
        name = f"proj-{secrets.token_hex(3)}"
        self.api.update(project=name, networks=["default"], **settings)
        return name

    def host(self, project: str, can_ip_forward: bool = True, scopes: tuple[str, ...] = (SCOPE_RW,),
             mtu: int | None = 1460, network: str = "default", host_project: tuple[str, str] | None = None):
        """A lab host, its instance in the Compute API and its metadata server with a token. With
        host_project (id, number) its NIC is on that Shared VPC host project's `network`."""
        self.n += 1
        h = self.lab.add_host(f"g{self.n}", mtu=mtu)
        h.instance = f"node-{self.n}"
        h.token = f"ya29.{secrets.token_urlsafe(16)}"
        nic_network = f"projects/{host_project[0]}/global/networks/{network}" if host_project else network
        self.api.update(project=project, tokens={h.token: list(scopes)}, instances=[{
            "name": h.instance, "zone": ZONE, "canIpForward": can_ip_forward, "network": nic_network,
            "networkIP": h.address}])
        h.self_link = f"{LINK}/{project}/zones/{ZONE}/instances/{h.instance}"
        h.metadata = start_metadata_server(h, [
            sys.executable, "-m", "lab.fakegce", "metadata", "--project", project, "--zone", ZONE,
            "--instance", h.instance, "--network", network, "--ip", h.address, "--token", h.token,
            "--scopes", ",".join(scopes), *(["--network-project-number", host_project[1]] if host_project else [])])
        return h

    def admin_token(self) -> str:
        t = f"ya29.admin{secrets.token_hex(4)}"
        self.api.update(tokens={t: [SCOPE_RW]})
        return t

    def routes(self, project: str) -> dict[str, dict]:
        code, body = self.api.get(f"/compute/v1/projects/{project}/global/routes", self.admin_token())
        assert code == 200, body
        return {r["name"]: r for r in body.get("items", [])}

    def daemon(self, host, prefix: str, env: dict | None = None, args: tuple = ()) -> Daemon:
        full_env = {"PYFLANNELD_GCE_API_ENDPOINT": self.api.endpoint, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        return self.start(host, prefix, full_env, args)


@pytest.fixture(scope="module")
def cloud():
    yield from module_cloud(Cloud)


@pytest.fixture
def gce(cloud, request):
    cloud.api.update(faults=[])
    yield cloud
    cloud.after_test(request)


def test_route_names_and_links():
    assert route_name(IPv4Network("10.1.5.0/24")) == "flannel-10-1-5-0-24"
    assert route_name(IPv4Network("172.16.128.0/20")) == "flannel-172-16-128-0-20"
    assert same_resource("https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/i",
                         "https://compute.googleapis.com/compute/v1/projects/p/zones/z/instances/i")
    assert not same_resource("https://x/compute/v1/projects/p/zones/z/instances/i", None)


def test_route_inserted_kept_on_shutdown_and_not_rewritten_on_restart(gce):
    """Route flannel-<subnet> → this instance, in the instance's network, priority 1000, after
    waiting for its operation; subnet.env has the interface MTU; a restart finds it in place."""
    project = gce.project()
    h1, h2 = gce.host(project), gce.host(project, mtu=None)
    prefix = gce.config(CONFIG)
    d1, d2 = gce.daemon(h1, prefix), gce.daemon(h2, prefix)
    e1, e2 = d1.wait_subnet_env(30), d2.wait_subnet_env(30)
    assert e1["FLANNEL_MTU"] == "1460" and e2["FLANNEL_MTU"] == str(gce.lab.mtu)
    s1, s2 = subnet_of(e1), subnet_of(e2)
    n1, n2 = route_name(s1), route_name(s2)
    routes = wait_for(lambda: (r := gce.routes(project)) and n1 in r and n2 in r and r,
                      timeout=30, what="both routes")
    r1 = routes[n1]
    assert r1["destRange"] == str(s1) and r1["nextHopInstance"] == h1.self_link and r1["priority"] == 1000
    assert r1["network"] == f"{LINK}/{project}/global/networks/default"
    assert routes[n2]["nextHopInstance"] == h2.self_link
    assert "warnings" not in r1
    lease = json.loads(gce.etcd.get(f"{prefix}/subnets/{s1.network_address}-24"))
    assert lease == {"PublicIP": h1.address, "PublicIPv6": None, "BackendType": "gce"}
    d1.wait_log(r"route created", 30)
    assert "10.1." not in h1.ip("route", "show")  # no kernel programming
    assert d1.stop() == 0
    assert n1 in gce.routes(project)  # kept on shutdown
    inserts = [x for x in gce.api.log() if x == f"POST /compute/v1/projects/{project}/global/routes"]
    assert len(inserts) == 2
    d1.restart()
    d1.wait_log(r"route already in place", 30)
    assert [x for x in gce.api.log() if x == f"POST /compute/v1/projects/{project}/global/routes"] == inserts
    assert not [x for x in gce.api.log() if x.startswith("DELETE") and project in x]
    for d in (d1, d2):
        assert_clean(d)
    assert "GET /computeMetadata/v1/instance/service-accounts/default/token" in h1.metadata.log_text()


def test_stale_route_to_another_instance_is_replaced(gce):
    """A flannel-<subnet> route to another instance is deleted (operation waited for) and ours
    inserted. The API endpoint comes from the config's Backend.Endpoint here."""
    project = gce.project()
    other = gce.host(project)
    h = gce.host(project)
    admin = gce.admin_token()
    code, op = gce.api.post(f"/compute/v1/projects/{project}/global/routes", {
        "name": "flannel-10-1-7-0-24", "destRange": "10.1.7.0/24", "priority": 1000,
        "network": f"projects/{project}/global/networks/default", "nextHopInstance": other.self_link}, admin)
    assert code == 200 and op["kind"] == "compute#operation", op
    wait_for(lambda: "flannel-10-1-7-0-24" in gce.routes(project), timeout=30, what="the stale route")
    prefix = gce.config({"Network": NETWORK, "SubnetMin": "10.1.7.0", "SubnetMax": "10.1.7.0",
                         "Backend": {"Type": "gce", "Endpoint": gce.api.endpoint + "/"}})
    d = gce.daemon(h, prefix, {"PYFLANNELD_GCE_API_ENDPOINT": None})
    assert d.wait_subnet_env(30)["FLANNEL_SUBNET"] == "10.1.7.1/24"
    wait_for(lambda: gce.routes(project).get("flannel-10-1-7-0-24", {}).get("nextHopInstance") == h.self_link,
             30, what="route taken over")
    d.wait_log(rf"deleting conflicting route.*previous={other.self_link}", 30)
    log = [x for x in gce.api.log() if project in x and "routes/flannel-10-1-7-0-24" in x]
    assert "DELETE" in " ".join(log)
    assert_clean(d)


@pytest.mark.parametrize("style", ["operation", "request"])
def test_route_quota_is_one_clear_error_then_recovers(gce, style):
    """A project at its ROUTES quota: QUOTA_EXCEEDED in the operation (or 403 quotaExceeded on
    the request) → one error line naming the quota and the fix; lease kept, daemon up; a higher
    quota is used on the next retry."""
    project = gce.project(route_quota=3, quota_error=style, routes=[
        {"name": f"other-{i}", "destRange": f"172.16.{i}.0/24", "network": f"{LINK}/p/global/networks/default",
         "nextHopGateway": "default-internet-gateway"} for i in range(3)])
    h = gce.host(project)
    prefix = gce.config(CONFIG)
    d = gce.daemon(h, prefix, {"PYFLANNELD_CLOUD_RETRY_INTERVAL": "1"}, args=("--healthz-port", "8481"))
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*route quota exceeded.*", 30).group(0)
    code_body = h.run("curl", "-s", "-w", " %{http_code}", "http://127.0.0.1:8481/readyz", check=False).stdout
    assert code_body.endswith(" 503") and "gce route for our subnet not in place" in code_body, code_body
    code = "QUOTA_EXCEEDED" if style == "operation" else "quotaExceeded"
    assert f"({code}: Quota 'ROUTES' exceeded.  Limit: 3.0 globally.)" in line, line
    assert "ask for a higher ROUTES quota" in line and "level=error" in line
    assert gce.etcd.get(f"{prefix}/subnets/{sn.network_address}-24") is not None
    assert route_name(sn) not in gce.routes(project)
    assert_clean(d)
    gce.api.update(project=project, route_quota=100)
    wait_for(lambda: route_name(sn) in gce.routes(project), 30, what="route after the quota was raised")
    d.wait_log(r"cloud route in place after retrying", 30)
    assert h.run("curl", "-s", "http://127.0.0.1:8481/readyz", check=False).stdout == "flanneld is ready"
    assert_clean(d)


def test_missing_compute_scope_names_the_scope(gce):
    project = gce.project()
    h = gce.host(project, scopes=(SCOPE_RO,))
    d = gce.daemon(h, gce.config(CONFIG))
    d.wait_subnet_env(30)
    line = d.wait_log(r".*insufficientPermissions.*", 30).group(0)
    assert "compute.routes.insert forbidden (403 insufficientPermissions" in line, line
    assert "compute-rw" in line and "level=error" in line
    assert d.log_text().count("insufficientPermissions") == 1  # one line, no library chatter
    assert gce.routes(project) == {}
    assert_clean(d)


def test_instance_without_ip_forwarding_gets_route_and_one_clear_error(gce):
    project = gce.project()
    h = gce.host(project, can_ip_forward=False)
    d = gce.daemon(h, gce.config(CONFIG))
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*cannot forward IP packets.*", 30).group(0)
    assert "enable --can-ip-forward" in line and "level=error" in line
    route = gce.routes(project)[route_name(sn)]
    assert route["nextHopInstance"] == h.self_link
    assert route["warnings"][0]["code"] == "NEXT_HOP_CANNOT_IP_FORWARD"
    d.wait_log(r"GCE operation warning|route created", 30)
    assert_clean(d)


def test_api_outage_is_retried_and_the_route_appears_after(gce):
    project = gce.project()
    h = gce.host(project)
    prefix = gce.config(CONFIG)
    gce.api.block()
    try:
        d = gce.daemon(h, prefix)
        sn = subnet_of(d.wait_subnet_env(30))
        line = d.wait_log(r".*retrying.*unreachable.*", 30).group(0)
        assert gce.api.endpoint in line and "level=warning" in line
        assert_clean(d)
    finally:
        gce.api.unblock()
    wait_for(lambda: route_name(sn) in gce.routes(project), 30, what="route after the outage")
    d.wait_log(r"cloud route in place after retrying", 30)
    assert_clean(d)


def test_no_metadata_server_is_retried_with_a_clear_line(gce):
    """Not on GCE (no metadata server answers): a retried warning naming the address and the
    setting; the daemon is up; once the metadata server appears the route follows."""
    project = gce.project()
    h = gce.host(project)
    h.metadata.stop()
    d = gce.daemon(h, gce.config(CONFIG))
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*GCE metadata server unreachable.*", 30).group(0)
    assert "http://169.254.169.254" in line and "PYFLANNELD_GCE_METADATA_URL" in line
    h.metadata = start_metadata_server(h, h.metadata.argv)
    wait_for(lambda: route_name(sn) in gce.routes(project), 30, what="route once metadata answers")
    assert_clean(d)


# --- convergence: our network only, routes removed from outside, stale routes, error classes -------
HEALTHZ = 8481
FAST_CHECKS = {"PYFLANNELD_CLOUD_CHECK_INTERVAL": "1", "PYFLANNELD_CLOUD_RETRY_INTERVAL": "1"}
ONE_SUBNET = {"Network": NETWORK, "SubnetMin": "10.1.7.0", "SubnetMax": "10.1.7.0", "Backend": {"Type": "gce"}}


def readyz(h) -> tuple[int, str]:
    return http_get(h, HEALTHZ, "/readyz")


def net_link(project: str, network: str) -> str:
    return f"{LINK}/{project}/global/networks/{network}"


def test_route_of_another_network_is_left_alone(gce):
    """Two clusters in one project, networks net-a and net-b, the same Network range: cluster B's
    node leases the subnet A's node routes. B never deletes A's route (route names are unique per
    project): one error line naming both networks, /readyz 503; A's route stays A's."""
    project = gce.project()
    gce.api.update(project=project, networks=["net-a", "net-b"])
    ha, hb = gce.host(project, network="net-a"), gce.host(project, network="net-b")
    da = gce.daemon(ha, gce.config(ONE_SUBNET), FAST_CHECKS)
    da.wait_subnet_env(30)
    name = "flannel-10-1-7-0-24"
    wait_for(lambda: gce.routes(project).get(name, {}).get("nextHopInstance") == ha.self_link,
             30, what="A's route")
    db = gce.daemon(hb, gce.config(ONE_SUBNET), FAST_CHECKS, args=("--healthz-port", str(HEALTHZ)))
    assert db.wait_subnet_env(30)["FLANNEL_SUBNET"] == "10.1.7.1/24"
    line = db.wait_log(r".*route not programmed.*", 30).group(0)
    assert "level=error" in line and "belongs to network net-a, not to ours (net-b)" in line, line
    assert "non-overlapping Network ranges" in line
    code, body = readyz(hb)
    assert code == 503 and "net-a" in body, body
    db.wait_log(r"(?s)route not programmed.*route not programmed", 30)  # a retry ran too
    route = gce.routes(project)[name]
    assert route["nextHopInstance"] == ha.self_link and route["network"] == net_link(project, "net-a")
    assert not [x for x in gce.api.log() if x.startswith("DELETE") and project in x]
    assert "removed or changed by someone else" not in da.log_text()
    assert_clean(da)
    assert_clean(db)


def test_route_removed_from_outside_is_restored_and_readyz_tells(gce):
    """Someone deletes our route: the periodic check (1 s here) notices, /readyz says "route …
    missing in network default" while the insert is rate-limited (rateLimitExceeded, retried
    soon); the route is back once the API lets it through."""
    project = gce.project()
    h = gce.host(project)
    d = gce.daemon(h, gce.config(CONFIG), FAST_CHECKS, args=("--healthz-port", str(HEALTHZ)))
    name = route_name(subnet_of(d.wait_subnet_env(30)))
    wait_for(lambda: name in gce.routes(project), 30, what="route")
    wait_for(lambda: readyz(h)[0] == 200, 30, what="ready")
    gce.api.update(faults=[{"method": "POST", "path": "^global/routes$", "code": 403, "reason": "rateLimitExceeded"}])
    code, _ = gce.api.delete(f"/compute/v1/projects/{project}/global/routes/{name}", gce.admin_token())
    assert code == 200
    code, body = wait_for(lambda: (r := readyz(h))[0] == 503 and r, 30, what="/readyz 503 after the removal")
    assert f"route {name} missing in network default" in body, body
    line = d.wait_log(r".*rateLimitExceeded.*", 30).group(0)
    assert "level=warning" in line and "retrying" in line, line
    line = d.wait_log(r".*removed or changed by someone else.*", 30).group(0)
    assert f"route {name} missing in network default" in line and "level=warning" in line
    gce.api.update(faults=[])
    wait_for(lambda: gce.routes(project).get(name, {}).get("nextHopInstance") == h.self_link, 40,
             what="route restored")
    wait_for(lambda: readyz(h) == (200, "flanneld is ready"), 30, what="ready again")
    assert_clean(d)


def test_stale_routes_of_deleted_instances_are_removed_and_nothing_else(gce):
    """flannel-* routes whose next-hop instance was deleted go, but only those in our network with
    a destination inside Network; other routes (another network, outside Network, not flannel-*,
    a live next hop) stay."""
    project = gce.project()
    gce.api.update(project=project, networks=["other"], instances=[
        {"name": n, "zone": ZONE, "network": net} for n, net in (("gone-1", "default"), ("gone-2", "other"),
                                                                   ("alive", "default"))])
    h = gce.host(project)

    def route(name, dest, inst, network="default"):
        return {"name": name, "destRange": dest, "network": net_link(project, network),
                "nextHopInstance": f"{LINK}/{project}/zones/{ZONE}/instances/{inst}"}

    stale = route("flannel-10-1-9-0-24", "10.1.9.0/24", "gone-1")
    keep = [route("flannel-10-1-10-0-24", "10.1.10.0/24", "gone-2", "other"),
            route("flannel-172-16-0-0-24", "172.16.0.0/24", "gone-1"),
            route("custom-10-1-11-0-24", "10.1.11.0/24", "gone-1"),
            route("flannel-10-1-12-0-24", "10.1.12.0/24", "alive")]
    gce.api.update(project=project, routes=[stale, *keep],
                   delete_instances=[{"name": "gone-1", "zone": ZONE}, {"name": "gone-2", "zone": ZONE}])
    assert gce.routes(project)[stale["name"]]["warnings"][0]["code"] == "NEXT_HOP_INSTANCE_NOT_FOUND"
    d = gce.daemon(h, gce.config(ONE_SUBNET), FAST_CHECKS)
    d.wait_subnet_env(30)
    wait_for(lambda: stale["name"] not in gce.routes(project), 30, what="stale route removed")
    d.wait_log(rf"removed stale route.*route={stale['name']}.*instances/gone-1", 30)
    ours = f"GET /compute/v1/projects/{project}/global/routes/flannel-10-1-7-0-24"  # only the daemon reads it
    seen = gce.api.log().count(ours)
    wait_for(lambda: gce.api.log().count(ours) >= seen + 2, 30, what="a whole pass after the removal")
    assert set(gce.routes(project)) == {r["name"] for r in keep} | {"flannel-10-1-7-0-24"}
    deletes = [x for x in gce.api.log() if x.startswith("DELETE") and project in x]
    assert deletes == [f"DELETE /compute/v1/projects/{project}/global/routes/{stale['name']}"], deletes
    assert_clean(d)


def test_resource_not_ready_is_retried_soon(gce):
    """400 resourceNotReady (another operation on the route still running) clears up by itself:
    retried with backoff (warning), not after the 60 s for errors a person must fix."""
    project = gce.project()
    h = gce.host(project)
    gce.api.update(faults=[{"method": "POST", "path": "^global/routes$", "code": 400, "reason": "resourceNotReady",
                            "count": 2}])
    d = gce.daemon(h, gce.config(CONFIG))
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*resourceNotReady.*", 30).group(0)
    assert "level=warning" in line and "retrying" in line and "is not ready" in line, line
    wait_for(lambda: route_name(sn) in gce.routes(project), 30, what="route after resourceNotReady")
    d.wait_log(r"cloud route in place after retrying", 30)
    assert "level=error" not in d.log_text()
    assert_clean(d)


def test_shared_vpc_routes_go_to_the_host_project(gce):
    """The NIC's network path names another project (projects/<host number>/networks/shared): a
    Shared VPC. networks.get asks the host project; a 404 there is one line with the hint; once
    the network exists the route goes into the host project, next hop = our address (a host
    project's route cannot name a service project's instance)."""
    service = gce.project()
    host_project = f"host-{secrets.token_hex(3)}"
    number = gce.api.update(project=host_project)["number"]
    h = gce.host(service, network="shared", host_project=(host_project, number))
    d = gce.daemon(h, gce.config(CONFIG), FAST_CHECKS)
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*networks.get.*404.*", 30).group(0)
    assert f"Shared VPC network of host project {number}" in line and "roles/compute.networkAdmin" in line, line
    gce.api.update(project=host_project, networks=["shared"])
    name = route_name(sn)
    wait_for(lambda: name in gce.routes(host_project), 30, what="route in the host project")
    route = gce.routes(host_project)[name]
    assert route["network"] == net_link(host_project, "shared") and route["nextHopIp"] == h.address, route
    assert "nextHopInstance" not in route and gce.routes(service) == {}
    d.wait_log(r"GCE Shared VPC: routes go to the host project", 30)
    assert_clean(d)
