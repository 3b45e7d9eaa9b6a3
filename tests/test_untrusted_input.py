"""Property-based tests (hypothesis) of everything pyflanneld parses from etcd: the JSON decoder,
lease keys, lease values (through the LeaseBook, the real path) and the network config.

The properties: arbitrary input (deep, huge, NaN/Infinity, 1e400, wrong types, unicode) never
raises anything but the project's own error type, and when one field is wrong the message names
that field. Fast (no etcd, no kernel): runs in ``make test`` and ``make unit``.
"""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pyflanneld.config import ConfigError, parse_config
from pyflanneld.jsondecode import MAX_DEPTH, JSONValueError, decode_json
from pyflanneld.subnet.lease import LeaseAttrs, LeaseFormatError, go_ip6_text, parse_subnet_key, subnet_key
from pyflanneld.subnet.leasebook import LeaseBook
from pyflanneld.subnet.store import Record

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- arbitrary JSON, as text -------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["10.5.1.0/24", "10.5.0.0/16", "192.168.100.1", "fd00::1", "02:00:00:00:00:01",
                     "vxlan", "host-gw", "", "0.0.0.0", "10.20.0.0"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
# literals json.dumps cannot produce, spliced in as text
ODD = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 50, "-0", "1E2", "24.0",
       "[" * 100_000 + "]" * 100_000, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '"\\ud800"', '"\\u0000"']


# a JSON string or a null token: the first null outside strings is where an odd literal goes
_STRING_OR_NULL = re.compile(r'"(?:[^"\\]|\\.)*"|null')


@st.composite
def json_texts(draw, value_strategy=values):
    """JSON text of an arbitrary value; sometimes with one odd literal in place of a scalar (a null
    value, never the letters "null" inside a string: that would make the text no JSON at all)."""
    text = json.dumps(draw(value_strategy))
    if draw(st.booleans()):
        odd = draw(st.sampled_from(ODD))
        m = next((m for m in _STRING_OR_NULL.finditer(text) if m.group() == "null"), None)
        text = text[:m.start()] + odd + text[m.end():] if m else odd
    return text


# --- the decoder ---------------------------------------------------------------------------------
@SETTINGS
@given(st.one_of(json_texts(), st.text(max_size=200), st.binary(max_size=200)))
@example("[" * 100_000 + "]" * 100_000)
@example('{"a":' * 50_000 + "1" + "}" * 50_000)
@example('"' + "[" * 100_000 + '"')  # brackets inside a string are not nesting
def test_decoder_raises_only_its_own_error(raw):
    try:
        decode_json(raw)
    except JSONValueError:
        pass


@SETTINGS
@given(values)
def test_decoder_agrees_with_json_on_what_go_accepts(v):
    text = json.dumps(v)
    assume("NaN" not in text and "Infinity" not in text)
    try:
        got = decode_json(text)
    except JSONValueError as e:  # only integers beyond 64 bits (the strategy makes up to 2**70)
        assert "is out of range" in str(e), str(e)
        return
    assert got == json.loads(text)


def test_decoder_bounds():
    assert decode_json('"' + "[" * 100_000 + '"') == "[" * 100_000
    assert decode_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(JSONValueError, match="nested more than 100 deep"):
        decode_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(JSONValueError, match="bytes, more than"):
        decode_json(b'"' + b"x" * (1 << 20) + b'"')
    assert decode_json("18446744073709551615") == 2**64 - 1  # Go's uint64 max still fits
    with pytest.raises(JSONValueError, match="number 18446744073709551616 is out of range"):
        decode_json("18446744073709551616")
    assert decode_json(b'"\xff"') == "\ufffd"  # invalid UTF-8 is replaced, as Go does


# --- lease keys ----------------------------------------------------------------------------------
@SETTINGS
@given(st.one_of(st.text(max_size=60), st.from_regex(r"\A[0-9.]{1,20}-[0-9]{1,4}(&[0-9a-f:]{1,40}-[0-9]{1,4})?\Z")))
def test_key_parser_raises_only_lease_format_error(key):
    try:
        sn, sn6 = parse_subnet_key(key)
    except LeaseFormatError:
        return
    assert parse_subnet_key(subnet_key(sn, sn6)) == (sn, sn6)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 31), st.integers(0, 2**128 - 1), st.integers(0, 127),
       st.booleans())
