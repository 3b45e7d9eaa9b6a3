"""aws-vpc end to end: pyflanneld daemons in lab hosts, each with its own EC2 instance metadata
service at 169.254.169.254, against moto's EC2 server (lab.fakeec2: moto plus AWS's
route limit, blackhole routes and UnauthorizedOperation) running in the lab's switch namespace.

What is asserted is what an operator would check: the VPC route table, the ENI attributes,
subnet.env, the lease in etcd, and the daemon's log (one clear line per error, no traceback).

One lab, etcd and EC2 server per module (per xdist worker); every test has its own VPC, hosts
and etcd prefix.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cloud_lab import CloudLab, assert_clean, module_cloud
from helpers import http_get, subnet_of, wait_for

from lab.cluster import Daemon
from lab.fakeec2 import Ec2Error, Ec2Server
from lab.fakemeta import start_metadata_server
from pyflanneld.backend import BackendContext, BackendError, ExternalInterface
from pyflanneld.backend.awsvpc import AwsVpcBackend, parse_route_tables
from pyflanneld.config import parse_config

REGION = "eu-west-1"
NETWORK = "10.1.0.0/16"
CONFIG = {"Network": NETWORK, "Backend": {"Type": "aws-vpc"}}
NO_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


# --- the module's cloud -------------------------------------------------------------------------
class Cloud(CloudLab):
    """The lab, its etcd and EC2 server, and helpers to build VPCs and instances."""

    prefix_tag = "aws"

    def start_server(self, switch) -> Ec2Server:
        return Ec2Server(switch, region=REGION).start()

    @property
    def ec2(self) -> Ec2Server:
        return self.server

    def call(self, op: str, **kw):
        return self.ec2.call(op, **kw)

    def vpc(self, associate_table: bool = False) -> dict:
        """A VPC 192.168.0.0/16 with the lab's underlay as subnet; optionally its own route table."""
        vpc = self.call("create_vpc", CidrBlock="192.168.0.0/16")["Vpc"]["VpcId"]
        subnet = self.call("create_subnet", VpcId=vpc, CidrBlock="192.168.100.0/24")["Subnet"]["SubnetId"]
        main = self.tables(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                    {"Name": "association.main", "Values": ["true"]}])[0]["RouteTableId"]
        igw = self.call("create_internet_gateway")["InternetGateway"]["InternetGatewayId"]
        self.call("attach_internet_gateway", InternetGatewayId=igw, VpcId=vpc)
        out = {"vpc": vpc, "subnet": subnet, "main": main, "igw": igw, "table": main}
        if associate_table:
            rt = self.call("create_route_table", VpcId=vpc)["RouteTable"]["RouteTableId"]
            self.call("associate_route_table", RouteTableId=rt, SubnetId=subnet)
            out["table"] = rt
        return out

    def tables(self, **kw) -> list[dict]:
        return self.call("describe_route_tables", **kw)["RouteTables"]

    def routes(self, table: str) -> dict[str, dict]:
        """destination → route of one table."""
        t = self.tables(RouteTableIds=[table])[0]
        return {r["DestinationCidrBlock"]: r for r in t["Routes"] if "DestinationCidrBlock" in r}

    def host(self, vpc: dict, mtu: int | None = None, imds: str = "optional", role: tuple[str, str] | None = None,
             meta_at: tuple[str, int] = ("169.254.169.254", 80), imds_args: tuple[str, ...] = ()):
        """A lab host, its EC2 instance (primary ENI = the host's address) and its metadata server."""
        self.n += 1
        h = self.lab.add_host(f"a{self.n}", mtu=mtu)
        inst = self.call("run_instances", ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=vpc["subnet"],
                         PrivateIpAddress=h.address)["Instances"][0]
        h.instance_id = inst["InstanceId"]
        h.eni = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
        argv = [sys.executable, "-m", "lab.fakemeta", "--instance-id", h.instance_id, "--region", REGION,
                "--local-ipv4", h.address, "--mode", imds, "--address", meta_at[0], "--port", str(meta_at[1]),
                *imds_args]
        if role:
            argv += ["--role", "flannel-node", "--access-key", role[0], "--secret-key", role[1]]
        h.metadata = start_metadata_server(h, argv, address=meta_at[0])
        return h

    def daemon(self, host, prefix: str, env: dict | None = None, *args: str) -> Daemon:
        full_env = {**NO_FILES, "PYFLANNELD_AWS_ENDPOINT": self.ec2.endpoint, **(env if env is not None else KEYS)}
        return self.start(host, prefix, full_env, args)

    def eni(self, eni_id: str) -> dict:
        return self.call("describe_network_interfaces", NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]


