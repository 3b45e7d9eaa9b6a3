"""Docker daemon options from flannel's subnet.env — a port of upstream ``dist/mk-docker-opts.sh``.

Usage (same options as the shell script)::

    pyflanneld docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

The output file is byte-identical to what ``mk-docker-opts.sh`` writes, e.g. for
``FLANNEL_SUBNET=10.1.74.1/24``, ``FLANNEL_MTU=1472``, ``FLANNEL_IPMASQ=false``::

    DOCKER_OPT_BIP="--bip=10.1.74.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=true"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"

Beyond the script (which ignores IPv6 in every upstream tag): when the file has
``FLANNEL_IPV6_SUBNET`` (dual-stack or IPv6-only flannel), one more option pair is written, what
docker's bridge needs to give containers addresses of the host's IPv6 subnet::

    DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fd80:0:0:48::/64"

(the subnet's network, sorted with the others by name: the combined line reads
``--bip=… --ip-masq=… --ipv6 --fixed-cidr-v6=… --mtu=…``). Without it the output is the script's,
byte for byte; an IPv6-only file (no ``FLANNEL_SUBNET``) gives no ``--bip`` and no route check.

Behaviour kept from the script: values in the env file override the process environment;
``DOCKER_OPT_*`` variables from the environment or the env file are emitted too (sorted by
name, like ``set`` lists them); an existing value of the combined key is prepended; ``-h``,
an unknown option or a missing option argument print the usage to stderr and exit 1; an
invalid ``FLANNEL_IPMASQ`` exits 1 before anything is written; after writing, a ``via`` route
for the subnet in ``ip route show`` (of the current network namespace) exits 1 with
"Your routing table already contains the subnet: ...".

Deliberate differences (all about failing loudly where the script went on silently):
a missing or unreadable env file is an error (the script wrote an empty ``DOCKER_OPTS=""``);
a combined key that is not a shell variable name is an error; the output is written
atomically (temp file + rename; symlinks, devices and FIFOs such as ``/dev/stdout`` are
written through directly)
and a write failure is an error; ``DOCKER_OPT_*`` values are taken as given (whitespace
collapsed like the script's unquoted ``echo``) instead of being re-evaluated by a shell.

The options (the script's ``getopts "f:d:icmk:?h"``) are parsed by click, which keeps getopts'
rules: clustered flags, attached or separate values, the end of options at ``--``, ``-`` or the
first other word. Two differences from the script: ``--help`` prints the usage on stdout and
exits 0 (like every pyflanneld command), and since click reads the whole command line before
acting, ``-h`` followed by a bad option reports the bad option (the script stopped at ``-h``);
both still print the usage and exit 1.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import click

from . import envfile

DEFAULT_FLANNEL_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_COMBINED_KEY = "DOCKER_OPTS"
DEFAULT_PROG = "pyflanneld docker-opts"

_OPT_PREFIX = "DOCKER_OPT_"
_SUBNET_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)/(\d+)$")
_IPV6_SUBNET_RE = re.compile(r"^[0-9A-Fa-f:.]+/\d{1,3}$")



class UsageError(Exception):
    """Bad command line: the message (may be empty) is printed before the usage text."""


class DockerOptsError(Exception):
    """A one-line, user-facing error; exit status 1."""


@dataclass
class Options:
    """The parsed docker-opts options: input (``-f``) and output (``-d``) paths, the combined
    variable's name (``-k``), which outputs to write (``-i``, ``-c``; both when neither is given),
    ``--ip-masq`` wanted (not ``-m``), and the words after the options (ignored, as the script)."""
    flannel_env: str = DEFAULT_FLANNEL_ENV
    docker_env: str = DEFAULT_DOCKER_ENV
    combined_key: str = DEFAULT_COMBINED_KEY
    indiv: bool = False
    combined: bool = False
    ipmasq: bool = True
    extra_args: list[str] = field(default_factory=list)


def usage_text(prog: str) -> str:
    """mk-docker-opts.sh's usage text with ``prog`` as the command name (tabs and blank lines as the
    script prints them)."""
    return (
        f"{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]\n"
        "\n"
        "Generate Docker daemon options based on flannel env file\n"
        "OPTIONS:\n"
        "\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env\n"
        "\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env\n"
        "\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500\n"
        "\t-c\tOutput combined Docker options into DOCKER_OPTS var\n"
        "\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)\n"
        "\t-m\tDo not output --ip-masq (useful for older Docker version)\n"
        "\n"
    )


class _Command(click.Command):
    """docker-opts as a click command with the script's conventions: `--help` shows the script's
    usage text (on stdout, exit 0; `-h`/`-?` print it on stderr and exit 1 like the script)."""

    def get_help(self, ctx: click.Context) -> str:
        return usage_text(ctx.command_path).rstrip("\n")


@click.command("docker-opts", cls=_Command, add_help_option=False,
               context_settings={"allow_interspersed_args": False})
@click.option("-f", "flannel_env", default=DEFAULT_FLANNEL_ENV, metavar="FLANNEL-ENV-FILE")
@click.option("-d", "docker_env", default=DEFAULT_DOCKER_ENV, metavar="DOCKER-ENV-FILE")
@click.option("-i", "indiv", is_flag=True)
@click.option("-c", "combined", is_flag=True)
@click.option("-m", "no_ipmasq", is_flag=True)
@click.option("-k", "combined_key", default=DEFAULT_COMBINED_KEY, metavar="COMBINED-KEY")
@click.option("-h", "-?", "usage", is_flag=True)
@click.help_option("--help")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED)
def command(**params: Any) -> int:
    """Generate Docker daemon options based on flannel env file."""
    opts = _options(params)
    try:
        run(opts, dict(os.environ))
    except DockerOptsError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _options(params: dict[str, Any]) -> Options:
    if params["usage"]:
        raise UsageError("")
    indiv, combined = params["indiv"], params["combined"]
    if not indiv and not combined:
        indiv = combined = True
    return Options(flannel_env=params["flannel_env"], docker_env=params["docker_env"],
                   combined_key=params["combined_key"], indiv=indiv, combined=combined,
                   ipmasq=not params["no_ipmasq"], extra_args=list(params["extra_args"]))


def _script_usage_error(e: click.UsageError) -> UsageError:
    """click's parse errors in the words of the script's getopts."""
    if isinstance(e, click.NoSuchOption):
        return UsageError(f"Illegal option -{e.option_name[1]}")
    if isinstance(e, click.BadOptionUsage):  # "Option '-k' requires an argument."
        return UsageError(f"No arg for {e.option_name} option")
    return UsageError(e.format_message())


def parse_args(argv: list[str]) -> Options:
    """POSIX getopts semantics, via click: clustered flags (-ic), attached or separate arguments
    (-kKEY / -k KEY, even -k -c), parsing stops at "--", "-" or the first non-option word.
    Raises UsageError with the script's message (empty for -h/-?)."""
    try:
        ctx = command.make_context(DEFAULT_PROG, list(argv))
    except click.UsageError as e:
        raise _script_usage_error(e) from None
    return _options(ctx.params)


