"""The systemd units and drop-ins under systemd/ are valid (systemd-analyze verify) and do what
CoreOS's flanneld.service did.

Each test builds a throw-away filesystem root: the host's /usr/lib/systemd/system (targets etc.),
a docker-ce style docker.service/docker.socket, stub executables on every Exec path, and our
files under /etc/systemd/system. `systemd-analyze verify --root=ROOT` then checks our files
against that root; any message it prints counts as a failure (it reports unknown keys and bad
values only as warnings), and deliberately broken copies prove the check can fail.
Note: verify (systemd 252) checks that the *first* command of each Exec*= list exists, so a
missing binary in a later ExecStartPre= (the drop-in's ln) is not caught by it; malformed
commands and keys are.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyflanneld import dockeropts

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
HOST_UNITS = Path("/usr/lib/systemd/system")

UNIT = "pyflanneld.service"
OUR_DROPIN = "pyflanneld.service.d/40-ExecStartPre-symlink.conf"
DOCKER_DROPINS = ["docker.service.d/40-flannel.conf", "docker.service.d/50-flannel-network-options.conf"]
SEED_DROPINS = [
    "seed-compat/flanneld.service.d/40-ExecStartPre-symlink.conf",
    "seed-compat/docker.service.d/40-flannel.conf",
]

# Shape of docker-ce's units (what Docker's Debian packages install), trimmed.
DOCKER_SERVICE = """\
[Unit]
Description=Docker Application Container Engine
After=network-online.target docker.socket firewalld.service containerd.service
Wants=network-online.target
Requires=docker.socket

[Service]
Type=notify
ExecStart=/usr/bin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock
ExecReload=/bin/kill -s HUP $MAINPID
Restart=always

[Install]
WantedBy=multi-user.target
"""
DOCKER_SOCKET = """\
[Unit]
Description=Docker Socket for the API

[Socket]
ListenStream=/run/docker.sock
SocketMode=0660

