"""The operator commands without etcd: help, usage errors, offline validation, and the pure parts
(config file loading, lease display) fed untrusted input."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from helpers import one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.cluster import pyflanneld_argv
from pyflanneld.config import ConfigError
from pyflanneld.ctl import configfile
from pyflanneld.ctl.lease_cmd import format_ttl, render_table, view
from pyflanneld.subnet.store import Record

VXLAN = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'


def run(*args, input: str | None = None) -> subprocess.CompletedProcess:
    """The installed `pyflanneld <args>` (these commands never touch the network or the kernel)."""
    cp = subprocess.run([*pyflanneld_argv(), *map(str, args)], capture_output=True, text=True, timeout=60,
                        input=input)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp


# -- the commands ---------------------------------------------------------------------------------------
def test_validate_json_and_yaml_from_file_and_stdin(tmp_path):
    summary = "valid: vxlan backend, Network 10.5.0.0/16, 255 subnets /24 from 10.5.1.0 to 10.5.255.0\n"
    f = tmp_path / "net.json"
    f.write_text(VXLAN)
    assert run("config", "validate", "-f", f).stdout == summary
    cp = run("config", "validate", "-f", "-", input="Network: 10.5.0.0/16\nBackend:\n  Type: vxlan\n")
    assert (cp.returncode, cp.stdout) == (0, summary)
    line = one_line_error(run("config", "validate", "-f", "-", input="Network: 10.5.0.0/16\nSubnetMin: 10.6.0.0\n"))
    assert line == "pyflanneld: stdin: invalid network config: SubnetMin is not in the range of the Network\n"


def test_validate_accepts_dual_stack_and_ipv6_only_configs():
    cp = run("config", "validate", "-f", "-", input="Network: 10.5.0.0/16\nEnableIPv6: true\nIPv6Network: fd80::/48\n"
                                                   "Backend: {Type: vxlan}\n")
    assert (cp.returncode, cp.stdout) == (0, "valid: vxlan backend, Network 10.5.0.0/16, 255 subnets /24 from "
                                             "10.5.1.0 to 10.5.255.0, IPv6Network fd80::/48, 65535 subnets /64 from "
                                             "fd80:0:0:1:: to fd80:0:0:ffff::\n")
    assert cp.stderr == ""
    cp = run("config", "validate", "-f", "-",
             input='{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/120","Backend":{"Type":"host-gw"}}')
    assert (cp.returncode, cp.stdout) == (0, "valid: host-gw backend, IPv6 only, IPv6Network fd80::/120, 3 subnets "
                                             "/122 from fd80::40 to fd80::c0\n")
    line = one_line_error(run("config", "validate", "-f", "-", input="Network: 10.5.0.0/16\nEnableIPv6: true\n"
                                                                   "IPv6Network: fd80::/48\nIPv6SubnetLen: 127\n"))
    assert line == "pyflanneld: stdin: invalid network config: IPv6SubnetLen: SubnetLen must be less than /127\n"
    # what the daemon refuses: IPv6 with a backend that carries IPv4 only
    line = one_line_error(run("config", "validate", "-f", "-", input="Network: 10.5.0.0/16\nEnableIPv6: true\n"
                                                                   "IPv6Network: fd80::/48\nBackend: {Type: udp}\n"))
    assert line == ("pyflanneld: stdin: invalid network config: the udp backend carries IPv4 only and cannot run "
                    "EnableIPv6 (dual stack or IPv6-only); use vxlan, host-gw or alloc for IPv6, or set EnableIPv6 "
                    "to false\n")


@pytest.mark.parametrize("cmd", [["config"], ["config", "get"], ["config", "validate"], ["config", "set"],
                                 ["leases"], ["lease"], ["lease", "reserve"], ["lease", "release"]])
def test_help_everywhere(cmd):
    cp = run(*cmd, "--help")
    assert cp.returncode == 0 and cp.stdout.startswith(f"Usage: pyflanneld {' '.join(cmd)} "), cp.stdout
    if cmd[-1] in ("get", "set", "leases", "reserve", "release"):
        assert "--etcd-endpoints" in cp.stdout and "FLANNELD_ETCD_ENDPOINTS" in cp.stdout
        assert "-etcd-endpoints," not in cp.stdout  # the Go spelling works but is not listed twice


def test_docker_opts_help_and_daemon_usage_name_the_commands():
    cp = run("docker-opts", "--help")
    assert cp.returncode == 0 and cp.stdout.startswith("pyflanneld docker-opts [-f FLANNEL-ENV-FILE]")
    cp = run("-h")
    assert cp.returncode == 0 and "pyflanneld leases [-o table|json|yaml]" in cp.stderr


@pytest.mark.parametrize("args,fragment", [
    (["leases", "-o", "xml"], "'xml' is not one of"),
    (["lease", "reserve", "10.1.0.0/24"], "Missing option '--public-ip'"),
    (["lease", "release", "10.1.0.0/24", "--ttl", "soon"], "'soon' is not a duration"),
    (["lease", "release", "10.1.0.0/24", "--ttl", "9" * 400], "is not a duration"),  # was an OverflowError
    (["lease", "release", "10.1.0.0/24", "--ttl", "9223372036854775808"], "is not a duration"),  # was ValueError
    (["lease", "release", "10.1.0.0/24", "--ttl", "2500001h"], "longer than etcd allows"),
    (["config", "set"], "Missing option '-f'"),
    (["config", "get", "-etcd-endpointz=http://x:1"], "no such option: -etcd-endpointz"),
    (["config", "get", "--etcd-api", "v4"], "'v4' is not one of"),
    (["lease", "bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line_exit_2(args, fragment):
    line = one_line_error(run(*args), 2)
    assert fragment in line and "--help" in line, line


def test_flags_before_the_command_name_the_right_order():
    cp = run("--etcd-endpoints", "http://127.0.0.1:1", "leases", "-o", "json")
    assert cp.returncode == 2 and cp.stdout == ""
    assert "unexpected argument 'leases'" in cp.stderr
    assert "an operator command comes first: pyflanneld leases" in cp.stderr, cp.stderr


def test_failures_are_one_line_exit_1(tmp_path):
    line = one_line_error(run("config", "get", "--etcd-endpoints", "http://127.0.0.1:1"))
    assert "etcd v3 API at http://127.0.0.1:1: unreachable" in line  # the store names the API
    line = one_line_error(run("leases", "--etcd-cafile", tmp_path / "missing.pem"))
    assert f"cannot read --etcd-cafile {tmp_path}/missing.pem" in line  # the daemon's own text
    line = one_line_error(run("leases", "--etcd-endpoints", "ftp://x"))
    assert "--etcd-endpoints: invalid etcd endpoint 'ftp://x'" in line
    line = one_line_error(run("config", "validate", "-f", tmp_path / "missing.yaml"))
    assert "cannot read" in line and "missing.yaml" in line
    for deep in ("[" * 50_000 + "]" * 50_000, '{"a":' * 50_000 + "1" + "}" * 50_000):  # JSON recursed
        line = one_line_error(run("config", "validate", "-f", "-", input=deep))
        assert line == "pyflanneld: stdin: the document is nested too deeply\n", line


# -- config files: untrusted input -----------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_docs = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=8), c, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_docs)
def test_any_json_document_loads_the_same_from_json_and_from_yaml(doc):
    assert configfile.load_document(json.dumps(doc), "f") == doc
    assert configfile.load_document(yaml.safe_dump(doc), "f") == doc


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_config_or_one_clear_error(text):
    try:
        raw, _cfg = configfile.load(text, "f")
    except (configfile.ConfigFileError, ConfigError) as e:
        assert "\n" not in str(e)
        return
    assert json.loads(raw) is not None  # what would be written is JSON


def test_yaml_that_json_cannot_hold_is_refused_with_the_key():
    bombs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True))
    for text, fragment in [("Network: 10.1.0.0/16\nBackend: {Type: alloc, At: 2024-01-01}\n", "Backend.At is a date"),
                           ("Network: .inf\n", "Network is inf"), ("1: x\n", "key 1"),
                           ("a: &a [*a]\n", "refers to itself"), (bombs, "more than 100000 values"),
                           ("", "empty")]:
        with pytest.raises(configfile.ConfigFileError, match=fragment):
            configfile.load(text, "f")


any_chars = st.text(st.characters(blacklist_categories=()), max_size=6)  # lone surrogates included


@settings(max_examples=300, deadline=None)
@given(any_chars, st.one_of(any_chars, st.sampled_from(["1e400", "-1e999", "1.5", "7"])))
def test_whatever_json_escapes_it_holds_what_set_writes_is_utf8_json(key, value):
    """A JSON file may escape anything ("\\ud800", 1e400): load() refuses it in one line naming the
    key, or returns JSON that can be written (UTF-8) and read back - never an internal error."""
    literal = value if value[:1].isdigit() or value.startswith("-") else json.dumps(value)
    text = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc",%s:%s}}' % (json.dumps(key), literal)
    try:
        raw, _cfg = configfile.load(text, "net.json")
    except (configfile.ConfigFileError, ConfigError) as e:
        assert "\n" not in str(e) and str(e).startswith("net.json: ")
        return
    assert json.loads(raw.encode("utf-8")) == json.loads(text)


def test_json_that_cannot_be_stored_is_refused_in_one_line_naming_the_key():
    for text, line in [
        ('{"Network":"10.1.0.0/16","Backend":{"Type":"alloc","x":1e400}}', "net.json: Backend.x is inf"),
        ('{"Network":"10.1.0.0/16","Backend":{"Type":"alloc","N":"\\ud800"}}',
         "net.json: Backend.N holds '\\ud800', which is not text (a lone UTF-16 surrogate)"),
        ('{"Network":"10.1.0.0/16","Backend":{"Type":"alloc","\\udfff":1}}', "net.json: a key in Backend holds"),
    ]:
        with pytest.raises(configfile.ConfigFileError) as e:
            configfile.load(text, "net.json")
        assert str(e.value).startswith(line), str(e.value)
    cp = run("config", "validate", "-f", "-", input='{"Network":"10.1.0.0/16","Backend":{"Type":"alloc","x":1e400}}')
    assert "Backend.x is inf" in one_line_error(cp)  # was: internal error: ValueError('Out of range float …')


def test_what_is_stored_is_compact_json_in_the_file_order():
    raw, cfg = configfile.load("Network: 10.1.0.0/16\nBackend:\n  Type: vxlan\n  VNI: 4\n", "f")
    assert raw == '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":4}}'
    assert cfg.backend_option("VNI") == 4


# -- lease display: untrusted etcd data --------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.binary(max_size=100), st.booleans(),
       st.none() | st.floats(min_value=0, max_value=2e9))
def test_any_record_is_shown_never_raises(key, value, has_ttl, expiration):
    v = view(Record(key=key, value=value, has_ttl=has_ttl, expiration=expiration, revision=1), now=1e9)
    table = render_table([v])
    assert len(table.splitlines()) == 2  # control characters in the data never break the table
    assert v.error is not None or v.subnet is not None
    json.dumps(v.__dict__)


def test_ttl_and_table_cells():
    rec = Record("10.5.3.0-24", b'{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"vtepmac":"0a:0b:0c:0d:0e:0f"}}',
                 True, 1000 + 86399.2, 7)
    v = view(rec, now=1000)
    assert (v.subnet, v.public_ip, v.backend, v.vtep_mac, v.ttl_s) == ("10.5.3.0/24", "1.2.3.4", "vxlan",
                                                                       "0a:0b:0c:0d:0e:0f", 86400)
    assert format_ttl(v) == "24h"
    assert format_ttl(view(rec, now=1000 + 86399.2 - 61)) == "1m1s"
    assert format_ttl(view(rec, now=1e12)) == "expired"
    reserved = view(Record("10.5.4.0-24", b'{"PublicIP":"1.2.3.5"}', False, None, 8), now=0)
    assert format_ttl(reserved) == "reserved" and reserved.ttl_s is None
    evil = view(Record("10.5.5.0-24", b'{"PublicIP":"1.2.3.6","BackendType":"x\\u001b[31my"}', True, None, 9), 0)
    assert "\x1b" not in render_table([evil]) and "x\\x1b[31my" in render_table([evil])


def test_dual_stack_and_ipv6_only_leases_show_their_ipv6_part():
    dual = view(Record("10.5.3.0-24&fd80:0:0:3::-64", b'{"PublicIP":"1.2.3.4","PublicIPv6":"fd99::4","BackendType":'
                       b'"host-gw"}', True, None, 7), now=0)
    only6 = view(Record("0.0.0.0-0&fd80:0:0:5::-64", b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd99::5","BackendType":'
                        b'"host-gw"}', True, None, 8), now=0)
    assert (dual.subnet, dual.ipv6_subnet, dual.public_ipv6) == ("10.5.3.0/24", "fd80:0:0:3::/64", "fd99::4")
    assert (only6.subnet, only6.ipv6_subnet, only6.public_ipv6) == ("0.0.0.0/0", "fd80:0:0:5::/64", "fd99::5")
    assert render_table([dual, only6]).splitlines() == [
        "SUBNET       IPV6-SUBNET      PUBLIC-IP  PUBLIC-IPV6  BACKEND  VTEP-MAC  TTL",
        "10.5.3.0/24  fd80:0:0:3::/64  1.2.3.4    fd99::4      host-gw  -         -",
        "0.0.0.0/0    fd80:0:0:5::/64  0.0.0.0    fd99::5      host-gw  -         -"]
    plain = view(Record("10.5.4.0-24", b'{"PublicIP":"1.2.3.5"}', True, None, 9), now=0)
    assert render_table([plain]).splitlines()[0] == "SUBNET       PUBLIC-IP  BACKEND  VTEP-MAC  TTL"


# -- docker-opts: click keeps the script's getopts rules ----------------------------------------------------
@pytest.mark.parametrize("argv,want", [
    (["-f=a"], ("=a", "DOCKER_OPTS", True, True, [])),  # getopts: the value is "=a"
    (["-fk"], ("k", "DOCKER_OPTS", True, True, [])),
    (["-k", "--"], ("/run/flannel/subnet.env", "--", True, True, [])),
    (["-c", "-"], ("/run/flannel/subnet.env", "DOCKER_OPTS", False, True, ["-"])),
    (["-f", "-h"], ("-h", "DOCKER_OPTS", True, True, [])),
    (["-i", "--", "-c"], ("/run/flannel/subnet.env", "DOCKER_OPTS", True, False, ["-c"])),
])
def test_docker_opts_getopts_rules(argv, want):
    from pyflanneld import dockeropts

    o = dockeropts.parse_args(argv)
    assert (o.flannel_env, o.combined_key, o.indiv, o.combined, o.extra_args) == want


@pytest.mark.parametrize("argv,message", [
    (["--foo"], "Illegal option --"), (["-ix"], "Illegal option -x"), (["-c", "-d"], "No arg for -d option"),
    (["-mh"], ""), (["-?"], ""),
])
def test_docker_opts_usage_errors(argv, message):
    from pyflanneld import dockeropts

    with pytest.raises(dockeropts.UsageError) as e:
        dockeropts.parse_args(argv)
    assert str(e.value) == message