@pytest.fixture(scope="module")
def cloud():
    yield from module_cloud(Cloud)


@pytest.fixture
def aws(cloud, request):
    cloud.ec2.faults([])
    yield cloud
    cloud.after_test(request)


# --- unit: settings -----------------------------------------------------------------------------
def test_route_table_id_forms():
    assert parse_route_tables(None) == []
    assert parse_route_tables("rtb-1") == ["rtb-1"]
    assert parse_route_tables(["rtb-1", "rtb-2"]) == ["rtb-1", "rtb-2"]
    assert parse_route_tables(["rtb-2", "rtb-1", "rtb-2", "rtb-1"]) == ["rtb-2", "rtb-1"]  # each table once
    for bad in (5, [], ["rtb-1", 3], {"a": 1}):
        with pytest.raises(BackendError, match="RouteTableID"):
            parse_route_tables(bad)


def test_endpoints_from_env_then_config(monkeypatch):
    cfg = parse_config(json.dumps({"Network": NETWORK, "Backend": {
        "Type": "aws-vpc", "Endpoint": "http://ec2.example:1", "MetadataEndpoint": "http://md.example/"}}).encode())
    ip = IPv4Address("192.168.100.1")
    ext = ExternalInterface("eth0", 2, ip, ip, mtu=9001)
    monkeypatch.delenv("PYFLANNELD_AWS_ENDPOINT", raising=False)
    monkeypatch.delenv("PYFLANNELD_AWS_METADATA_URL", raising=False)
    b = AwsVpcBackend(BackendContext(cfg, cfg.backend, ext, None))
    b.check_dependencies()
    assert (b.endpoint, b.metadata_url) == ("http://ec2.example:1", "http://md.example")
    monkeypatch.setenv("PYFLANNELD_AWS_ENDPOINT", "http://other:2")
    b.check_dependencies()
    assert b.endpoint == "http://other:2"


# --- the daemon against the EC2 API ---------------------------------------------------------------
def test_two_daemons_route_their_subnets_to_their_enis(aws):
    """Two instances in one VPC (main table found by auto-detection): one route each, to the right
    ENI; source/dest check off on both; subnet.env carries the interface MTU; IMDSv2 used. The
    second host has no keys in its environment: its credentials come from the instance role."""
    vpc = aws.vpc()
    h1 = aws.host(vpc, mtu=9001)
    h2 = aws.host(vpc, role=("AKIAROLEKEY", "rolesecret"))
    prefix = aws.config(CONFIG)
    d1 = aws.daemon(h1, prefix)
    d2 = aws.daemon(h2, prefix, env={})
    e1, e2 = d1.wait_subnet_env(30), d2.wait_subnet_env(30)
    assert e1["FLANNEL_MTU"] == "9001" and e2["FLANNEL_MTU"] == str(h2.mtu)
    s1, s2 = subnet_of(e1), subnet_of(e2)
    routes = wait_for(lambda: (r := aws.routes(vpc["main"])) and str(s1) in r and str(s2) in r and r,
                      timeout=30, what="both routes")
    assert routes[str(s1)]["NetworkInterfaceId"] == h1.eni and routes[str(s1)]["State"] == "active"
    assert routes[str(s2)]["NetworkInterfaceId"] == h2.eni
    assert set(routes) == {"192.168.0.0/16", str(s1), str(s2)}
    assert aws.eni(h1.eni)["SourceDestCheck"] is False and aws.eni(h2.eni)["SourceDestCheck"] is False
    lease = json.loads(aws.etcd.get(f"{prefix}/subnets/{s1.network_address}-24"))
    assert lease == {"PublicIP": h1.address, "PublicIPv6": None, "BackendType": "aws-vpc"}
    for d in (d1, d2):
        d.wait_log(r"route created", 30)
        assert_clean(d)
    assert "GET /latest/meta-data/instance-id v2" in h1.metadata.log_text()
    assert "v1" not in h1.metadata.log_text()
    # no kernel programming: no flannel device, no route for the pod network
    assert "10.1." not in h1.ip("route", "show")


