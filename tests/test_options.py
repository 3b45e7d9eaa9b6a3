"""Flag and environment parsing, drop-in for flanneld (Go flag syntax + FLANNELD_* env)."""

import subprocess
import sys

import pytest

from pyflanneld.cli import validate
from pyflanneld.options import OptionError, UsageError, parse_args, parse_duration

SEED_ENV = {  # the seed's /etc/flannel/options.env
    "FLANNELD_IFACE": "192.168.100.1",
    "FLANNELD_ETCD_ENDPOINTS": "http://192.168.100.254:2379",
}


def test_defaults_match_upstream():
    o = parse_args([], {})
    assert o.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert o.etcd_prefix == "/coreos.com/network"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.subnet_lease_renew_margin_s == 60 * 60
    assert o.subnet_lease_ttl_s == 24 * 3600
    assert o.iptables_resync_s == 5
    assert o.iptables_forward_rules is True
    assert o.ip_masq is False
    assert o.healthz_ip == "0.0.0.0" and o.healthz_port == 0
    assert o.iface == [] and o.iface_regex == []


@pytest.mark.parametrize("argv", [
    ["-etcd-endpoints=http://e:1"], ["--etcd-endpoints=http://e:1"],
    ["-etcd-endpoints", "http://e:1"], ["--etcd-endpoints", "http://e:1"],
])
def test_go_style_string_flags(argv):
    assert parse_args(argv, {}).etcd_endpoints == "http://e:1"


@pytest.mark.parametrize("argv,value", [
    (["--ip-masq"], True), (["-ip-masq"], True), (["-ip-masq=false"], False),
    (["--ip-masq=true"], True), (["-ip-masq=0"], False), (["-iptables-forward-rules=false"], False),
])
def test_go_style_bool_flags(argv, value):
    o = parse_args(argv, {})
    name = argv[0].lstrip("-").split("=")[0].replace("-", "_")
    assert getattr(o, name) is value


def test_bool_flag_does_not_eat_next_argument():
    o = parse_args(["-ip-masq", "-iface", "eth0"], {})
    assert o.ip_masq is True and o.iface == ["eth0"]


@pytest.mark.parametrize("argv,hint", [
    (["--ip-masq", "true"], "--ip-masq true: a boolean flag takes its value after '=': write --ip-masq=true"),
    (["-ip-masq", "false", "--iface", "eth0"], "write --ip-masq=false"),
    (["--iface", "eth0", "--iptables-forward-rules", "0"], "write --iptables-forward-rules=0"),
    (["--ip-blackhole-route", "True"], "write --ip-blackhole-route=True"),
])
def test_bool_value_after_a_space_names_the_fix(argv, hint):
    """Go's flag package stops at the value (upstream then ignores every later flag, and
    `--ip-masq false` turns masquerading ON): one line that says to write `--flag=value`."""
    with pytest.raises(UsageError) as ei:
        parse_args(argv, {})
    assert hint in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("argv", [["--ip-masq", "yes"], ["--iface", "eth0", "true"]])
def test_other_stray_arguments_keep_the_plain_message(argv):
    with pytest.raises(UsageError, match="unexpected argument .*flanneld takes flags only"):
        parse_args(argv, {})


def test_iface_repeatable_in_order():
    assert parse_args(["-iface", "eth1", "--iface=10.0.0.1", "-iface", "eth0"], {}).iface == ["eth1", "10.0.0.1", "eth0"]


def test_seed_options_env_is_applied():
    o = parse_args([], SEED_ENV)
    assert o.iface == ["192.168.100.1"]
    assert o.etcd_endpoints == "http://192.168.100.254:2379"


def test_cli_wins_over_env_and_empty_env_ignored():
    env = dict(SEED_ENV, FLANNELD_ETCD_PREFIX="", FLANNELD_IP_MASQ="true", FLANNELD_V="2")
    o = parse_args(["--iface", "eth9", "-ip-masq=false"], env)
    assert o.iface == ["eth9"]  # command line wins
    assert o.ip_masq is False
    assert o.etcd_prefix == "/coreos.com/network"  # empty env value ignored
    assert o.v == 2


def test_env_iface_is_one_entry_not_split():
    assert parse_args([], {"FLANNELD_IFACE": "eth0,eth1"}).iface == ["eth0,eth1"]


def test_bad_env_value_is_a_warning_not_fatal():
    o = parse_args([], {"FLANNELD_HEALTHZ_PORT": "abc"})
    assert o.healthz_port == 0
    assert any("FLANNELD_HEALTHZ_PORT" in w for w in o.env_warnings)


def test_version_env_has_no_effect():
    assert parse_args([], {"FLANNELD_VERSION": "true"}).version is False


