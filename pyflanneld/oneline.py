"""One line of text from anything multi-line: what error messages and log fields carry.

Every user-facing failure is one line (a command's stderr, an API's error text, a YAML parser's
message); this is the one way they are made so.
"""

from __future__ import annotations


def one_line(text: object, limit: int | None = None) -> str:
    """``str(text)`` on one line: its lines stripped, blank ones dropped, the rest joined by one
    space (within a line the text is kept as it is: an API's message stays greppable); cut to
    ``limit`` characters plus "…" when longer (None: no limit)."""
    s = " ".join(part for line in str(text).splitlines() if (part := line.strip()))
    return s if limit is None or len(s) <= limit else s[:limit] + "…"
