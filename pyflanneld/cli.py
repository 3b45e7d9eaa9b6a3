"""Entry point: `pyflanneld [flags]` (the daemon) and the operator commands `pyflanneld config|leases|lease|docker-opts …`.

Every user-facing failure is one line on stderr and an exit code (2: bad usage, 1: bad value or
fatal setup error) — never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from ipaddress import IPv4Address, IPv6Address

from . import __version__
from .options import BY_NAME, MAX_LEASE_TTL_S, OptionError, Options, UsageError, parse_args, usage

# First words that select an operator command (pyflanneld.ctl) instead of the daemon: the daemon
# takes flags only, so none of these can be a daemon command line.
COMMANDS = ("config", "leases", "lease", "docker-opts")


def validate(o: Options) -> None:
    """Checks upstream makes after parsing, plus ours; raises OptionError (exit 1)."""
    for name in o.values:
        f = BY_NAME[name]
        if f.unsupported and o.values[name] != f.default:
            raise OptionError(f"-{name}: {f.unsupported}")
    margin = o.subnet_lease_renew_margin_s
    if "subnet-lease-renew-margin" in o.from_cli or margin != BY_NAME["subnet-lease-renew-margin"].default:
        if margin % 60 == 0 and not (60 <= margin <= 1439 * 60):
            raise OptionError("Invalid subnet-lease-renew-margin option, out of acceptable range "
                              "(1..1439 minutes)")
    if margin <= 0:
        raise OptionError("Invalid subnet-lease-renew-margin option, out of acceptable range (must be > 0)")
    ttl = o.subnet_lease_ttl_s
    if ttl < 1:
        raise OptionError(f"--subnet-lease-ttl must be at least 1s (got {ttl}s)")
    if ttl > MAX_LEASE_TTL_S:
        raise OptionError(f"--subnet-lease-ttl {ttl:g}s is longer than etcd allows a lease to be "
                          f"({MAX_LEASE_TTL_S}s, about 285 years): use e.g. 24h")
    if margin >= ttl:
        raise OptionError(f"--subnet-lease-renew-margin ({margin:g}s) must be shorter than "
                          f"--subnet-lease-ttl ({ttl:g}s): lower the margin or raise the TTL")
    if o.public_ip:
        try:
            IPv4Address(o.public_ip)
        except ValueError:
            raise OptionError(f"--public-ip {o.public_ip!r} is not an IPv4 address (no prefix length: "
                              "e.g. --public-ip 192.168.1.10)") from None
    if o.public_ipv6:
        try:
            if "%" in o.public_ipv6:
                raise ValueError
            IPv6Address(o.public_ipv6)
        except ValueError:
            raise OptionError(f"invalid public IPv6 address: {o.public_ipv6} (an IPv6 address without prefix "
                              "length or zone, e.g. --public-ipv6 2001:db8::10)") from None
    if not 0 <= o.healthz_port <= 65535:
        raise OptionError(f"--healthz-port {o.healthz_port} is out of range (0..65535)")
    if o.iptables_resync_s < 1:
        raise OptionError(f"--iptables-resync must be at least 1 second (got {o.iptables_resync_s})")
    if o.log_format not in ("auto", "console", "logfmt", "json"):
        raise OptionError(f"--log-format {o.log_format!r}: use auto, console, logfmt or json")
    for flag, path in (("--etcd-cafile", o.etcd_cafile), ("--etcd-certfile", o.etcd_certfile),
                       ("--etcd-keyfile", o.etcd_keyfile)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise OptionError(f"cannot read {flag} {path}: {e.strerror}") from None
    if bool(o.etcd_certfile) != bool(o.etcd_keyfile):
        raise OptionError("--etcd-certfile and --etcd-keyfile must be given together")


def _sighup_while_starting(_signum: int, _frame: object) -> None:
    import structlog

    structlog.get_logger().info("SIGHUP received while starting: nothing to reload, pyflanneld keeps running")


def main(argv: list[str] | None = None) -> None:
    """The ``pyflanneld`` console script: an operator command (``config``, ``leases``, ``lease``,
    ``docker-opts``) when ``argv`` (default ``sys.argv[1:]``) starts with one, else the daemon with
    upstream flanneld's flags. Never returns: exits 0 (help, version, clean stop), 1 (a bad flag
    value or a fatal error: one line on stderr) or 2 (usage error, as Go's flag package)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        from .ctl import main as ctl_main

        sys.exit(ctl_main(argv))
    try:
        opts = parse_args(argv)
    except UsageError as e:
        misplaced = next((w for w in argv if w in COMMANDS), None)  # `pyflanneld --etcd-… leases`
        if misplaced:
            print(f"pyflanneld: {e}; an operator command comes first: pyflanneld {misplaced} … --etcd-…",
                  file=sys.stderr)
        else:
            print(f"pyflanneld: {e}", file=sys.stderr)
        print("Run 'pyflanneld -h' for the list of flags.", file=sys.stderr)
        sys.exit(2)
    if opts.help:
        sys.stderr.write(usage())
        sys.exit(0)
    if opts.version:
        print(__version__, file=sys.stderr)
        sys.exit(0)
    try:
        validate(opts)
    except OptionError as e:
        print(f"pyflanneld: {e}", file=sys.stderr)
        sys.exit(1)

    from . import log

    log.setup(opts.v, opts.log_format)
    # The event loop's SIGHUP handler (daemon.run) comes only after the imports below, which take
    # ~0.5 s on a busy host: a SIGHUP in that window (a reload right after a restart) killed the
    # daemon without a word. Python handlers are not inherited across exec (SIG_IGN would be).
    signal.signal(signal.SIGHUP, _sighup_while_starting)
    from .daemon import run

    try:
        code = run(opts)
    except KeyboardInterrupt:
        code = 0
    except Exception as e:  # noqa: BLE001 - a bug must still end in one line; -v 1 shows the traceback
        if opts.v >= 1:
            raise
        print(f"pyflanneld: internal error: {e!r} (run with -v 1 for the traceback)", file=sys.stderr)
        code = 1
    # The daemon has shut down and keeps nothing that needs tearing down (leases, kernel state and
    # rules stay by design). Leave now: a worker thread still blocked in a cloud SDK or an
    # executor call would otherwise hold the interpreter's exit until its own timeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
