"""Pure logic of the cloud backends (no lab): check/retry intervals, combined errors, the GCE
metadata network path, and which routes the GCE stale-route clean-up may touch (hypothesis:
route lists are untrusted API input)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflanneld.backend import BackendContext, ExternalInterface
from pyflanneld.backend.cloudhttp import CHECK_JITTER, CloudError, check_interval, jittered, retry_interval
from pyflanneld.backend.gce import INSTANCE_URL, GceBackend, network_of, project_of
from pyflanneld.config import parse_config

LINK = "https://www.googleapis.com/compute/v1/projects/p"
NET = {"selfLink": f"{LINK}/global/networks/default"}


@pytest.mark.parametrize(("raw", "check", "retry"), [
    (None, 60.0, 60.0), ("5", 5.0, 5.0), ("0", 0.0, 0.1), ("-3", 0.1, 0.1), ("0.01", 0.1, 0.1),
    ("soon", 60.0, 60.0), ("inf", 60.0, 60.0), ("nan", 60.0, 60.0), (" 2 ", 2.0, 2.0),
])
def test_intervals_from_the_environment(monkeypatch, raw, check, retry):
    for env in ("PYFLANNELD_CLOUD_CHECK_INTERVAL", "PYFLANNELD_CLOUD_RETRY_INTERVAL"):
        if raw is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, raw)
    assert (check_interval(), retry_interval()) == (check, retry)


def test_jitter_stays_within_bounds_and_varies():
    waits = [jittered(60) for _ in range(500)]
    assert all(60 * (1 - CHECK_JITTER) <= w <= 60 * (1 + CHECK_JITTER) for w in waits)
    assert max(waits) - min(waits) > 10


def test_combined_errors_are_one_line_retried_soon_if_any_may_clear_up():
    a = CloudError("route 10.1.7.0/24 missing in rtb-1: full", code="RouteLimitExceeded")
    b = CloudError("route 10.1.7.0/24 not checked in rtb-2: throttled", retryable=True)
    assert CloudError.combine([a]) is a
    both = CloudError.combine([a, b])
    assert str(both) == f"{a}; {b}" and both.retryable and "\n" not in str(both)
    assert not CloudError.combine([a, a]).retryable
    assert str(a.within("ctx")) == f"ctx: {a}" and a.within("ctx").code == "RouteLimitExceeded"


def test_metadata_network_path_names_the_network_project():
    assert network_of("projects/123/networks/default", "p", "123") == ("p", "default")
    assert network_of("projects/p/networks/net-a", "p", "123") == ("p", "net-a")
    assert network_of("projects/999/networks/shared", "p", "123") == ("999", "shared")  # Shared VPC host
    assert network_of("default", "p", "123") == ("p", "default")
    assert project_of(f"{LINK}/global/networks/x") == "p" and project_of("x") == ""


def backend(network: str = "10.1.0.0/16") -> GceBackend:
    cfg = parse_config(json.dumps({"Network": network, "Backend": {"Type": "gce"}}).encode())
    ip = IPv4Address("192.168.100.1")
    return GceBackend(BackendContext(cfg, cfg.backend, ExternalInterface("eth0", 2, ip, ip, 1460), None))


GONE = [{"code": "NEXT_HOP_INSTANCE_NOT_FOUND", "message": "gone"}]


def route(name: str, dest: str, network: str = "default", warnings=GONE, inst: str = "gone") -> dict:
    return {"name": name, "destRange": dest, "network": f"{LINK}/global/networks/{network}",
            "nextHopInstance": f"{LINK}/zones/z/instances/{inst}", "warnings": warnings}


def test_stale_candidates_only_flannel_routes_of_our_network_inside_network():
    b = backend()
    routes = [route("flannel-10-1-9-0-24", "10.1.9.0/24"),
              route("flannel-10-1-7-0-24", "10.1.7.0/24"),  # ours
              route("flannel-10-1-10-0-24", "10.1.10.0/24", network="other"),
              route("flannel-172-16-0-0-24", "172.16.0.0/24"),
              route("flannel-10-0-0-0-8", "10.0.0.0/8"),  # contains Network: not inside it
              route("custom-10-1-11-0-24", "10.1.11.0/24"),
              route("flannel-10-1-12-0-24", "10.1.12.0/24", warnings=[]),  # next hop exists
              route("flannel-10-1-13-0-24", "10.1.13.0/24", warnings=[{"code": "NEXT_HOP_CANNOT_IP_FORWARD"}])]
    assert b.stale_candidates(routes, NET, "flannel-10-1-7-0-24") == [("flannel-10-1-9-0-24", "p", "z", "gone")]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=3), max_leaves=8)
route_like = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["flannel-10-1-9-0-24", "flannel-x", "other"]), json_values),
    "destRange": st.one_of(st.sampled_from(["10.1.9.0/24", "10.1.0.0/16", "10.0.0.0/8", "1.2.3.4/32", "10.1.9.1/24",
                                            "::/0", ""]), json_values),
    "network": st.one_of(st.just(NET["selfLink"]), json_values),
    "nextHopInstance": st.one_of(st.just(f"{LINK}/zones/z/instances/i"), json_values),
    "warnings": st.one_of(st.just(GONE), json_values),
})


@given(st.lists(st.one_of(route_like, json_values), max_size=6))
def test_stale_candidates_never_trust_malformed_routes(routes):
    """Whatever the API answers, the clean-up never raises and only ever picks a flannel-* route
    of our network whose destination lies inside Network."""
    b = backend()
    dicts = [r for r in routes if isinstance(r, dict)]
    for name, project, zone, inst in b.stale_candidates(dicts, NET, "flannel-10-1-7-0-24"):
        r = next(x for x in dicts if x.get("name") == name)
        assert isinstance(name, str) and name.startswith("flannel-") and r["network"] == NET["selfLink"]
        assert IPv4Network(r["destRange"]).subnet_of(IPv4Network("10.1.0.0/16"))
        assert INSTANCE_URL.search(r["nextHopInstance"]).groups() == (project, zone, inst)


error_bodies = st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode()),
                         st.fixed_dictionaries({"error": json_values}).map(lambda v: json.dumps(v).encode()),
                         st.fixed_dictionaries({"error": st.fixed_dictionaries({}, optional={
                             "message": json_values, "errors": json_values})}).map(lambda v: json.dumps(v).encode()))


@given(st.sampled_from([400, 401, 403, 404, 409, 429, 500, 503]), error_bodies)
def test_any_compute_api_error_answer_is_one_line(status, body):
    """An error body is untrusted: an OAuth-style {"error": "invalid_token"}, a list, garbage —
    each becomes one GceApiError line, never an AttributeError ('unexpected …' retried slowly)."""
    from types import SimpleNamespace

    e = SimpleNamespace(resp=SimpleNamespace(status=status), content=body, reason="Bad")
    err = backend().explain("compute.routes.get", e)
    assert err.status == status and str(err).startswith("compute.routes.get") and "\n" not in str(err)
    assert isinstance(err.code, str)


@given(st.one_of(json_values, st.fixed_dictionaries({"errors": json_values})), json_values)
def test_any_finished_operation_is_one_error_line_or_success(error, warnings):
    import asyncio

    b = backend()
    op = {"name": "op-1", "status": "DONE", "error": error, "warnings": warnings}
    try:
        asyncio.run(b.wait_operation("compute.routes.insert", op))
    except CloudError as e:
        assert "\n" not in str(e)