def test_subnet_table_blackholes_restart_and_shutdown(aws):
    """The table associated with the ENI's subnet is chosen (main table untouched); blackhole
    routes inside the Network are removed, others kept; the route stays on shutdown; a restart
    finds it in place (no second route, no write). IMDSv1-only metadata works."""
    vpc = aws.vpc(associate_table=True)
    table = vpc["table"]
    h = aws.host(vpc, imds="v1")
    gone = aws.call("create_network_interface", SubnetId=vpc["subnet"])["NetworkInterface"]["NetworkInterfaceId"]
    aws.call("create_route", RouteTableId=table, DestinationCidrBlock="10.1.99.0/24", NetworkInterfaceId=gone)
    aws.call("create_route", RouteTableId=table, DestinationCidrBlock="172.31.5.0/24", NetworkInterfaceId=gone)
    aws.call("delete_network_interface", NetworkInterfaceId=gone)
    assert aws.routes(table)["10.1.99.0/24"]["State"] == "blackhole"
    prefix = aws.config(CONFIG)
    d = aws.daemon(h, prefix)
    sn = str(subnet_of(d.wait_subnet_env(30)))
    wait_for(lambda: sn in aws.routes(table), timeout=30, what="route in the subnet's table")
    routes = aws.routes(table)
    assert routes[sn]["NetworkInterfaceId"] == h.eni
    assert "10.1.99.0/24" not in routes  # blackhole inside the Network: removed
    assert routes["172.31.5.0/24"]["State"] == "blackhole"  # outside the Network: not ours, kept
    assert set(aws.routes(vpc["main"])) == {"192.168.0.0/16"}
    d.wait_log(r"removed blackhole route.*10\.1\.99\.0/24", 30)
    assert "GET /latest/meta-data/instance-id v1" in h.metadata.log_text()
    assert d.stop() == 0
    assert aws.routes(table)[sn]["NetworkInterfaceId"] == h.eni  # kept on shutdown
    before = aws.routes(table)
    d.restart()
    d.wait_log(r"route already in place", 30)
    assert aws.routes(table) == before
    assert d.log_text().count("route created") == 1
    assert_clean(d)


