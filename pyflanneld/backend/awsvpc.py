"""aws-vpc: this host's subnet as a route in the VPC route table (upstream ``backend/awsvpc``, ≤ v0.19).

A pass (the first in ``start``, after the lease is ours; then periodically and on failure, see
:mod:`.cloudhttp`):

1. Instance identity from the instance metadata service (first pass only): IMDSv2 session token
   first (``PUT /latest/api/token``), IMDSv1 when the service has no IMDSv2; region and
   instance id. A lost token answer with IMDSv2 required names ``HttpPutResponseHopLimit``; a
   403 says the service is turned off and how to turn it on.
2. ``DescribeInstances``: the ENI of this instance that holds the interface address.
3. ``ModifyNetworkInterfaceAttribute SourceDestCheck=false`` on it (skipped when already off).
4. Route tables: ``Backend.RouteTableID`` (a string or a list), else the table associated with the
   ENI's subnet, else the VPC's main table.
5. Per table (``DescribeRouteTables``): delete ``blackhole`` routes inside the Network, then make
   the route for our subnet point at our ENI: nothing when it already does (idempotent restart),
   ``ReplaceRoute`` when it points elsewhere (``CreateRoute`` at once if it vanished meanwhile),
   ``CreateRoute`` when absent. A table that fails does not stop the others; the failures are
   reported together, one line naming each table.

Settings: ``PYFLANNELD_AWS_ENDPOINT`` / ``Backend.Endpoint`` (EC2 API URL; default: boto3's, i.e.
``AWS_ENDPOINT_URL_EC2`` or ``https://ec2.<region>.amazonaws.com``), ``PYFLANNELD_AWS_METADATA_URL``
/ ``Backend.MetadataEndpoint`` (default ``http://169.254.169.254``). Credentials: boto3's chain
(environment, shared files, the instance role through the same metadata service).
Nothing is programmed in the kernel; the route stays in the table on shutdown.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import structlog

from .. import __version__
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, in_daemon_thread, register_backend
from .cloudhttp import CloudError, CloudRouteBackend, MetadataSession, http_error, require, setting

log = structlog.get_logger()

DEFAULT_METADATA = "http://169.254.169.254"
TOKEN_TTL = "21600"
DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "Forbidden"}
BAD_CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
                   "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException", "OptInRequired"}
TRANSIENT = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError", "InternalFailure",
             "ServiceUnavailable", "Unavailable", "RequestTimeout", "RequestTimeoutException",
             "ServiceUnavailableException", "EC2ThrottledException"}
NO_CREDENTIALS = ("no AWS credentials found: attach an IAM role (instance profile) to the instance, or set "
                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in pyflanneld's environment")


def imds_hop_limit_message(base: str) -> str:
    """The one-line error when the IMDSv2 token request to ``base`` got no answer: the instance's
    PUT response hop limit is too low for a container; names the ``aws ec2`` command that fixes it."""
    return (f"EC2 instance metadata service at {base} requires IMDSv2 (HttpTokens=required), but the answer to "
            "its session-token request (PUT /latest/api/token) never arrived: the instance's "
            "HttpPutResponseHopLimit is too low for a process in a container; raise it: aws ec2 "
            "modify-instance-metadata-options --instance-id INSTANCE --http-put-response-hop-limit 2 "
            "(or run pyflanneld in the host's network namespace)")


def imds_disabled_message(base: str) -> str:
    """The one-line error when the metadata service at ``base`` answers 403 (HttpEndpoint=disabled);
    names the ``aws ec2`` command that turns it on."""
    return (f"EC2 instance metadata service at {base} answers 403 Forbidden: it is turned off for this instance "
            "(HttpEndpoint=disabled); turn it on: aws ec2 modify-instance-metadata-options --instance-id INSTANCE "
            "--http-endpoint enabled")


def parse_route_tables(value: Any) -> list[str]:
    """``RouteTableID``: absent, a string, or a list of strings (upstream accepts both); a table
    listed twice is programmed (and reported) once."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(value))
    raise BackendError('Backend.RouteTableID must be a route table id ("rtb-…") or a list of them')


