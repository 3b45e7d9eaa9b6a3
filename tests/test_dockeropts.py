"""`pyflanneld docker-opts` writes exactly what upstream's dist/mk-docker-opts.sh writes.

Golden outputs come from upstream's dist/mk_docker_opts_test.go plus cases produced by running
the script (under dash, Debian's /bin/sh) on the same inputs. Every command-line run happens
inside a lab network namespace, because the tool's last step reads `ip route show` of the
namespace it runs in.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from lab import netns
from pyflanneld import dockeropts

SAMPLE_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"

BIP = 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
IPMASQ = 'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
MTU = 'DOCKER_OPT_MTU="--mtu=1472"\n'
INDIV = BIP + IPMASQ + MTU
COMBINED = '" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
DEFAULT_OUT = INDIV + "DOCKER_OPTS=" + COMBINED

# (flags, extra environment, env file content, expected output file)
GOLDEN = {
    "default": ([], {}, SAMPLE_ENV, DEFAULT_OUT),
    "individual -i": (["-i"], {}, SAMPLE_ENV, INDIV),
    "combined -c": (["-c"], {}, SAMPLE_ENV, "DOCKER_OPTS=" + COMBINED),
    "both -ic": (["-ic"], {}, SAMPLE_ENV, DEFAULT_OUT),
    "custom key -k": (["-k", "CUSTOM_KEY"], {}, SAMPLE_ENV, INDIV + "CUSTOM_KEY=" + COMBINED),
    "attached -kKEY -c": (["-kCUSTOM_KEY", "-c"], {}, SAMPLE_ENV, "CUSTOM_KEY=" + COMBINED),
    "no ip-masq -m": (["-m"], {}, SAMPLE_ENV, BIP + MTU + 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
    "-m -c": (["-m", "-c"], {}, SAMPLE_ENV, 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
    "-mc": (["-mc"], {}, SAMPLE_ENV, 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
    "-- ends options": (["--", "-c"], {}, SAMPLE_ENV, DEFAULT_OUT),
    "word ends options": (["extra", "-c"], {}, SAMPLE_ENV, DEFAULT_OUT),
    "existing key value prepended": (
        ["-k", "DOCKER_NETWORK_OPTIONS"],
        {"DOCKER_NETWORK_OPTIONS": "--foo  --bar"},
        SAMPLE_ENV,
        INDIV + 'DOCKER_NETWORK_OPTIONS="--foo  --bar  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ),
    "DOCKER_OPT_ from environment, sorted": (
        [],
        {"DOCKER_OPT_DNS": "--dns=10.1.0.10", "DOCKER_OPT_A": "x"},
        SAMPLE_ENV,
        'DOCKER_OPT_A="x"\n' + BIP + 'DOCKER_OPT_DNS="--dns=10.1.0.10"\n' + IPMASQ + MTU
        + 'DOCKER_OPTS=" x --bip=10.1.74.1/24 --dns=10.1.0.10 --ip-masq=true --mtu=1472"\n',
    ),
    "flannel masquerades: docker must not": (
        [],
        {},
        "FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=true\n",
        BIP + 'DOCKER_OPT_IPMASQ="--ip-masq=false"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false"\n',
    ),
    "env file wins over environment": ([], {"FLANNEL_MTU": "9000", "FLANNEL_SUBNET": "10.9.9.1/24"},
                                       SAMPLE_ENV, DEFAULT_OUT),
    "environment fills gaps": ([], {"FLANNEL_MTU": "1472"}, SAMPLE_ENV.replace("FLANNEL_MTU=1472\n", ""),
                               DEFAULT_OUT),
    "quoted, exported, commented env file": (
        [],
        {},
        '# written by hand\nexport FLANNEL_SUBNET="10.1.74.1/24"\n\nFLANNEL_MTU=\'1472\'\nFLANNEL_IPMASQ=false  # no\n',
        DEFAULT_OUT,
    ),
    "empty env file": ([], {}, "", 'DOCKER_OPTS=""\n'),
    # IPv6 (beyond the script, which ignores FLANNEL_IPV6_*): docker's --ipv6 and the subnet's network
    "IPv6 only: no --bip": (
        [],
        {},
        "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\nDOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fc00:0:0:5::/64"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\nDOCKER_OPTS=" --ip-masq=true --ipv6 --fixed-cidr-v6=fc00:0:0:5::/64 --mtu=1450"\n',
    ),
    "dual stack": (
        [],
        {},
        SAMPLE_ENV.replace("FLANNEL_MTU", "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n"
                                          "FLANNEL_MTU"),
        BIP + IPMASQ + 'DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fc00:0:0:5::/64"\n' + MTU
        + 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --ipv6 --fixed-cidr-v6=fc00:0:0:5::/64 --mtu=1472"\n',
    ),
    "dual stack -c -m": (
        ["-c", "-m"],
        {},
        SAMPLE_ENV + "FLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64\n",
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ipv6 --fixed-cidr-v6=fd80:0:0:48::/64 --mtu=1472"\n',
    ),
}


# --- pure functions (no namespace needed) ---------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN)
def test_build_output_golden(case: str, tmp_path: Path) -> None:
    flags, environ, env_text, want = GOLDEN[case]
    env_file = tmp_path / "subnet.env"
    env_file.write_text(env_text)
    variables = dict(environ)
    variables.update(dockeropts.parse_env_file(str(env_file)))
    assert dockeropts.build_output(dockeropts.parse_args(flags), variables) == want


@pytest.mark.parametrize("bad", ["fc00:0:0:5::1", "10.1.74.1/24", "fc00::/129", "zz::/64", "fe80::1%eth0/64"])
def test_bad_ipv6_subnet_is_one_line(bad: str) -> None:
    with pytest.raises(dockeropts.DockerOptsError, match=r"FLANNEL_IPV6_SUBNET=.* is not an IPv6 address/prefix"):
        dockeropts.build_output(dockeropts.parse_args([]), {"FLANNEL_IPV6_SUBNET": bad})


def test_parse_args_defaults() -> None:
    o = dockeropts.parse_args([])
    assert (o.flannel_env, o.docker_env, o.combined_key) == (
        "/run/flannel/subnet.env", "/run/docker_opts.env", "DOCKER_OPTS")
    assert (o.indiv, o.combined, o.ipmasq) == (True, True, True)
    o = dockeropts.parse_args(["-f/a", "-d", "/b", "-mi", "-k", "-c"])  # -k takes "-c" as its value
    assert (o.flannel_env, o.docker_env, o.combined_key, o.indiv, o.combined, o.ipmasq) == (
        "/a", "/b", "-c", True, False, False)


def test_conflicting_routes_is_grep_compatible() -> None:
    table = (
        "default via 192.168.100.254 dev eth0 \n"
        "10.1.74.0/24 dev docker0 proto kernel scope link src 10.1.74.1 \n"
        "10.1.74.0/24 via 192.168.100.2 dev eth0 metric 5 \n"
        "110.1.74.0/24 via 192.168.100.3 dev eth0 \n"  # grep matches substrings
        "10x1y74z0/24 via 192.168.100.4 dev eth0 \n"  # and '.' is any character
        "10.1.75.0/24 via 192.168.100.5 dev eth0 \n"
    )
    assert dockeropts.conflicting_routes("10.1.74.1/24", table) == (
        "10.1.74.0/24 via 192.168.100.2 dev eth0 metric 5 \n"
        "110.1.74.0/24 via 192.168.100.3 dev eth0 \n"
        "10x1y74z0/24 via 192.168.100.4 dev eth0 "
    )
    assert dockeropts.conflicting_routes("10.1.76.1/24", table) == ""


def test_write_atomic_replaces_file_keeps_mode(tmp_path: Path) -> None:
    out = tmp_path / "docker_opts.env"
    out.write_text("old content that is longer than the new one\n")
    out.chmod(0o600)
    inode = out.stat().st_ino
    dockeropts.write_atomic(str(out), "A=1\n")
    assert out.read_text() == "A=1\n"
    assert out.stat().st_ino != inode  # renamed into place, not rewritten
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docker_opts.env"]  # no temp files left
    fresh = tmp_path / "new.env"
    dockeropts.write_atomic(str(fresh), "B=2\n")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_write_atomic_writes_through_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real.env"
    target.write_text("old\n")
    link = tmp_path / "link.env"
    link.symlink_to(target)
    dockeropts.write_atomic(str(link), "C=3\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "C=3\n"


# --- the command, run inside a namespace ----------------------------------------------------


@pytest.fixture(scope="module")
def host():
    with netns.Lab() as lab:
        yield lab.add_host("h1")


def docker_opts(host: netns.Host, *args: str, env: dict[str, str] | None = None,
                entry: str = "module") -> tuple[int, str, str]:
    """Run the tool in the host's namespace with a clean environment (plus env)."""
    if entry == "module":
        cmd = [sys.executable, "-m", "pyflanneld.dockeropts"]
    else:
        cmd = [str(Path(sys.executable).parent / "pyflanneld"), "docker-opts"]
    clean = [f"PATH={os.environ['PATH']}"] + [f"{k}={v}" for k, v in (env or {}).items()]
    cp = host.run("env", "-i", *clean, *cmd, *args, check=False)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp.returncode, cp.stdout, cp.stderr


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "subnet.env"
    path.write_text(SAMPLE_ENV)
    return path