def test_route_table_list_and_stale_route_replaced(aws):
    """RouteTableID as a list: the route goes into each; a route for our subnet that points at
    another instance's ENI is taken over (ReplaceRoute). The metadata service is elsewhere
    (PYFLANNELD_AWS_METADATA_URL) and hands out the instance-role credentials from there."""
    vpc = aws.vpc()
    t2 = aws.call("create_route_table", VpcId=vpc["vpc"])["RouteTable"]["RouteTableId"]
    h = aws.host(vpc, role=("AKIAROLEKEY", "rolesecret"), meta_at=("127.0.0.1", 8080))
    other = aws.call("create_network_interface", SubnetId=vpc["subnet"])["NetworkInterface"]["NetworkInterfaceId"]
    aws.call("create_route", RouteTableId=vpc["main"], DestinationCidrBlock="10.1.7.0/24", NetworkInterfaceId=other)
    prefix = aws.config({"Network": NETWORK, "SubnetMin": "10.1.7.0", "SubnetMax": "10.1.7.0",
                         "Backend": {"Type": "aws-vpc", "RouteTableID": [vpc["main"], t2]}})
    d = aws.daemon(h, prefix, env={"PYFLANNELD_AWS_METADATA_URL": "http://127.0.0.1:8080"})
    assert d.wait_subnet_env(30)["FLANNEL_SUBNET"] == "10.1.7.1/24"
    wait_for(lambda: "10.1.7.0/24" in aws.routes(t2), timeout=30, what="route in the second table")
    assert aws.routes(vpc["main"])["10.1.7.0/24"]["NetworkInterfaceId"] == h.eni
    assert aws.routes(t2)["10.1.7.0/24"]["NetworkInterfaceId"] == h.eni
    d.wait_log(rf"route replaced.*previous={other}", 30)
    assert "GET /latest/meta-data/iam/security-credentials/flannel-node v2" in h.metadata.log_text()
    assert_clean(d)


def test_full_route_table_is_one_clear_error_then_recovers(aws):
    """50 routes in the table: CreateRoute fails with RouteLimitExceeded → one error line naming
    the table, the quota and the fixes; lease kept, daemon up. A freed slot is used on the retry."""
    vpc = aws.vpc()
    table = vpc["main"]
    for i in range(50):
        aws.call("create_route", RouteTableId=table, DestinationCidrBlock=f"172.16.{i}.0/24", GatewayId=vpc["igw"])
    with pytest.raises(Ec2Error, match="RouteLimitExceeded"):  # the limit is real
        aws.call("create_route", RouteTableId=table, DestinationCidrBlock="172.17.0.0/24", GatewayId=vpc["igw"])
    h = aws.host(vpc)
    prefix = aws.config(CONFIG)
    d = aws.daemon(h, prefix, {**KEYS, "PYFLANNELD_CLOUD_RETRY_INTERVAL": "1"})
    sn = subnet_of(d.wait_subnet_env(30))
    line = d.wait_log(r".*RouteLimitExceeded.*", 30).group(0)
    assert f"route table {table} is full (RouteLimitExceeded)" in line
    assert "50 routes per table" in line and "quota" in line and "level=error" in line
    assert aws.etcd.get(f"{prefix}/subnets/{sn.network_address}-24") is not None
    assert_clean(d)
    aws.call("delete_route", RouteTableId=table, DestinationCidrBlock="172.16.0.0/24")
    wait_for(lambda: str(sn) in aws.routes(table), 30, what="route after a slot was freed")
    d.wait_log(r"cloud route in place after retrying", 30)
    assert_clean(d)


