"""The one reader of KEY=VALUE env files (subnet.env; the docker options file's input).

Format read: the forms that a shell's ``source`` (upstream ``dist/mk-docker-opts.sh`` runs
``source $flannel_env``), systemd's ``EnvironmentFile=`` and upstream's godotenv reader of
subnet.env (``ReadCIDRsFromSubnetFile``, ``pkg/subnet/subnet.go``) all read the same way, plus the
shell's several assignments on a line::

    # a comment line; blank lines are skipped
    FLANNEL_NETWORK=10.5.0.0/16          NAME=VALUE; NAME is [A-Za-z_][A-Za-z0-9_]*
    export FLANNEL_MTU=1450              a leading ``export`` is dropped
    FLANNEL_IPMASQ='false'               '…' taken literally; "…" with backslash escapes
    A=1 B=2                              several assignments on one line, as in the shell

A line is split into words by shell rules (:mod:`shlex`, POSIX mode, ``#`` starts a comment);
each word ``NAME=VALUE`` whose NAME is a shell variable name is an assignment, other words are
ignored (nothing is executed or expanded: ``$X`` stays ``$X``). A later assignment of a name
overrides an earlier one. An unbalanced quote raises :class:`EnvFileError` naming the line.

Where this differs from the readers it stands in for (none of it in a file flanneld writes):
``NAME = VALUE`` (spaces around ``=``) is no assignment, as in the shell (godotenv would take
it); ``NAME=a b`` gives ``a`` (the shell runs ``b`` with NAME=a; systemd takes ``a b``).
"""

from __future__ import annotations

import os
import re
import shlex

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """A line of an env file that cannot be split into words (an unbalanced quote). ``lineno``
    is the 1-based line number."""

    def __init__(self, lineno: int, reason: str):
        super().__init__(f"line {lineno}: {reason}")
        self.lineno = lineno


def is_name(text: str) -> bool:
    """True when ``text`` is a shell variable name (``[A-Za-z_][A-Za-z0-9_]*``)."""
    return _NAME_RE.fullmatch(text) is not None


def parse(text: str) -> dict[str, str]:
    """The assignments of an env file's ``text`` (format in the module docstring) as
    ``{NAME: VALUE}``, in file order, quotes removed. Raises :class:`EnvFileError`."""
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            words = shlex.split(line, comments=True, posix=True)
        except ValueError as exc:
            raise EnvFileError(lineno, str(exc)) from None
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep and is_name(name):
                values[name] = value
    return values


def read(path: str | os.PathLike[str]) -> dict[str, str]:
    """:func:`parse` of the file at ``path`` (read as UTF-8; undecodable bytes kept as surrogate
    escapes). Raises OSError (FileNotFoundError when absent) and :class:`EnvFileError`."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse(fh.read())