def parse_env_file(path: str) -> dict[str, str]:
    """The NAME=VALUE assignments of the flannel env file at ``path``
    (:func:`pyflanneld.envfile.parse`; nothing is executed). Raises DockerOptsError (one line)
    when it is missing, not a regular file, unreadable or has an unbalanced quote."""
    if not os.path.exists(path):
        raise DockerOptsError(
            f"flannel env file {path} does not exist: start pyflanneld first "
            "or pass its --subnet-file with -f"
        )
    if not os.path.isfile(path):
        raise DockerOptsError(f"flannel env file {path} is not a regular file: pass the subnet.env path with -f")
    try:
        return envfile.read(path)
    except OSError as exc:
        raise DockerOptsError(f"cannot read flannel env file {path}: {exc.strerror}") from None
    except envfile.EnvFileError as exc:
        raise DockerOptsError(f"cannot parse {path} {exc}; fix the file") from None


def build_output(opts: Options, variables: dict[str, str]) -> str:
    """The docker env file content, exactly as mk-docker-opts.sh writes it."""
    values = dict(variables)
    subnet = values.get("FLANNEL_SUBNET", "")
    mtu = values.get("FLANNEL_MTU", "")
    ipmasq = values.get("FLANNEL_IPMASQ", "")
    if subnet:
        values["DOCKER_OPT_BIP"] = f"--bip={subnet}"
    subnet6 = values.get("FLANNEL_IPV6_SUBNET", "")
    if subnet6:
        values["DOCKER_OPT_IPV6"] = f"--ipv6 --fixed-cidr-v6={ipv6_cidr(subnet6)}"
    if mtu:
        values["DOCKER_OPT_MTU"] = f"--mtu={mtu}"
    if ipmasq and opts.ipmasq:
        # flannel masquerades itself when --ip-masq is on, so Docker must not (and vice versa).
        if ipmasq == "true":
            values["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif ipmasq == "false":
            values["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {ipmasq}")

    if not envfile.is_name(opts.combined_key):
        raise DockerOptsError(
            f"invalid combined key {opts.combined_key!r} for -k: use a shell variable name such as DOCKER_OPTS"
        )
    combined = values.get(opts.combined_key, "")
    if combined:
        combined += " "

    lines: list[str] = []
    for name in sorted(n for n in values if n.startswith(_OPT_PREFIX) and envfile.is_name(n)):
        value = " ".join(values[name].split())  # the script's unquoted `echo $VAR`: shell word splitting
        if opts.indiv:
            lines.append(f'{name}="{value}"\n')
        combined += f" {value}"
    if opts.combined:
        lines.append(f'{opts.combined_key}="{combined}"\n')
    return "".join(lines)


def ipv6_cidr(subnet6: str) -> str:
    """``FLANNEL_IPV6_SUBNET`` (``fd80:0:0:48::1/64``) → the network docker's ``--fixed-cidr-v6``
    takes (``fd80:0:0:48::/64``). Raises DockerOptsError for anything else."""
    try:
        if not _IPV6_SUBNET_RE.match(subnet6):
            raise ValueError
        return str(ipaddress.IPv6Network(subnet6, strict=False))
    except ValueError:
        raise DockerOptsError(f"FLANNEL_IPV6_SUBNET={subnet6} is not an IPv6 address/prefix such as "
                              "fd80:0:0:48::1/64") from None


def write_atomic(path: str, content: str) -> None:
    """Replace ``path`` with ``content`` via temp file + rename in the same directory.

    Only a missing path or a plain regular file is replaced. Anything else (a symlink such
    as ``/dev/stdout``, a device, a FIFO) is opened and truncated through the path, as the
    shell redirection did, so the link itself is never replaced."""
    data = content.encode("utf-8", errors="surrogateescape")
    try:
        st = os.lstat(path)  # never follow: a symlink such as /dev/stdout must survive
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise DockerOptsError(f"cannot write docker env file {path}: {exc.strerror}") from None
    try:
        if st is not None and not stat.S_ISREG(st.st_mode):
            with open(path, "wb") as fh:
                fh.write(data)
            return
        directory = os.path.dirname(os.path.abspath(path))
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DockerOptsError(
            f"cannot write docker env file {path}: {reason}; create its directory or choose another path with -d"
        ) from None


def conflicting_routes(subnet: str, route_table: str) -> str:
    """Lines of ``ip route show`` output that the script's
    ``grep <net>/<len> | grep via`` would print ('.' in the pattern matches any char)."""
    m = _SUBNET_RE.match(subnet)
    if m is None:
        raise DockerOptsError(f"FLANNEL_SUBNET={subnet} is not an IPv4 address/prefix such as 10.1.74.1/24")
    a, b, c, d, length = m.groups()
    pattern = re.compile(".".join((a, b, c, str(int(d) - 1))) + "/" + length)
    hits = [line for line in route_table.splitlines() if pattern.search(line) and "via" in line]
    return "\n".join(hits)


def check_routes(subnet: str) -> None:
    """Fail if this network namespace already routes the flannel subnet via a gateway."""
    try:
        proc = subprocess.run(["ip", "route", "show"], capture_output=True, text=True, check=False)
    except OSError as exc:
        print(
            f"warning: cannot run 'ip route show' ({exc.strerror}); routing table check skipped "
            "(install iproute2)",
            file=sys.stderr,
        )
        return
    if proc.returncode != 0:
        print(
            f"warning: 'ip route show' failed: {proc.stderr.strip()}; routing table check may be incomplete",
            file=sys.stderr,
        )
    hits = conflicting_routes(subnet, proc.stdout)
    if hits:
        raise DockerOptsError(f"Your routing table already contains the subnet: {hits}")


def run(opts: Options, environ: dict[str, str]) -> None:
    """What the script does: read the flannel env file over ``environ``, write the docker env file,
    then check the routing table for the subnet. Raises DockerOptsError (one line)."""
    variables = dict(environ)
    variables.update(parse_env_file(opts.flannel_env))
    content = build_output(opts, variables)
    write_atomic(opts.docker_env, content)
    subnet = variables.get("FLANNEL_SUBNET", "")
    if subnet:
        check_routes(subnet)


def main(argv: list[str], prog: str = DEFAULT_PROG) -> int:
    """Entry point; ``argv`` holds the options only (no program name). Returns the exit status:
    1 with one line on stderr on failure; 1 with the usage text for -h/-? and bad options."""
    try:
        return command.main(list(argv), prog_name=prog, standalone_mode=False)
    except (click.UsageError, UsageError) as e:
        exc = _script_usage_error(e) if isinstance(e, click.UsageError) else e
    if str(exc):
        sys.stderr.write(f"{exc}\n")
    sys.stderr.write(usage_text(prog))
    return 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