def test_every_key_upstream_writes_parses(a, plen, a6, plen6, dual):
    """Upstream MakeSubnetKey: IPv4 /0-/31 (its ParseUint allows 5 bits), dual stack with IPv6.
    (An IPv6 subnet whose address Go prints as dotted IPv4 — below 2**32 or in ::ffff:0:0/96 —
    gives a key upstream's own ParseSubnetKey cannot read either: not a key upstream can use.)"""
    sn = IPv4Network((a, plen), strict=False)
    sn6 = IPv6Network((a6, plen6), strict=False) if dual else None
    assume(sn6 is None or ":" in go_ip6_text(sn6.network_address))
    key = subnet_key(sn, sn6)
    assert parse_subnet_key(key) == (sn, sn6)
    assert parse_subnet_key(f"/coreos.com/network/subnets/{key}") == (sn, sn6)


# --- lease values, through the LeaseBook ----------------------------------------------------------
CFG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
GOOD_LEASE = {"PublicIP": "192.168.100.2", "PublicIPv6": None, "BackendType": "vxlan",
              "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"}}


def put(value: str | bytes, key: str = "10.5.2.0-24") -> LeaseBook:
    b = LeaseBook(CFG, "/coreos.com/network", backend_types=("vxlan", "host-gw", "udp"))
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    with capture_logs():
        b.put(Record(key, raw, True, None, 1, 1))
    return b


@SETTINGS
@given(st.one_of(json_texts(), st.binary(max_size=100)), st.text(max_size=30))
def test_any_lease_value_or_key_is_accepted_or_rejected_never_an_exception(value, key):
    b = put(value, key)
    assert len(b.accepted) + len(b.rejected) == 1
    try:
        LeaseAttrs.from_json(value)
    except LeaseFormatError:
        pass


@SETTINGS
@given(st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendData"]), json_texts())
@example("PublicIP", "5")
@example("PublicIP", "true")
@example("BackendData", '{"VtepMAC":"02:00:00:00:00:02","VNI":1e400}')
def test_a_bad_lease_field_is_named(field, text):
    lease_text = json.dumps(GOOD_LEASE).replace(json.dumps(GOOD_LEASE[field]), "@@", 1).replace("@@", text)
    b = put(lease_text)
    if b.accepted:
        return
    why = b.rejected["10.5.2.0-24"]
    assert field in why or "nested more than" in why, (lease_text[:200], why)


def test_a_missing_public_ip_is_named():
    d = dict(GOOD_LEASE)
    del d["PublicIP"]
    assert put(json.dumps(d)).rejected["10.5.2.0-24"] == "PublicIP: missing"


# --- the network config -------------------------------------------------------------------------
BASE = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
FIELDS = ["Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6", "EnableNFTables",
          "IPv6Network", "IPv6SubnetLen", "Backend"]
# A consequence names the field it depends on: EnableIPv6 needs an IPv6Network.
ALSO = {"EnableIPv6": ("IPv6Network",)}


@SETTINGS
@given(st.one_of(json_texts(), st.binary(max_size=100)))
def test_any_config_is_parsed_or_a_config_error(raw):
    try:
        parse_config(raw)
    except ConfigError:
        pass


@SETTINGS
@given(st.sampled_from(FIELDS), json_texts())
@example("SubnetLen", "1e400")
@example("SubnetLen", "NaN")
@example("SubnetLen", "24.5")
@example("SubnetLen", "-1")
@example("Network", '"10.20.0.0"')
@example("SubnetMin", '"10.5.200.0"')
@example("Backend", '{"Type":5}')
def test_a_bad_config_field_is_named(field, text):
    doc = dict(BASE, **{field: "@@"})
    if field == "SubnetMin":
        doc["SubnetMax"] = "10.5.100.0"
    raw = json.dumps(doc).replace('"@@"', text)
    try:
        parse_config(raw)
    except ConfigError as e:
        msg = str(e)
        if "nested more than" in msg:  # the whole document is refused before any field is read
            return
        names = (field, *ALSO.get(field, ()))
        assert any(n.lower() in msg.lower() for n in names), (raw[:200], msg)