[Install]
WantedBy=sockets.target
"""
STUB_EXECUTABLES = ["usr/local/bin/pyflanneld", "usr/bin/mkdir", "usr/bin/ln", "usr/bin/dockerd", "usr/bin/kill"]


def _stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    units = root / "usr/lib/systemd/system"
    shutil.copytree(HOST_UNITS, units, symlinks=True)
    (units / "docker.service").write_text(DOCKER_SERVICE)
    (units / "docker.socket").write_text(DOCKER_SOCKET)
    for rel in STUB_EXECUTABLES:
        _stub(root / rel)
    (root / "bin").symlink_to("usr/bin")  # Debian 12: merged /usr
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def install(root: Path, rel: str, dest: str | None = None, text: str | None = None) -> Path:
    """Copy systemd/<rel> to ROOT/etc/systemd/system/<dest or rel without 'seed-compat/'>."""
    dest = dest or rel.removeprefix("seed-compat/")
    target = root / "etc/systemd/system" / dest
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text if text is not None else (SYSTEMD_DIR / rel).read_text())
    return target


def install_all(root: Path) -> None:
    install(root, UNIT)
    install(root, OUR_DROPIN)
    for rel in DOCKER_DROPINS:
        install(root, rel)


def verify(root: Path, *units: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def assert_clean(root: Path, *units: str) -> None:
    rc, out = verify(root, *units)
    assert (rc, out) == (0, ""), f"systemd-analyze verify {units}: rc={rc}\n{out}"


def assert_rejected(root: Path, *units: str, expect: str) -> None:
    rc, out = verify(root, *units)
    assert rc != 0 or out, f"verify accepted a broken unit: {units}"
    assert expect in out, out


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def words(section: list[tuple[str, str]], key: str) -> list[str]:
    return [w for v in values(section, key) for w in v.split()]


# --- systemd-analyze verify ------------------------------------------------------------------


def test_unit_and_dropins_verify_clean(sysroot: Path) -> None:
    install_all(sysroot)
    assert_clean(sysroot, UNIT, "docker.service")


@pytest.mark.parametrize(
    ("rel", "old", "new", "expect"),
    [
        (UNIT, "Type=notify", "Type=notifyy", "notifyy"),
        (UNIT, "ExecStart=/usr/local/bin/pyflanneld", "ExecStart=/usr/local/bin/pyflanneldx", "pyflanneldx"),
        (UNIT, "RestartSec=5", "RestartSekunden=5", "RestartSekunden"),
        (UNIT, "LimitNOFILE=40000", "LimitNOFILE=many", "many"),
        (UNIT, "/bin/mkdir -p", "/bin/mkdirx -p", "mkdirx"),
        (OUR_DROPIN, "ExecStartPre=", "ExecStartPree=", "ExecStartPree"),
        (OUR_DROPIN, "ExecStartPre=/usr/bin/ln", "ExecStartPre=usr/bin/ln", "usr/bin/ln"),
        (DOCKER_DROPINS[0], "Requires=", "Requirez=", "Requirez"),
        (DOCKER_DROPINS[1], "ExecStart=/usr/bin/dockerd", "ExecStart=usr/bin/dockerd", "dockerd"),
    ],
)
def test_verify_rejects_broken_copies(sysroot: Path, rel: str, old: str, new: str, expect: str) -> None:
    install_all(sysroot)
    original = (SYSTEMD_DIR / rel).read_text()
    assert old in original
    install(sysroot, rel, text=original.replace(old, new, 1))
    assert_rejected(sysroot, UNIT, "docker.service", expect=expect)


def test_enable_creates_alias_and_docker_requirement(sysroot: Path) -> None:
    install_all(sysroot)
    proc = subprocess.run(
        ["systemctl", f"--root={sysroot}", "enable", UNIT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    etc = sysroot / "etc/systemd/system"
    for link in ("flanneld.service", "multi-user.target.wants/pyflanneld.service",
                 "docker.service.requires/pyflanneld.service"):
        assert os.readlink(etc / link) == "/etc/systemd/system/pyflanneld.service", link
    assert_clean(sysroot, UNIT, "flanneld.service", "docker.service")


def test_seed_dropins_apply_through_alias(sysroot: Path) -> None:
    """The CoreOS tutorial's drop-ins (named for flanneld.service) work once the unit is enabled."""
    install(sysroot, UNIT)
    for rel in SEED_DROPINS:
        install(sysroot, rel)
    subprocess.run(["systemctl", f"--root={sysroot}", "enable", UNIT], check=True, capture_output=True)
    assert_clean(sysroot, UNIT, "docker.service")
    # prove systemd reads flanneld.service.d/ for pyflanneld.service: break the seed drop-in
    seed = SEED_DROPINS[0]
    install(sysroot, seed, text=(SYSTEMD_DIR / seed).read_text() + "NoSuchKey=1\n")
    assert_rejected(sysroot, UNIT, expect="NoSuchKey")


def test_seed_docker_dropin_needs_the_alias(sysroot: Path) -> None:
    """Without "systemctl enable" there is no flanneld.service: the seed docker drop-in can't
    resolve it, which is why the README says to enable the unit."""
    install(sysroot, UNIT)
    install(sysroot, SEED_DROPINS[1])
    rc, out = verify(sysroot, "docker.service")
    assert rc != 0 and "flanneld.service" in out, out


# --- properties ------------------------------------------------------------------------------


def test_unit_properties() -> None:
    unit = parse_unit((SYSTEMD_DIR / UNIT).read_text())
    u, s, i = unit["Unit"], unit["Service"], unit["Install"]
    assert "network-online.target" in words(u, "Wants")
    assert "network-online.target" in words(u, "After")
    assert "docker.service" in words(u, "Before")
    assert values(s, "Type") == ["notify"]
    assert values(s, "EnvironmentFile") == ["-/run/flannel/options.env"]
    assert values(s, "ExecStartPre") == ["/bin/mkdir -p /run/flannel"]
    assert values(s, "ExecStart") == ["/usr/local/bin/pyflanneld $FLANNEL_OPTS"]
    assert values(s, "ExecStartPost") == [
        "/usr/local/bin/pyflanneld docker-opts -f ${FLANNELD_SUBNET_FILE} -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker"
    ]
    # defaults come before the environment file so options.env can override them
    keys = [k for k, _ in s]
    assert keys.index("Environment") < keys.index("EnvironmentFile")
    assert "FLANNELD_SUBNET_FILE=/run/flannel/subnet.env" in values(s, "Environment")
    assert values(s, "Restart") == ["always"]
    assert values(s, "RestartSec") == ["5"]
    assert values(s, "TimeoutStartSec") == ["300"]
    assert values(s, "LimitNOFILE") == ["40000"]
    assert values(i, "WantedBy") == ["multi-user.target"]
    assert values(i, "RequiredBy") == ["docker.service"]
    assert values(i, "Alias") == ["flanneld.service"]