@pytest.mark.parametrize("argv,fragment", [
    (["-no-such-flag"], "flag provided but not defined: -no-such-flag"),
    (["--etcd-prefix"], "flag needs an argument"),
    (["-healthz-port=x"], "invalid value"),
    (["-ip-masq=maybe"], "invalid boolean value"),
    (["--listen", ":8888"], "removed in flannel v0.8.0"),
    (["stray"], "unexpected argument"),
])
def test_usage_errors(argv, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_args(argv, {})


@pytest.mark.parametrize("argv,fragment", [
    (["--subnet-lease-renew-margin=0"], "out of acceptable range"),
    (["--subnet-lease-renew-margin=1440"], "out of acceptable range"),
    (["--public-ip=10.0.0.1/24"], "not an IPv4 address"),
    (["--kube-subnet-mgr"], "Kubernetes subnet manager mode is not supported"),
    (["--kube-api-url=https://k"], "not supported"),
    (["--public-ipv6=10.0.0.1"], "invalid public IPv6 address: 10.0.0.1"),
    (["--public-ipv6=fd00::1/64"], "invalid public IPv6 address: fd00::1/64"),
    (["--public-ipv6=fe80::1%eth0"], "invalid public IPv6 address"),
    (["--subnet-lease-ttl=30m"], "must be shorter than --subnet-lease-ttl"),
    (["--etcd-cafile=/nonexistent/ca.pem"], "cannot read --etcd-cafile /nonexistent/ca.pem"),
    (["--etcd-certfile=/etc/hostname"], "must be given together"),
    (["--subnet-lease-ttl=2500001h"], "longer than etcd allows a lease to be"),  # etcd: "too large lease TTL"
])
def test_value_errors(argv, fragment):
    with pytest.raises(OptionError, match=fragment):
        validate(parse_args(argv, {}))


def test_public_ipv6_is_accepted_from_flag_and_env():
    """Issue 13.2: --public-ipv6 (FLANNELD_PUBLIC_IPV6) is parsed and checked like upstream's."""
    o = parse_args(["--public-ipv6=2001:db8::10"], {})
    validate(o)
    assert o.public_ipv6 == "2001:db8::10"
    o = parse_args([], {"FLANNELD_PUBLIC_IPV6": "fd99::2"})
    validate(o)
    assert o.public_ipv6 == "fd99::2"


def test_short_ttl_with_duration_margin_is_valid():
    o = parse_args(["--subnet-lease-ttl=10s", "--subnet-lease-renew-margin=5s"], {})
    validate(o)
    assert o.subnet_lease_ttl_s == 10 and o.subnet_lease_renew_margin_s == 5


@pytest.mark.parametrize("text,secs", [("24h", 86400), ("1h30m", 5400), ("90s", 90), ("1.5s", 1.5),
                                       ("250ms", 0.25), ("45", 45)])
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "h", "2562048h", "1e3s", "", "h"])
def test_parse_duration_refuses_what_go_refuses(text):
    # Go's time.Duration is int64 nanoseconds: ~292 years at most (400 nines once became inf seconds)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_a_huge_lease_ttl_is_a_usage_error_not_an_internal_error():
    with pytest.raises(UsageError, match="invalid value .* for flag -subnet-lease-ttl"):
        parse_args(["--subnet-lease-ttl", "9" * 400], {})


def test_password_is_redacted():
    o = parse_args(["--etcd-username=u", "--etcd-password=s3cret"], {})
    assert "s3cret" not in repr(o.redacted())


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyflanneld", *args], capture_output=True, text=True,
                          env=env, timeout=30)


@pytest.mark.parametrize("args,code,fragment", [
    (["-bogus"], 2, "flag provided but not defined: -bogus"),
    (["--public-ip", "300.1.1.1"], 1, "--public-ip '300.1.1.1' is not an IPv4 address"),
    (["--subnet-lease-renew-margin", "1440"], 1, "out of acceptable range"),
    (["--etcd-keyfile", "/nonexistent/k.pem", "--etcd-certfile", "/nonexistent/c.pem"], 1, "cannot read"),
    (["--ip-masq", "true", "--iface", "eth0"], 2, "write --ip-masq=true"),
])
def test_cli_errors_are_one_line_without_traceback(args, code, fragment):
    p = _run(*args)
    assert p.returncode == code
    assert fragment in p.stderr
    assert "Traceback" not in p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) <= 2


def test_version_and_help():
    p = _run("--version")
    assert p.returncode == 0 and p.stderr.strip() == __import__("pyflanneld").__version__
    p = _run("-h")
    assert p.returncode == 0 and "-etcd-endpoints" in p.stderr and "-iface" in p.stderr
