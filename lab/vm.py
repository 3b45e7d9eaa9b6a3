"""Run commands under Debian's own kernel in a qemu VM, with this machine's filesystem shared in.

This machine's kernel lacks what some backends need (``wireguard`` and ``ipip`` device types, ESP
for ``ipsec``); Debian's stock kernel has them as modules. This module boots that kernel under
qemu, software-emulated (TCG: the machine has no usable hardware virtualisation), with this
machine's ``/`` shared into the VM read-only over 9p and made writable there by an overlay
(tmpfs upper). So the VM runs the same Python, venv, etcd, iproute2 and repository as the
machine itself, and the namespace lab works inside it unchanged. No guest networking: the
lab's namespaces, bridge and etcd all live inside the VM.

Public API::

    kernel = prepare()       # download (not install) + unpack Debian's kernel, depmod, vmlinux,
                             # initramfs; cached under $PYFLANNELD_VM_CACHE (/var/tmp/pyflanneld-vm)
    res = run(["python", "-m", "pytest", "tests/vm"], scratch=Path(...), timeout_s=1800)
    res.returncode           # the command's exit status in the guest (None: it never finished)
    res.output               # its stdout+stderr (scratch/output.log)
    res.console              # the serial console (kernel and init messages)
    res.seconds              # boot to power-off, wall clock

``python -m lab.vm prepare`` fills the cache; ``python -m lab.vm run -- CMD ...`` runs one command
and exits with its status.

How:

* kernel: ``apt-get download`` of the package behind ``linux-image-amd64``, ``dpkg-deb -x``,
  ``depmod -b``; the uncompressed ``vmlinux`` (the XZ stream inside ``vmlinuz``) boots directly
  through PVH, twice as fast as the compressed image under emulation.
* initramfs: static busybox + the virtio/9p/overlay modules (``INITRD_MODULES``, in load order).
  Its ``/init`` mounts the root share (``multidevs=remap``: without it the machine's /proc and
  /sys collide and ``ip netns add`` fails), an overlay over it, fresh proc/sys/dev/run/tmp, binds
  the unpacked modules onto ``/lib/modules/<version>`` (plain ``modprobe`` works), mounts the
  writable scratch share at the same path it has on the machine, and switches root.
* the command: ``guest.sh`` in the scratch directory, run by the host's busybox after the switch;
  it records the exit status in ``scratch/status`` and powers off. qemu's own exit status says
  nothing about the guest; the scratch share carries the results back.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import ROOT
from .netns import LabError

CACHE = Path(os.environ.get("PYFLANNELD_VM_CACHE", "/var/tmp/pyflanneld-vm"))
META_PACKAGE = "linux-image-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# loaded with insmod before the root share exists, in this order (virtio_ring before virtio)
INITRD_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                  "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay")
# loaded in the guest before the command runs (the backends' kernel features; the rest autoloads)
GUEST_MODULES = ("wireguard", "ipip", "esp4", "xfrm_user", "xfrm4_tunnel", "tunnel4", "veth", "bridge", "vxlan")
XZ_MAGIC = b"\xfd7zXZ\x00"
GUEST_ENV = "PYFLANNELD_VM_GUEST"  # "1" in the environment of test runs inside the VM (tests/test_vm.py)
MEMORY_MIB = 2048
CPUS = 2


@dataclass(frozen=True)
class Kernel:
    """A prepared Debian kernel: ``vmlinux`` (uncompressed, PVH-bootable), the initramfs and the
    unpacked ``lib/modules/<version>`` directory (bound into the guest)."""

    version: str
    vmlinux: Path
    initrd: Path
    modules: Path


@dataclass(frozen=True)
class VMResult:
    """What came back from one boot: the command's exit status (None if it never finished: boot
    failure, guest panic or timeout), its output, the serial console and the wall-clock time."""

    returncode: int | None
    output: str
    console: str
    seconds: float
    scratch: Path

    def tail(self, chars: int = 6000) -> str:
        """The end of the output and console, for an assertion message."""
        return (f"--- guest output (last {chars} chars) ---\n{self.output[-chars:]}\n"
                f"--- console (last 2000 chars) ---\n{self.console[-2000:]}")


def missing_tools() -> list[str]:
    """The host programs a VM run needs that are not installed (``make setup`` installs them)."""
    need = {QEMU: "qemu-system-x86", "cpio": "cpio", "depmod": "kmod", "dpkg-deb": "dpkg",
            "apt-get": "apt", str(BUSYBOX): "busybox-static"}
    return [f"{tool} ({pkg})" for tool, pkg in need.items()
            if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))]


def _sh(argv: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
    cp = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise LabError(f"{' '.join(map(str, argv))} failed (exit {cp.returncode}): "
                       f"{(cp.stderr or cp.stdout).strip()[-500:]}")
    return cp.stdout


def kernel_package() -> str:
    """The versioned package behind ``linux-image-amd64`` (e.g. ``linux-image-6.1.0-57-amd64``);
    runs ``apt-get update`` once when the package lists do not know it."""
    for attempt in (1, 2):
        out = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True).stdout
        m = re.search(r"Depends:\s*(linux-image-\S+)", out)
        if m:
            return m[1]
        if attempt == 1:
            _sh(["apt-get", "update", "-qq"])
    raise LabError(f"apt-cache knows no {META_PACKAGE}: check the machine's Debian package sources")


def _initrd_name() -> str:
    """The cached initramfs' file name: it carries a digest of /init and its modules, so a change
    to either builds a new one instead of booting a stale cached copy."""
    digest = hashlib.sha256((INIT + " ".join(INITRD_MODULES)).encode()).hexdigest()[:12]
    return f"initrd-{digest}.gz"


def _kernel_from(d: Path) -> Kernel:
    """The unpacked kernel in cache directory ``d``; its initramfs built first when missing."""
    version = (d / "version").read_text().strip()
    moddir = d / "root" / "lib" / "modules" / version
    initrd = d / _initrd_name()
    if not initrd.exists():
        for old in d.glob("initrd*.gz"):
            old.unlink()
        build_initrd(moddir, initrd)
    return Kernel(version, d / "vmlinux", initrd, moddir)


def prepare(cache: Path = CACHE) -> Kernel:
    """Make (once) and return the cached kernel; safe to call from several processes at once.
    Raises LabError with the failing step (missing tool, download, unpack)."""
    missing = missing_tools()
    if missing:
        raise LabError(f"the VM runner needs {', '.join(missing)}: run make setup")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pkg = kernel_package()
        d = cache / pkg
        if (d / "ready").exists():
            return _kernel_from(d)
        for old in cache.iterdir():  # an older kernel ABI or a half-built one
            if old.is_dir() and old.name.startswith("linux-image-"):
                shutil.rmtree(old, ignore_errors=True)
        d.mkdir()
        _sh(["apt-get", "download", pkg], cwd=d)
        deb = next(d.glob("*.deb"))
        _sh(["dpkg-deb", "-x", deb, d / "root"])
        deb.unlink()
        version = pkg.removeprefix("linux-image-")
        _sh(["depmod", "-b", d / "root", version])
        (d / "version").write_text(version + "\n")
        extract_vmlinux(d / "root" / "boot" / f"vmlinuz-{version}", d / "vmlinux")
        (d / "ready").touch()
        return _kernel_from(d)


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """The uncompressed kernel: the XZ stream embedded in the bzImage, decompressed."""
    data = vmlinuz.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise LabError(f"{vmlinuz}: no XZ stream inside (not an xz-compressed kernel)")
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    raw = dec.decompress(data[start:])
    if raw[:4] != b"\x7fELF":
        raise LabError(f"{vmlinuz}: the embedded XZ stream is not an ELF kernel")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(out)


def _module_paths(moddir: Path, names: Sequence[str]) -> list[Path]:
    dep = (moddir / "modules.dep").read_text()
    paths = {}
    for line in dep.splitlines():
        rel = line.split(":", 1)[0]
        paths[Path(rel).name.removesuffix(".ko")] = moddir / rel
    missing = [n for n in names if n not in paths]
    if missing:
        raise LabError(f"{moddir}: modules {missing} not found (built into this kernel or renamed?)")
    return [paths[n] for n in names]


INIT = r"""#!/bin/busybox sh
# /init of the pyflanneld lab VM (lab/vm.py): the machine's / over 9p, an overlay, then guest.sh.
/bin/busybox mkdir -p /proc /sys /dev /lower /upper /newroot
/bin/busybox --install -s /bin
export PATH=/bin
die() { echo "vm-init: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in __MODULES__; do insmod /modules/$m.ko || die "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower || die "root share"
mount -t tmpfs -o mode=0755 upper /upper && mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || die "overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run
# /tmp stays the overlay's (host content, writes kept in the VM): the repository may live there
mkdir -p $R/lib/modules/$vm_kver && mount --bind $R$vm_kmods $R/lib/modules/$vm_kver || die "modules"
mkdir -p $R$vm_scratch
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none scratch $R$vm_scratch || die "scratch share"
[ -f $R$vm_scratch/guest.sh ] || die "no guest.sh in the scratch share"
exec switch_root $R /bin/sh $vm_scratch/guest.sh
"""


def build_initrd(moddir: Path, out: Path) -> None:
    """initramfs (newc cpio, gzip): busybox, INITRD_MODULES and the /init above."""
    with tempfile.TemporaryDirectory(prefix="pyflanneld-initrd-") as tmp:
        t = Path(tmp)
        (t / "bin").mkdir()
        (t / "modules").mkdir()
        shutil.copy2(BUSYBOX, t / "bin" / "busybox")
        for p in _module_paths(moddir, INITRD_MODULES):
            shutil.copy2(p, t / "modules" / p.name)
        init = t / "init"
        init.write_text(INIT.replace("__MODULES__", " ".join(INITRD_MODULES)))
        init.chmod(0o755)
        files = _sh(["find", ".", "-mindepth", "1"], cwd=t)
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=t, input=files.encode(),
                              capture_output=True, check=True).stdout
        out.write_bytes(gzip.compress(cpio, 6))


GUEST_SH = """# run (by /bin/sh, not busybox: its applets would shadow the real ip, env, ...) by the VM's /init
# after switch_root; lab/vm.py writes it for each run
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
S={scratch}
echo "vm: up after $(cut -d' ' -f1 /proc/uptime)s" > /dev/console
hostname pyflanneld-vm
ip link set lo up
modprobe -a {modules} >> $S/output.log 2>&1 || echo "vm: modprobe failed" >> $S/output.log
cd {cwd}
env {env} {argv} >> $S/output.log 2>&1 < /dev/null
echo $? > $S/status.tmp && mv $S/status.tmp $S/status
sync
echo "vm: done after $(cut -d' ' -f1 /proc/uptime)s" > /dev/console
/bin/busybox poweroff -f
"""


def run(argv: Sequence[str], *, scratch: Path | None = None, cwd: Path = ROOT,
        env: Mapping[str, str] | None = None, timeout_s: float = 1800, memory_mib: int = MEMORY_MIB,
        cpus: int = CPUS, kernel: Kernel | None = None) -> VMResult:
    """Boot the VM, run ``argv`` (cwd ``cwd``, extra ``env``) in it, power off; see VMResult.

    ``scratch``: a directory on this machine, shared writable into the guest at the same path
    (the command can leave files there); a fresh temporary one when None. On timeout qemu is
    killed and ``returncode`` is None. Raises LabError when the kernel cannot be prepared or
    qemu cannot start."""
    kernel = kernel or prepare()
    scratch = Path(scratch or tempfile.mkdtemp(prefix="pyflanneld-vm-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("status", "output.log", "console.log"):
        with contextlib.suppress(FileNotFoundError):
            (scratch / name).unlink()
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in (env or {}).items())
    (scratch / "guest.sh").write_text(GUEST_SH.format(
        scratch=shlex.quote(str(scratch)), modules=" ".join(GUEST_MODULES), cwd=shlex.quote(str(cwd)),
        env=env_words, argv=shlex.join([str(a) for a in argv])))
    (scratch / "output.log").touch()
    cmdline = (f"console=ttyS0 quiet panic=-1 vm_kver={kernel.version} vm_kmods={kernel.modules} "
               f"vm_scratch={scratch}")
    qemu = [
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
        "-kernel", str(kernel.vmlinux), "-initrd", str(kernel.initrd), "-append", cmdline,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={scratch},mount_tag=scratch,security_model=none,multidevs=remap",
    ]
    start = time.monotonic()
    with open(scratch / "console.log", "wb") as console:
        try:
            proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        except OSError as e:
            raise LabError(f"cannot start {QEMU}: {e}: run make setup") from None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - start
    status = scratch / "status"
    rc = int(status.read_text().strip()) if status.exists() else None
    return VMResult(rc, (scratch / "output.log").read_text(errors="replace"),
                    (scratch / "console.log").read_text(errors="replace"), seconds, scratch)


def main(args: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.vm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="download and prepare the kernel and initramfs (cached)")
    r = sub.add_parser("run", help="boot, run a command in the guest, print its output, exit with its status")
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    ns = ap.parse_args(args)
    try:
        if ns.cmd == "prepare":
            k = prepare()
            print(f"kernel {k.version}: {k.vmlinux}, {k.initrd}")
            return 0
        argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
        res = run(argv or ["true"], timeout_s=ns.timeout)
    except LabError as e:
        print(f"lab.vm: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(res.output)
    print(f"[vm] exit status {res.returncode} after {res.seconds:.1f} s (scratch {res.scratch})", file=sys.stderr)
    if res.returncode is None:
        sys.stderr.write(res.console[-3000:])
    return 1 if res.returncode is None else res.returncode


if __name__ == "__main__":
    sys.exit(main())