def test_dropin_contents() -> None:
    link = "/usr/bin/ln -sf /etc/flannel/options.env /run/flannel/options.env"
    for rel in (OUR_DROPIN, SEED_DROPINS[0]):
        assert parse_unit((SYSTEMD_DIR / rel).read_text()) == {"Service": [("ExecStartPre", link)]}, rel
    assert parse_unit((SYSTEMD_DIR / DOCKER_DROPINS[0]).read_text()) == {
        "Unit": [("Requires", "pyflanneld.service"), ("After", "pyflanneld.service")]
    }
    assert parse_unit((SYSTEMD_DIR / SEED_DROPINS[1]).read_text()) == {
        "Unit": [("Requires", "flanneld.service"), ("After", "flanneld.service")]
    }
    opts = parse_unit((SYSTEMD_DIR / DOCKER_DROPINS[1]).read_text())["Service"]
    assert opts[0] == ("EnvironmentFile", "-/run/flannel/docker")
    assert values(opts, "ExecStart")[0] == ""  # reset docker.service's ExecStart first
    assert values(opts, "ExecStart")[1].startswith("/usr/bin/dockerd -H fd://")
    assert values(opts, "ExecStart")[1].endswith(" $DOCKER_NETWORK_OPTIONS")


def test_sample_options_env() -> None:
    assignments = {}
    for line in (SYSTEMD_DIR / "options.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and value and " " not in line, line
            assignments[key] = value
    assert set(assignments) == {"FLANNELD_IFACE", "FLANNELD_ETCD_ENDPOINTS"}
    assert all(url.startswith("http") for url in assignments["FLANNELD_ETCD_ENDPOINTS"].split(","))


def test_exec_start_post_writes_what_docker_dropin_reads(tmp_path: Path) -> None:
    """The unit's docker-opts arguments produce DOCKER_NETWORK_OPTIONS in the file that the docker
    drop-in loads, with the flannel options at the end."""
    unit = parse_unit((SYSTEMD_DIR / UNIT).read_text())
    cmd = values(unit["Service"], "ExecStartPost")[0].split()
    assert cmd[:2] == ["/usr/local/bin/pyflanneld", "docker-opts"]
    args = cmd[2:]
    opts = dockeropts.parse_args(args)
    assert (opts.combined_key, opts.docker_env) == ("DOCKER_NETWORK_OPTIONS", "/run/flannel/docker")
    env_file = parse_unit((SYSTEMD_DIR / DOCKER_DROPINS[1]).read_text())["Service"][0][1]
    assert env_file.lstrip("-") == opts.docker_env

    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker"
    args = [str(subnet_env) if a == "${FLANNELD_SUBNET_FILE}" else a for a in args]
    args = [str(out) if a == "/run/flannel/docker" else a for a in args]
    content = dockeropts.build_output(dockeropts.parse_args(args), dockeropts.parse_env_file(str(subnet_env)))
    assert content.endswith('DOCKER_NETWORK_OPTIONS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1450"\n')


def test_files_are_plain_and_readable() -> None:
    for path in SYSTEMD_DIR.rglob("*"):
        if path.is_file():
            mode = path.stat().st_mode
            assert stat.S_IMODE(mode) & 0o444 == 0o444 and not mode & 0o111, path
            assert path.read_text().endswith("\n"), path