@register_backend
class AwsVpcBackend(CloudRouteBackend):
    """The aws-vpc backend (upstream ``pkg/backend/awsvpc``): a route for the own subnet to this
    instance's ENI in the VPC route table(s); see the module docstring for settings and errors."""
    type_name = "aws-vpc"
    cloud_name = "AWS"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.route_tables: list[str] = []
        self.endpoint: str | None = None
        self.metadata_url = DEFAULT_METADATA
        self.region = ""
        self.instance_id = ""
        self._ec2: Any = None

    def check_dependencies(self) -> None:
        """Settings and SDK, checked in register() (BackendError there ends the daemon with one line)."""
        ctx = self.ctx
        self.route_tables = parse_route_tables(ctx.config.backend_option("RouteTableID"))
        self.endpoint = setting(ctx, "Endpoint", "PYFLANNELD_AWS_ENDPOINT", "") or None
        self.metadata_url = setting(ctx, "MetadataEndpoint", "PYFLANNELD_AWS_METADATA_URL", DEFAULT_METADATA).rstrip("/")
        require("boto3", self.type_name, "boto3")

    # --- instance metadata ---------------------------------------------------------------------
    async def identity(self) -> tuple[str, str]:
        """(region, instance id) from the instance metadata service, IMDSv2 first. Raises
        CloudError: unreachable (retryable), IMDSv2 required but its token answer lost (the hop
        limit), the service turned off (403), any other unexpected answer."""
        base = self.metadata_url
        hint = ": is this an EC2 instance? (PYFLANNELD_AWS_METADATA_URL sets another address)"
        async with MetadataSession("EC2 instance metadata service", hint) as md:
            # No answer to the PUT at all (read timeout) is IMDSv2 behind one hop too many (a container
            # with the default hop limit 1): fall back to IMDSv1 as the AWS SDKs do.
            r = await md.request("PUT", f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL},
                                 none_on_read_timeout=True)
            token_lost = r is None
            headers: dict[str, str] = {}
            if r is not None and r.status_code == 200:
                headers = {"X-aws-ec2-metadata-token": r.text.strip()}
            elif r is not None and r.status_code not in (403, 404, 405):
                raise CloudError(f"EC2 instance metadata service at {base}: token request got HTTP {r.status_code}",
                                 retryable=True)
            out = []
            for path in ("placement/region", "instance-id"):
                url = f"{base}/latest/meta-data/{path}"
                r = await md.request("GET", url, headers)
                if r.status_code == 401 and not headers and token_lost:
                    raise CloudError(imds_hop_limit_message(base))
                if r.status_code == 401 and not headers:
                    raise CloudError(f"EC2 instance metadata service at {base} requires IMDSv2 but did not hand out "
                                     "a session token (PUT /latest/api/token)", retryable=True)
                if r.status_code == 403:
                    raise CloudError(imds_disabled_message(base))
                if r.status_code != 200 or not r.text.strip():
                    raise CloudError(f"EC2 instance metadata service: GET {url} returned HTTP {r.status_code}",
                                     retryable=r.status_code >= 500)
                out.append(r.text.strip())
        return out[0], out[1]

    # --- the EC2 client ----------------------------------------------------------------------
    def _client(self) -> Any:
        if self._ec2 is None:
            import boto3
            import botocore.config
            import botocore.session

            bs = botocore.session.get_session()
            if self.metadata_url != DEFAULT_METADATA:
                # instance-role credentials come from the same (non-default) metadata service
                bs.set_config_variable("ec2_metadata_service_endpoint", self.metadata_url)
            session = boto3.session.Session(botocore_session=bs, region_name=self.region)
            cfg = botocore.config.Config(connect_timeout=3, read_timeout=15, user_agent_extra=f"pyflanneld/{__version__}",
                                         retries={"max_attempts": 2, "mode": "standard"})
            self._ec2 = session.client("ec2", endpoint_url=self.endpoint, config=cfg)
        return self._ec2

    def call(self, op: str, context: str = "", **kwargs: Any) -> dict:
        """One EC2 API call (op in API spelling, e.g. "CreateRoute"); failures become CloudError."""
        import botocore.exceptions as bex
        from botocore import xform_name

        ec2 = self._client()
        try:
            return getattr(ec2, xform_name(op))(**kwargs)
        except bex.ClientError as e:
            raise self.explain(op, e, context) from None
        except (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError):
            raise CloudError(NO_CREDENTIALS) from None
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                bex.ConnectionClosedError, bex.HTTPClientError) as e:
            raise http_error("EC2 API", ec2.meta.endpoint_url, e) from None
        except bex.BotoCoreError as e:
            raise CloudError(f"ec2:{op} failed: {e}") from None

    def explain(self, op: str, e: Any, context: str) -> CloudError:
        """An EC2 error answer as one line with the operator's fix; .code is EC2's error code."""
        err = e.response.get("Error", {})
        code, msg = err.get("Code", "?"), (err.get("Message") or "").strip()
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        action = f"ec2:{op}"
        if code in DENIED:
            text = (f"{action} denied ({code}): grant it to the instance role (the IAM policy of the instance "
                    "profile, or of the user whose keys pyflanneld uses)")
        elif code in BAD_CREDENTIALS:
            text = (f"AWS rejected the credentials on {action} ({code}: {msg}): check the instance role or "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        elif code == "RequestExpired":
            text = f"{action}: AWS says the request expired ({code}): the system clock is off; sync it (NTP)"
        elif code == "RouteLimitExceeded":
            text = (f"route table {context} is full ({code}): AWS allows 50 routes per table by default; ask AWS "
                    "for a higher 'Routes per route table' quota, remove unused routes, or use the vxlan backend "
                    "for a cluster this size")
        elif code.startswith("InvalidRouteTableID"):
            text = (f"route table {context} not found in region {self.region} ({code}): fix Backend.RouteTableID "
                    "in the network config")
        elif code.startswith("InvalidInstanceID"):
            text = f"instance {self.instance_id} not found in region {self.region} ({code}: {msg})"
        else:
            text = f"{action} failed ({code}: {msg})"
        return CloudError(text, retryable=code in TRANSIENT or status >= 500, code=code)

    # --- the sequence ------------------------------------------------------------------------
    async def ensure_route(self, lease: Lease) -> None:
        if not self.instance_id:
            self.region, self.instance_id = await self.identity()
            log.info("AWS instance identity", instance_id=self.instance_id, region=self.region)
        await in_daemon_thread(self.program, lease.subnet, name="aws-vpc-api")

    def find_eni(self) -> dict:
        """The ENI (DescribeInstances' NetworkInterface dict) of this instance that holds the external
        interface's IP. Blocking (an SDK call: run it in a daemon thread); raises CloudError."""
        ip = str(self.ctx.ext.ip)
        resp = self.call("DescribeInstances", InstanceIds=[self.instance_id])
        for res in resp.get("Reservations", []):
            for inst in res.get("Instances", []):
                for eni in inst.get("NetworkInterfaces", []):
                    addrs = [a.get("PrivateIpAddress") for a in eni.get("PrivateIpAddresses", [])]
                    if ip in addrs or eni.get("PrivateIpAddress") == ip:
                        return eni
        raise CloudError(f"no network interface (ENI) of instance {self.instance_id} holds {ip}, the address of "
                         f"{self.ctx.ext.name}: pick the VPC interface with --iface")

    def detect_route_table(self, eni: dict) -> str:
        """The route table id (``rtb-…``) for ``eni``: the table associated with its subnet, else the VPC's
        main table (upstream's detectRouteTableID). Blocking; raises CloudError when there is none."""
        found = self.call("DescribeRouteTables", Filters=[{"Name": "association.subnet-id", "Values": [eni["SubnetId"]]}])
        tables = found.get("RouteTables", [])
        if not tables:
            found = self.call("DescribeRouteTables", Filters=[{"Name": "vpc-id", "Values": [eni["VpcId"]]},
                                                              {"Name": "association.main", "Values": ["true"]}])
            tables = found.get("RouteTables", [])
        if not tables:
            raise CloudError(f"no route table for subnet {eni['SubnetId']} and no main table in {eni['VpcId']}: set "
                             "Backend.RouteTableID in the network config")
        return tables[0]["RouteTableId"]

    def program(self, subnet: IPv4Network) -> None:
        """One pass (blocking): source/dest check off, then our route in every table. A table that
        fails does not stop the others; the failures are raised together, one line naming each."""
        eni = self.find_eni()
        eni_id = eni["NetworkInterfaceId"]
        later: list[CloudError] = []
        if eni.get("SourceDestCheck", True):
            try:
                self.call("ModifyNetworkInterfaceAttribute", NetworkInterfaceId=eni_id, SourceDestCheck={"Value": False})
                log.info("disabled source/destination check", eni=eni_id)
            except CloudError as e:
                # the routes are still worth having; report (and keep retrying) once they are in place
                later.append(CloudError(f"{e}; until then the VPC drops traffic to pods on this host (source/dest "
                                        f"check is on for {eni_id})", e.retryable, e.code))
        errors: list[CloudError] = []
        for table in self.route_tables or [self.detect_route_table(eni)]:
            try:
                self.program_table(table, subnet, eni_id)
            except CloudError as e:
                errors.append(e)
        if errors or later:
            raise CloudError.combine(errors + later)

    def program_table(self, table: str, subnet: IPv4Network, eni_id: str) -> None:
        """Our route in one table: read the table, drop blackholes inside the Network, then create or
        replace our route when it is missing or points elsewhere. CloudError names the table."""
        dest = str(subnet)
        try:
            found = self.call("DescribeRouteTables", context=table, RouteTableIds=[table]).get("RouteTables", [])
        except CloudError as e:
            raise e.within(f"route {dest} not checked in {table}") from None
        if not found:
            raise CloudError(f"route {dest} not checked in {table}: route table {table} not found in region "
                             f"{self.region}: fix Backend.RouteTableID")
        routes = found[0].get("Routes", [])
        self.drop_blackholes(table, routes, dest)
        ours = next((r for r in routes if r.get("DestinationCidrBlock") == dest), None)
        if ours and ours.get("NetworkInterfaceId") == eni_id and ours.get("State", "active") == "active":
            if table not in self.seen:
                log.info("route already in place", route_table=table, subnet=dest, eni=eni_id)
            self.route_seen(table)
            return
        if ours is None:
            state = f"route {dest} missing in {table}"
        else:
            target = (ours.get("NetworkInterfaceId") or ours.get("InstanceId") or ours.get("GatewayId")
                      or ours.get("State") or "?")
            state = f"route {dest} in {table} points at {target}"
        self.route_lost(table, state, route_table=table, subnet=dest)
        try:
            self.write_route(table, dest, eni_id, replace=ours is not None)
        except CloudError as e:
            raise e.within(state) from None
        self.route_seen(table)
        if ours is not None:
            log.info("route replaced", route_table=table, subnet=dest, eni=eni_id, previous=target)
        else:
            log.info("route created", route_table=table, subnet=dest, eni=eni_id)

    def write_route(self, table: str, dest: str, eni_id: str, replace: bool) -> None:
        """ReplaceRoute (replace) or CreateRoute, falling over to the other once when the table
        changed between our look and our write: a route that vanished before ReplaceRoute
        (InvalidParameterValue "no route defined") is created, one that appeared before
        CreateRoute (RouteAlreadyExists) is replaced."""
        args = {"context": table, "RouteTableId": table, "DestinationCidrBlock": dest, "NetworkInterfaceId": eni_id}
        if replace:
            try:
                self.call("ReplaceRoute", **args)
                return
            except CloudError as e:
                if not (e.code == "InvalidParameterValue" and "no route defined" in str(e).lower()):
                    raise
                log.info("route vanished before ReplaceRoute; creating it", route_table=table, subnet=dest)
            self.call("CreateRoute", **args)
            return
        try:
            self.call("CreateRoute", **args)
        except CloudError as e:
            if e.code != "RouteAlreadyExists":
                raise
            log.info("route appeared before CreateRoute; taking it over", route_table=table, subnet=dest)
            self.call("ReplaceRoute", **args)

    def drop_blackholes(self, table: str, routes: list[dict], dest: str) -> None:
        """Delete blackhole routes (a terminated node's) inside the Network; failures are logged only."""
        for r in routes:
            cidr = r.get("DestinationCidrBlock")
            if r.get("State") != "blackhole" or not cidr or cidr == dest:
                continue
            try:
                inside = IPv4Network(str(cidr), strict=False).subnet_of(self.network)
            except ValueError:
                continue
            if not inside:
                continue
            try:
                self.call("DeleteRoute", context=table, RouteTableId=table, DestinationCidrBlock=cidr)
                log.info("removed blackhole route", route_table=table, destination=cidr)
            except CloudError as e:
                if e.code != "InvalidRoute.NotFound":
                    log.warning("could not remove blackhole route", route_table=table, destination=cidr, error=str(e))