@pytest.mark.lab
@pytest.mark.parametrize("case", GOLDEN)
def test_cli_golden(host: netns.Host, case: str, tmp_path: Path) -> None:
    flags, environ, env_text, want = GOLDEN[case]
    env_file, out = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    env_file.write_text(env_text)
    args = ["-f", str(env_file), "-d", str(out)]
    if flags and flags[0] in ("--", "extra"):  # these stop option parsing: put them last
        args += flags
    else:
        args = flags + args
    assert docker_opts(host, *args, env=environ) == (0, "", "")
    assert out.read_bytes() == want.encode()


@pytest.mark.lab
def test_cli_wired_entry_point(host: netns.Host, sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "docker"
    rc = docker_opts(host, "-f", str(sample), "-k", "DOCKER_NETWORK_OPTIONS", "-d", str(out), entry="pyflanneld")
    assert rc == (0, "", "")
    assert out.read_text() == INDIV + "DOCKER_NETWORK_OPTIONS=" + COMBINED


@pytest.mark.lab
def test_invalid_ipmasq(host: netns.Host, tmp_path: Path) -> None:
    env_file, out = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    env_file.write_text(SAMPLE_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=yes"))
    assert docker_opts(host, "-f", str(env_file), "-d", str(out)) == (
        1, "", "Invalid value of FLANNEL_IPMASQ: yes\n")
    assert not out.exists()
    out.write_text("previous\n")
    assert docker_opts(host, "-f", str(env_file), "-d", str(out))[0] == 1
    assert out.read_text() == "previous\n"  # nothing written on error
    # -m skips ip-masq entirely, so the bad value does not matter
    assert docker_opts(host, "-m", "-f", str(env_file), "-d", str(out)) == (0, "", "")
    assert out.read_text() == BIP + MTU + 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'


@pytest.mark.lab
def test_missing_env_file(host: netns.Host, tmp_path: Path) -> None:
    missing, out = tmp_path / "nope.env", tmp_path / "docker_opts.env"
    rc, stdout, stderr = docker_opts(host, "-f", str(missing), "-d", str(out))
    assert (rc, stdout) == (1, "")
    assert stderr.count("\n") == 1 and str(missing) in stderr and "does not exist" in stderr, stderr
    assert not out.exists()
    rc, _, stderr = docker_opts(host, "-f", str(tmp_path), "-d", str(out))  # a directory
    assert rc == 1 and "not a regular file" in stderr and stderr.count("\n") == 1


@pytest.mark.lab
def test_usage_and_bad_options(host: netns.Host) -> None:
    usage = dockeropts.usage_text("pyflanneld docker-opts")
    assert usage.startswith("pyflanneld docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]\n")
    assert "\t-m\tDo not output --ip-masq (useful for older Docker version)\n" in usage
    assert docker_opts(host, "-h") == (1, "", usage)
    assert docker_opts(host, "-x") == (1, "", "Illegal option -x\n" + usage)
    assert docker_opts(host, "-i", "-k") == (1, "", "No arg for -k option\n" + usage)


@pytest.mark.lab
def test_unwritable_output_and_bad_key(host: netns.Host, sample: Path, tmp_path: Path) -> None:
    rc, stdout, stderr = docker_opts(host, "-f", str(sample), "-d", str(tmp_path / "no-dir" / "x.env"))
    assert (rc, stdout) == (1, "")
    assert stderr.startswith(f"cannot write docker env file {tmp_path}/no-dir/x.env: No such file or directory")
    assert stderr.count("\n") == 1
    out = tmp_path / "o.env"
    rc, _, stderr = docker_opts(host, "-f", str(sample), "-d", str(out), "-k", "BAD-KEY")
    assert rc == 1 and "BAD-KEY" in stderr and stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.lab
def test_route_via_subnet_fails_after_writing(host: netns.Host, sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "docker_opts.env"
    host.ip("route", "add", "10.1.74.0/24", "via", "192.168.100.77")
    host.ip("route", "add", "110.1.74.0/24", "via", "192.168.100.78")
    try:
        table = host.ip("route", "show")
        hits = [line for line in table.splitlines() if "1.74.0/24 via" in line]
        assert len(hits) == 2
        assert docker_opts(host, "-f", str(sample), "-d", str(out)) == (
            1, "", "Your routing table already contains the subnet: " + "\n".join(hits) + "\n")
        assert out.read_text() == DEFAULT_OUT  # like the script: the file is written first
    finally:
        host.ip("route", "del", "10.1.74.0/24", check=False)
        host.ip("route", "del", "110.1.74.0/24", check=False)


@pytest.mark.lab
def test_routes_that_do_not_conflict(host: netns.Host, sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "docker_opts.env"
    host.ip("route", "add", "10.1.74.0/24", "dev", "eth0")  # a link route (what docker0 gets): fine
    host.ip("route", "add", "10.1.75.0/24", "via", "192.168.100.77")  # another host's subnet
    try:
        assert docker_opts(host, "-f", str(sample), "-d", str(out)) == (0, "", "")
        assert out.read_text() == DEFAULT_OUT
    finally:
        host.ip("route", "del", "10.1.74.0/24", check=False)
        host.ip("route", "del", "10.1.75.0/24", check=False)
