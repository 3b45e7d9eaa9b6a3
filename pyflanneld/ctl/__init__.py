"""Operator commands next to the daemon: `pyflanneld config|leases|lease|docker-opts …` (click).

`pyflanneld [flags]` stays the daemon with upstream's Go-style flags; cli.main hands argv here when
its first word is one of cli.COMMANDS. Every failure is one line on stderr: exit 2 for bad usage (with
the command's `--help` named), 1 for anything else (etcd unreachable, invalid config, refused
write). docker-opts keeps mk-docker-opts.sh's own conventions (see pyflanneld.dockeropts).
"""

from __future__ import annotations

import logging
import os
import sys

import click

from ..oneline import one_line
from .config_cmd import config
from .lease_cmd import lease, leases


@click.group(name="pyflanneld", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pyflanneld's operator commands (the daemon itself: pyflanneld [flags], see pyflanneld -h)."""


for _cmd in (config, leases, lease):
    cli.add_command(_cmd)


def _quiet_logs() -> None:
    """The stores log through structlog: keep warnings only, on stderr (stdout is the output).
    gRPC's C core writes its own lines to stderr (TLS failures): silenced, the error says it."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import structlog

    from .. import log

    log.setup(0, "logfmt")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _unknown_option(e: click.NoSuchOption, argv: list[str]) -> str:
    """click reports an unknown Go-style `-etcd-endpointz` as `-e`: name the word as typed."""
    name = e.option_name
    if len(name) == 2 and name[1] != "-":
        for word in argv:
            if word.startswith(name) and len(word) > 2 and not word.startswith("--"):
                return f"no such option: {word.split('=', 1)[0]}"
    return one_line(e.format_message())


def main(argv: list[str]) -> int:
    """Run `pyflanneld <command> …` (argv without the program name); returns the exit status."""
    if argv[:1] == ["docker-opts"]:  # a click command too, with mk-docker-opts.sh's exit codes and texts
        from ..dockeropts import main as docker_opts

        return docker_opts(argv[1:])
    _quiet_logs()
    try:
        rv = cli.main(argv, prog_name="pyflanneld", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # a group without its subcommand
        sys.stderr.write(e.ctx.get_help() + "\n")
        return 2
    except click.UsageError as e:
        path = e.ctx.command_path if e.ctx is not None else "pyflanneld"
        message = _unknown_option(e, argv) if isinstance(e, click.NoSuchOption) else one_line(e.format_message())
        print(f"{path}: {message} (see '{path} --help')", file=sys.stderr)
        return 2
    except click.ClickException as e:  # CtlError and click's own (unreadable file): exit 1
        print(f"pyflanneld: {one_line(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except click.Abort:  # Ctrl-C
        return 130
    except Exception as e:  # noqa: BLE001 - a bug must still end in one line
        print(f"pyflanneld: internal error: {e!r}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0
