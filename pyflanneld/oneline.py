"""One line of text from anything multi-line: what error messages and log fields carry.

Every user-facing failure is one line (a command's stderr, an API's error text, a YAML parser's
message); this is the one way they are made so.
"""

from __future__ import annotations


def one_line(text: object, limit: int | None = None) -> str:
    """``str(text)`` with every run of whitespace (line breaks, tabs, spaces) made one space and
    none at either end; cut to ``limit`` characters plus "…" when longer (None: no limit)."""
    s = " ".join(str(text).split())
    return s if limit is None or len(s) <= limit else s[:limit] + "…"
