"""The one env-file reader (pyflanneld.envfile): the forms subnet.env, mk-docker-opts.sh's
``source`` and systemd's EnvironmentFile= share; errors name the line; nothing is executed."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflanneld import envfile


def test_forms() -> None:
    text = ("# comment\n\nFLANNEL_NETWORK=10.5.0.0/16\nexport FLANNEL_MTU=1450\n"
            "FLANNEL_IPMASQ='false'\nQ=\"a b\"\nB=x=y\nA=1 C=2\nX=$HOME\n1BAD=no\n  # indented comment\n")
    assert envfile.parse(text) == {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_MTU": "1450",
                                   "FLANNEL_IPMASQ": "false", "Q": "a b", "B": "x=y", "A": "1", "C": "2",
                                   "X": "$HOME"}


def test_later_assignment_wins_and_spaces_around_equals_are_no_assignment() -> None:
    assert envfile.parse("A=1\nA=2\nB = 3\n") == {"A": "2"}


def test_unbalanced_quote_names_the_line() -> None:
    with pytest.raises(envfile.EnvFileError, match=r"^line 2: No closing quotation") as e:
        envfile.parse("A=1\nB='x\n")
    assert e.value.lineno == 2


def test_read_missing_file_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        envfile.read(tmp_path / "absent.env")


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                       st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=20)))
def test_shell_quoted_values_round_trip(values: dict[str, str]) -> None:
    """Whatever a shell-quoted NAME=VALUE file holds comes back as written (untrusted text in)."""
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
    assert envfile.parse(text) == values
