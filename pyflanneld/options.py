"""flanneld's command-line flags, parsed the way Go's `flag` package does, plus FLANNELD_* env.

Go syntax: `-flag`, `--flag`, `-flag=value`, `--flag value`; booleans take no separate value
(`-ip-masq`, `-ip-masq=false`). Unknown flags exit 2. Environment: for each flag not given on the
command line, `FLANNELD_<NAME>` (upper case, `-` → `_`) is applied when non-empty (upstream's
flagutil.SetFlagsFromEnv); a bad env value is a warning, not fatal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

HOUR = 3600
MAX_DURATION_S = (2**63 - 1) / 1e9  # Go's time.Duration (int64 nanoseconds, ~292 years)
MAX_LEASE_TTL_S = 9_000_000_000  # etcd's MaxLeaseTTL: a longer lease TTL is refused ("too large lease TTL")


class UsageError(Exception):
    """Bad command line: exit 2 with this one line."""


class OptionError(Exception):
    """A flag value that parses but is not acceptable: exit 1 with this one line."""


@dataclass(frozen=True)
class Flag:
    """One flanneld flag: its name (without dashes), how its text is read (``kind``: "str",
    "int", "bool", "list" — repeatable —, "duration" — a Go duration or seconds —, or
    "duration_min" — whole minutes, as upstream, or a Go duration), its default (durations in
    seconds), its help text, and for a flag upstream has but pyflanneld refuses, why."""

    name: str
    kind: str  # "str" | "int" | "bool" | "list" | "duration" | "duration_min"
    default: Any
    help: str
    unsupported: str = ""  # non-empty: setting it to a non-default value is refused with this text
    seconds: bool = False  # an "int" flag whose value is seconds (durations always are)

    @property
    def attr(self) -> str:
        """The :class:`Options` attribute that holds the value: the name with ``-`` → ``_``, and
        ``_s`` added when the value is seconds (``subnet-lease-renew-margin``, given in minutes,
        is held as ``subnet_lease_renew_margin_s``)."""
        unit = "_s" if self.seconds or self.kind in ("duration", "duration_min") else ""
        return self.name.replace("-", "_") + unit

    @property
    def env_var(self) -> str:
        """The variable that sets this flag when the command line does not: ``etcd-endpoints`` →
        ``FLANNELD_ETCD_ENDPOINTS`` (upstream's flagutil.SetFlagsFromEnv naming, prefix FLANNELD)."""
        return "FLANNELD_" + self.name.upper().replace("-", "_")


_KUBE = "Kubernetes subnet manager mode is not supported by pyflanneld; use the etcd datastore (--etcd-endpoints)"

FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", "str", "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints"),
    Flag("etcd-prefix", "str", "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", "str", "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", "str", "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", "str", "", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", "str", "", "username for BasicAuth to etcd"),
    Flag("etcd-password", "str", "", "password for BasicAuth to etcd"),
    Flag("etcd-api", "str", "auto", "etcd API for config and leases: auto (v3, else v2 if the config is there), v3 or v2 [pyflanneld]"),
    Flag("iface", "list", [], "interface to use (IP or name) for inter-host communication; can be given several times"),
    Flag("iface-regex", "list", [], "regex expression (Go/RE2 syntax) to match the first interface to use (IP or name); can be given several times"),
    Flag("iface-can-reach", "str", "", "detect the interface to use by the route to this IP"),
    Flag("subnet-file", "str", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written to"),
    Flag("public-ip", "str", "", "IP accessible by other nodes for inter-host communication"),
    Flag("public-ipv6", "str", "", "IPv6 accessible by other nodes for inter-host communication"),
    Flag("subnet-lease-renew-margin", "duration_min", 60 * 60, "subnet lease renewal margin, in minutes (or a duration like 30s)"),
    Flag("subnet-lease-ttl", "duration", 24 * HOUR, "TTL of the subnet lease, e.g. 24h, 10m, 30s [pyflanneld]"),
    Flag("ip-masq", "bool", False, "setup IP masquerade rule for traffic destined outside of overlay network"),
    Flag("ip-masq-fully-random-disable", "bool", False, "disable --random-fully in the MASQUERADE rule"),
    Flag("kube-subnet-mgr", "bool", False, "contact the Kubernetes API for subnet assignment instead of etcd", unsupported=_KUBE),
    Flag("kube-api-url", "str", "", "Kubernetes API server URL", unsupported=_KUBE),
    Flag("kube-annotation-prefix", "str", "flannel.alpha.coreos.com", "Kubernetes annotation prefix", unsupported=_KUBE),
    Flag("kubeconfig-file", "str", "", "kubeconfig file location", unsupported=_KUBE),
    Flag("net-config-path", "str", "/etc/kube-flannel/net-conf.json", "path to the network configuration file (kube mode)", unsupported=_KUBE),
    Flag("set-node-network-unavailable", "bool", True, "set NetworkUnavailable=False on the node (kube mode)", unsupported=_KUBE),
    Flag("version", "bool", False, "print version and exit"),
    Flag("healthz-ip", "str", "0.0.0.0", "the IP address for healthz server to listen"),
    Flag("healthz-port", "int", 0, "the port for healthz server to listen (0 to disable)"),
    Flag("iptables-resync", "int", 5, "resync period for iptables rules, in seconds", seconds=True),
    Flag("iptables-forward-rules", "bool", True, "add default accept rules to FORWARD chain in iptables"),
    Flag("ip-blackhole-route", "bool", False, "keep a blackhole route for the local subnet"),
    Flag("log-format", "str", "auto", "log format: auto (console on a terminal, else key=value), console, logfmt or json [pyflanneld]"),
    Flag("v", "int", 0, "log level for V logs (1 and up: debug)"),
    Flag("vmodule", "str", "", "comma-separated list of pattern=N settings (accepted for compatibility)"),
    Flag("log_backtrace_at", "str", "", "accepted for compatibility"),
)

REMOVED = {
    "listen": "client/server mode (--listen) was removed in flannel v0.8.0 and is not supported",
    "remote": "client/server mode (--remote) was removed in flannel v0.8.0 and is not supported",
    "remote-keyfile": "client/server mode (--remote-keyfile) was removed in flannel v0.8.0 and is not supported",
    "remote-certfile": "client/server mode (--remote-certfile) was removed in flannel v0.8.0 and is not supported",
    "remote-cafile": "client/server mode (--remote-cafile) was removed in flannel v0.8.0 and is not supported",
    "networks": "multi-network mode (--networks) was removed in flannel v0.8.0 and is not supported",
    "subnet-dir": "multi-network mode (--subnet-dir) was removed in flannel v0.8.0 and is not supported",
    "use-multi-cluster-cidr": "--use-multi-cluster-cidr existed only in flannel v0.22 (kube mode) and is not supported",
}

BY_NAME = {f.name: f for f in FLAGS}
BY_ATTR = {f.attr: f for f in FLAGS}
# What Go's strconv.ParseBool accepts: "--ip-masq true" is a stray argument, not a value.
GO_BOOL_WORDS = frozenset({"1", "0", "t", "f", "T", "F", "true", "false", "TRUE", "FALSE", "True", "False"})
SECRET_FLAGS = frozenset({"etcd-password"})  # never shown: logs, /readyz, errors
_SCHEME_RE = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
# [scheme://]host[:port][/path] without userinfo: a whole endpoint (host a name, IPv4 or [IPv6])
_ENDPOINT_RE = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9+.-]*://|(?!\S*://))(?:\[[^\]@/\s]*\]|[^\s:/@\[\]]+)(?::\d+)?(?:/\S*)?\s*")


def split_urls(spec: str) -> list[str]:
    """A comma-separated list of URLs (``--etcd-endpoints``), keeping a ',' inside a password
    together: a piece that is no complete ``[scheme://][userinfo@]host[:port]`` (``http://user:pa``)
    takes the pieces after it up to one with an '@' (``ss@host``), and a piece that starts with '@'
    always continues the one before. (A password whose part before a ',' is all digits, right after
    the user name, is still ambiguous — ``http://h:1,2@x`` — so percent-encode such a ',' as %2C.)"""
    pieces = spec.split(",")
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if out and (piece.startswith("@") or (
                out[-1].strip() and not _ENDPOINT_RE.fullmatch(split_userinfo(out[-1])[1])
                and any("@" in p for p in pieces[i:]))):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def split_userinfo(url: str) -> tuple[str | None, str]:
    """``scheme://user:password@host:port`` → (``user:password``, ``scheme://host:port``); (None,
    url) without '@'. The userinfo runs to the LAST '@', so an unencoded '@', '/' or ' ' in the
    password stays in it (a URL parser would cut it at the first '/' and show it as a port or path)."""
    at = url.rfind("@")
    if at < 0:
        return None, url
    m = _SCHEME_RE.match(url)
    start = m.end() if m else len(url) - len(url.lstrip())
    return url[start:at], url[:start] + url[at + 1:]


def mask_url_passwords(text: str) -> str:
    """`http://user:pw@host:2379,https://b` → `http://user:***@host:2379,https://b`: the password
    part of every URL's userinfo masked (the user name stays, to say which one is set), whatever
    characters the password holds (split_urls, split_userinfo)."""
    if "@" not in text:
        return text
    out = []
    for url in split_urls(text):
        userinfo, rest = split_userinfo(url)
        if userinfo is None or ":" not in userinfo:
            out.append(url)
            continue
        m = _SCHEME_RE.match(rest)
        head = m.end() if m else len(rest) - len(rest.lstrip())
        out.append(f"{rest[:head]}{userinfo.split(':', 1)[0]}:***@{rest[head:]}")
    return ",".join(out)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Go duration (`24h`, `1h30m`, `90s`) in seconds; a bare number means seconds.
    Raises ValueError for anything else, and (as Go) for more than MAX_DURATION_S."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        total = float(t)
    else:
        pos, total = 0, 0.0
        for m in _DURATION_RE.finditer(t):
            if m.start() != pos:
                break
            total += float(m[1]) * _UNITS[m[2]]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(f"invalid duration {text!r}")
    if total > MAX_DURATION_S:
        raise ValueError(f"invalid duration {text!r}: longer than Go's maximum (about 292 years)")
    return total


def _convert(flag: Flag, raw: str) -> Any:
    if flag.kind in ("str", "list"):
        return raw
    if flag.kind == "int":
        try:
            return int(raw, 0)
        except ValueError:
            raise ValueError(f"invalid value {raw!r} for flag -{flag.name}: parse error") from None
    if flag.kind == "bool":
        low = raw.lower()
        if low in ("1", "t", "true"):
            return True
        if low in ("0", "f", "false"):
            return False
        raise ValueError(f"invalid boolean value {raw!r} for -{flag.name}: parse error")
    if flag.kind == "duration":
        try:
            return parse_duration(raw)
        except ValueError as e:
            raise ValueError(f"invalid value {raw!r} for flag -{flag.name}: {e}") from None
    if flag.kind == "duration_min":  # upstream: int minutes; we also accept a Go duration
        try:
            return int(raw, 10) * 60
        except ValueError:
            try:
                return parse_duration(raw)
            except ValueError:
                raise ValueError(f"invalid value {raw!r} for flag -{flag.name}: parse error") from None
    raise AssertionError(flag.kind)


@dataclass
class Options:
    """The daemon's settings: ``values`` by flag name (durations in seconds), read as attributes
    named by :attr:`Flag.attr` (``o.etcd_endpoints``, ``o.subnet_lease_ttl_s``,
    ``o.subnet_lease_renew_margin_s``, ``o.iptables_resync_s``); ``from_cli``: the flags given
    on the command line; ``env_warnings``: FLANNELD_* values that could not be used."""

    values: dict[str, Any] = field(default_factory=dict)
    from_cli: set[str] = field(default_factory=set)
    env_warnings: list[str] = field(default_factory=list)
    help: bool = False

    @classmethod
    def defaults(cls) -> Options:
        """Every flag at its default (lists copied), nothing from the command line or environment."""
        return cls(values={f.name: (list(f.default) if f.kind == "list" else f.default) for f in FLAGS})

    def __getattr__(self, item: str) -> Any:
        flag = BY_ATTR.get(item)
        if flag is None:
            raise AttributeError(item)
        return self.values[flag.name]

    def redacted(self) -> dict[str, Any]:
        """All values for a start-up log line, secrets masked: --etcd-password and any password
        inside a URL (`--etcd-endpoints http://user:pw@host:2379` → `http://user:***@host:2379`)."""
        out: dict[str, Any] = {}
        for k, v in self.values.items():
            if k in SECRET_FLAGS and v:
                v = "***"
            elif isinstance(v, str):
                v = mask_url_passwords(v)
            elif isinstance(v, list):
                v = [mask_url_passwords(x) if isinstance(x, str) else x for x in v]
            out[k] = v
        return out


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> Options:
    """Parse like Go's flag package (stops at the first non-flag argument or `--`)."""
    env = os.environ if environ is None else environ
    opts = Options.defaults()
    i = 0
    bare_bool = ""  # a boolean flag given without "=" just before this argument
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            if bare_bool and arg in GO_BOOL_WORDS:
                raise UsageError(
                    f"--{bare_bool} {arg}: a boolean flag takes its value after '=': write --{bare_bool}={arg} "
                    f"(upstream's Go flag parsing stops at {arg!r}, leaves --{bare_bool} on and ignores every "
                    "flag after it)")
            raise UsageError(f"unexpected argument {arg!r}: flanneld takes flags only (see -h)")
        bare_bool = ""
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, val = body.partition("=")
        if name in ("h", "help"):
            opts.help = True
            continue
        if name in REMOVED:
            raise UsageError(REMOVED[name])
        flag = BY_NAME.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not eq:
            if flag.kind == "bool":
                val = "true"
                bare_bool = name
            else:
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                val = argv[i]
                i += 1
        try:
            v = _convert(flag, val)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if flag.kind == "list":
            if name not in opts.from_cli:
                opts.values[name] = []
            opts.values[name].append(v)
        else:
            opts.values[name] = v
        opts.from_cli.add(name)

    if opts.values["version"] or opts.help:
        return opts  # upstream checks --version before reading the environment

    for flag in FLAGS:
        if flag.name in opts.from_cli or flag.name == "version":
            continue
        key = flag.env_var
        raw = env.get(key, "")
        if raw == "":
            continue
        try:
            v = _convert(flag, raw)
        except ValueError as e:
            opts.env_warnings.append(f"failed to set flag from env {key}: {e}")
            continue
        opts.values[flag.name] = [v] if flag.kind == "list" else v
    return opts


def usage() -> str:
    """The ``-h`` text: the operator commands, then every flag in Go's ``flag.PrintDefaults`` layout
    with its default (durations as Go prints them, the renew margin in minutes)."""
    lines = ["Usage: pyflanneld [OPTION]...",
             "       pyflanneld config get|validate|set ...      the network config in etcd",
             "       pyflanneld leases [-o table|json|yaml]      the subnet leases in etcd",
             "       pyflanneld lease reserve|release SUBNET ... reservations",
             "       pyflanneld docker-opts [-f FILE] [-d FILE] [-i] [-c] [-m] [-k KEY]",
             "       (each command: --help; they take the --etcd-* flags and FLANNELD_ETCD_* variables below)",
             ""]
    for f in FLAGS:
        kind = {"str": " string", "int": " int", "bool": "", "list": " value", "duration": " duration",
                "duration_min": " int"}[f.kind]
        default = f.default
        if f.kind == "duration":
            default = f"{int(f.default // 3600)}h" if f.default % 3600 == 0 else f"{f.default}s"
        elif f.kind == "duration_min":
            default = int(f.default // 60)
        dflt = f" (default {default!r})" if default not in ("", [], False, 0) else ""
        lines.append(f"  -{f.name}{kind}\n    \t{f.help}{dflt}")
    return "\n".join(lines) + "\n"