def test_permission_denied_names_the_iam_action(aws):
    """IAM enforced, the node's policy lacks ec2:CreateRoute: one error line naming the action and
    the fix; the daemon stays up; once the permission is granted the route appears."""
    vpc = aws.vpc()
    h = aws.host(vpc)
    iam = {"service": "iam"}
    allow = ["ec2:DescribeInstances", "ec2:DescribeRouteTables", "ec2:ModifyNetworkInterfaceAttribute"]
    user = f"node{secrets.token_hex(3)}"

    def policy(actions):
        return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})

    aws.call("create_user", **iam, UserName=user)
    aws.call("put_user_policy", **iam, UserName=user, PolicyName="flannel", PolicyDocument=policy(allow))
    key = aws.call("create_access_key", **iam, UserName=user)["AccessKey"]
    admin = f"admin{secrets.token_hex(3)}"
    aws.call("create_user", **iam, UserName=admin)
    aws.call("put_user_policy", **iam, UserName=admin, PolicyName="all", PolicyDocument=policy("*"))
    akey = aws.call("create_access_key", **iam, UserName=admin)["AccessKey"]
    prefix = aws.config(CONFIG)
    aws.call("reset_auth", count=0)
    try:
        aws.call("credentials", key=akey["AccessKeyId"], secret=akey["SecretAccessKey"])
        d = aws.daemon(h, prefix, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                                   "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                                   "PYFLANNELD_CLOUD_RETRY_INTERVAL": "1"})
        sn = subnet_of(d.wait_subnet_env(30))
        line = d.wait_log(r".*denied.*", 30).group(0)
        assert ("ec2:CreateRoute denied (UnauthorizedOperation): grant it to the instance role" in line
                and "level=error" in line), line
        assert aws.eni(h.eni)["SourceDestCheck"] is False  # what was allowed happened
        assert_clean(d)
        aws.call("put_user_policy", **iam, UserName=user, PolicyName="flannel",
                 PolicyDocument=policy([*allow, "ec2:CreateRoute"]))
        wait_for(lambda: str(sn) in aws.routes(vpc["main"]), 30, what="route once permitted")
        assert_clean(d)
    finally:
        aws.call("reset_auth", count="inf")
        aws.call("credentials", key="testing", secret="testing")


def test_no_credentials_is_one_clear_line(aws):
    vpc = aws.vpc()
    h = aws.host(vpc)  # its metadata service has no instance role
    d = aws.daemon(h, aws.config(CONFIG), env={})
    d.wait_subnet_env(30)
    line = d.wait_log(r".*no AWS credentials found.*", 30).group(0)
    assert "instance profile" in line and "AWS_ACCESS_KEY_ID" in line
    assert_clean(d)


def test_api_outage_is_retried_and_the_route_appears_after(aws):
    """EC2 API refusing connections at start: warnings with the endpoint, lease and subnet.env
    anyway, daemon up; when the API is back the route appears (backoff, no restart)."""
    vpc = aws.vpc()
    h = aws.host(vpc)
    prefix = aws.config(CONFIG)
    aws.ec2.block()
    try:
        d = aws.daemon(h, prefix)
        sn = subnet_of(d.wait_subnet_env(30))
        line = d.wait_log(r".*retrying.*unreachable.*", 30).group(0)
        assert aws.ec2.endpoint in line and "level=warning" in line
        wait_for(lambda: len(re.findall(r"retrying.*unreachable", d.log_text())) >= 2,
                 30, "a retry, failing too")
        assert_clean(d)
    finally:
        aws.ec2.unblock()
    wait_for(lambda: str(sn) in aws.routes(vpc["main"]), 30, what="route after the outage")
    assert aws.routes(vpc["main"])[str(sn)]["NetworkInterfaceId"] == h.eni
    d.wait_log(r"cloud route in place after retrying", 30)
    assert_clean(d)


def test_missing_boto3_is_one_line_and_exit_1(aws, tmp_path: Path):
    """Without the cloud extra the daemon ends at start with one line naming the install command."""
    fake = tmp_path / "boto3"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named boto3')\n")
    h = aws.lab.add_host(f"m{secrets.token_hex(2)}")
    d = aws.daemon(h, aws.config(CONFIG), {**KEYS, "PYTHONPATH": str(tmp_path)})
    assert d.wait_exit(15) == 1
    text = d.log_text()
    assert "needs the Python package boto3" in text and "pip install 'pyflanneld[cloud]'" in text
    assert "Traceback" not in text


def test_black_holed_api_holds_readiness_5s_at_most_and_never_the_exit(aws):
    """An EC2 API that never answers (packets dropped): subnet.env comes after the start wait
    (5 s), not after the SDK's timeouts; SIGTERM ends the daemon promptly with a call in flight."""
    vpc = aws.vpc()
    h = aws.host(vpc)
    prefix = aws.config(CONFIG)
    aws.ec2.block(drop=True)
    try:
        d = aws.daemon(h, prefix)
        asked = d.wait_log(r"timestamp=(\S+) .*AWS instance identity", 30)
        went_on = d.wait_log(r"timestamp=(\S+) .*AWS API slow to answer; going on", 30)
        d.wait_subnet_env(30)
        # the daemon's own clock (its log): the start wait, 5 s, not an SDK timeout (read_timeout 15 s)
        waited = (datetime.fromisoformat(went_on[1]) - datetime.fromisoformat(asked[1])).total_seconds()
        assert 4.5 <= waited < 15, waited
        # SIGTERM with the call still in flight: exit 0 well before the SDK's timeout (else SIGKILL)
        assert d.stop(timeout=12) == 0
        assert "Traceback" not in d.log_text()
    finally:
        aws.ec2.unblock()


# --- convergence: every table, routes removed from outside, the table changing under us ----------
HEALTHZ = 8481
FAST_CHECKS = {**KEYS, "PYFLANNELD_CLOUD_CHECK_INTERVAL": "1", "PYFLANNELD_CLOUD_RETRY_INTERVAL": "1"}


def readyz(h) -> tuple[int, str]:
    return http_get(h, HEALTHZ, "/readyz")


def test_one_failing_route_table_does_not_stop_the_others(aws):
    """RouteTableID [mistyped id, full main table, t2]: t2 gets the route at once; one error line
    names both failing tables (with their fixes) and /readyz says which table lacks the route;
    once main has room the route lands there too, and only the mistyped table is reported."""
    vpc = aws.vpc()
    main = vpc["main"]
    t2 = aws.call("create_route_table", VpcId=vpc["vpc"])["RouteTable"]["RouteTableId"]
    for i in range(50):
        aws.call("create_route", RouteTableId=main, DestinationCidrBlock=f"172.16.{i}.0/24", GatewayId=vpc["igw"])
    typo = "rtb-0000000000000dead"
    h = aws.host(vpc)
    prefix = aws.config({"Network": NETWORK, "Backend": {"Type": "aws-vpc", "RouteTableID": [typo, main, t2, main]}})
    d = aws.daemon(h, prefix, FAST_CHECKS, "--healthz-port", str(HEALTHZ))
    sn = str(subnet_of(d.wait_subnet_env(30)))
    wait_for(lambda: sn in aws.routes(t2), 30, what="route in t2 despite the failing tables")
    assert aws.routes(t2)[sn]["NetworkInterfaceId"] == h.eni
    line = d.wait_log(r".*RouteLimitExceeded.*", 30).group(0)
    assert "level=error" in line and f"route table {typo} not found" in line and "fix Backend.RouteTableID" in line
    assert f"route {sn} missing in {main}: route table {main} is full (RouteLimitExceeded)" in line, line
    assert line.count(f"missing in {main}") == 1, line  # listed twice in RouteTableID, tried once
    # (a pass in progress shows only what it has found so far — retries run every second here — so
    # wait for the text of a whole pass)
    wait_for(lambda: (r := readyz(h))[0] == 503 and f"missing in {main}" in r[1] and typo in r[1], 30,
             "/readyz naming both failing tables", detail=lambda: readyz(h))
    aws.call("delete_route", RouteTableId=main, DestinationCidrBlock="172.16.0.0/24")
    wait_for(lambda: sn in aws.routes(main), 30, what="route in main once it has room")
    assert aws.routes(main)[sn]["NetworkInterfaceId"] == h.eni
    created = d.wait_log(rf"route created.*route_table={main}", 30).group(0)
    line = wait_for(lambda: re.search(r".*route not programmed.*", d.log_text().split(created, 1)[1]),
                    30, what="the error line of that pass").group(0)
    assert typo in line and main not in line, line
    code, body = readyz(h)
    assert code == 503 and typo in body and main not in body, body
    assert_clean(d)


def test_route_removed_from_outside_is_restored_and_readyz_tells(aws):
    """Someone deletes our route: the periodic check (1 s here) notices, /readyz says "route …
    missing in rtb-…" while the repair is throttled (RequestLimitExceeded, retried soon), and
    the route is back once EC2 lets it through."""
    vpc = aws.vpc()
    table = vpc["main"]
    h = aws.host(vpc)
    d = aws.daemon(h, aws.config(CONFIG), FAST_CHECKS, "--healthz-port", str(HEALTHZ))
    sn = str(subnet_of(d.wait_subnet_env(30)))
    wait_for(lambda: sn in aws.routes(table), 30, what="route")
    wait_for(lambda: readyz(h)[0] == 200, 30, what="ready")
    aws.ec2.faults([{"action": "CreateRoute", "code": "RequestLimitExceeded", "status": 503}])
    aws.call("delete_route", RouteTableId=table, DestinationCidrBlock=sn)
    code, body = wait_for(lambda: (r := readyz(h))[0] == 503 and r, 30, what="/readyz 503 after the removal")
    assert f"route {sn} missing in {table}" in body, body
    line = wait_for(lambda: re.search(r".*RequestLimitExceeded.*", d.log_text()), 30, what="throttled").group(0)
    assert "level=warning" in line and "retrying" in line and f"missing in {table}" in line, line
    assert sn not in aws.routes(table)
    aws.ec2.faults([])
    wait_for(lambda: sn in aws.routes(table), 40, what="route restored")
    assert aws.routes(table)[sn]["NetworkInterfaceId"] == h.eni
    wait_for(lambda: readyz(h) == (200, "flanneld is ready"), 30, what="ready again")
    line = d.wait_log(r".*removed or changed by someone else.*", 30).group(0)
    assert f"route {sn} missing in {table}" in line and "level=warning" in line, line
    assert_clean(d)


def test_route_vanishing_before_replace_route_is_created_at_once(aws):
    """Our subnet's route points at another ENI; it is deleted between our DescribeRouteTables and
    our ReplaceRoute (EC2: InvalidParameterValue "no route defined"): we create it at once, not
    after the 60 s for errors a person must fix."""
    vpc = aws.vpc()
    h = aws.host(vpc)
    other = aws.call("create_network_interface", SubnetId=vpc["subnet"])["NetworkInterface"]["NetworkInterfaceId"]
    aws.call("create_route", RouteTableId=vpc["main"], DestinationCidrBlock="10.1.7.0/24", NetworkInterfaceId=other)
    aws.ec2.faults([{"action": "ReplaceRoute", "vanish": True, "count": 1}])
    prefix = aws.config({"Network": NETWORK, "SubnetMin": "10.1.7.0", "SubnetMax": "10.1.7.0",
                         "Backend": {"Type": "aws-vpc"}})
    d = aws.daemon(h, prefix)
    d.wait_subnet_env(30)
    wait_for(lambda: aws.routes(vpc["main"]).get("10.1.7.0/24", {}).get("NetworkInterfaceId") == h.eni, 30,
             what="our route, created after it vanished")
    d.wait_log(r"route vanished before ReplaceRoute; creating it", 30)
    assert "level=error" not in d.log_text()
    assert_clean(d)


@pytest.mark.parametrize(("mode", "args", "expect"), [
    ("required", ("--token-answer-lost",), ["HttpPutResponseHopLimit", "--http-put-response-hop-limit 2"]),
    ("disabled", (), ["403 Forbidden", "turned off", "--http-endpoint enabled"]),
])
def test_metadata_service_problems_name_the_instance_setting(aws, mode, args, expect):
    """IMDSv2 required but the token answer lost on the way (hop limit), or the service turned
    off (403): one error line naming the instance setting and the command that fixes it."""
    vpc = aws.vpc()
    h = aws.host(vpc, imds=mode, imds_args=args)
    d = aws.daemon(h, aws.config(CONFIG))
    d.wait_subnet_env(30)
    line = d.wait_log(r".*route not programmed.*", 30).group(0)
    assert "level=error" in line and all(x in line for x in expect), line
    assert_clean(d)
