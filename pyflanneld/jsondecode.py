"""One JSON decoder for everything read from etcd (the network config and every lease value).

Python's ``json.loads`` differs from Go's ``encoding/json`` (what upstream flanneld decodes with) in
ways a hostile or broken value can exploit:

* nesting: Go stops at depth 10,000; Python recurses and raises ``RecursionError`` at ~1,000, which
  is not a ``ValueError`` and used to crash the watch task and startup. Here values deeper than
  :data:`MAX_DEPTH` are refused before parsing (flannel's own values are at most 3 deep);
* ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON: Go's scanner rejects them, Python accepts;
* numbers out of range (``1e400`` becomes ``inf`` in Python and then ``OverflowError`` in ``int()``):
  Go fails to decode them into any numeric field. Here every number must fit a 64-bit field (an
  integer in ``[-2**63, 2**64)``, a float finite), and the error names where the number is;
* size: etcd accepts values up to 1.5 MiB by default; nothing flannel writes comes near
  :data:`MAX_BYTES`.

:func:`decode_json` raises only :class:`JSONValueError` (a ``ValueError``); callers turn it into
their own error type (``ConfigError``, ``LeaseFormatError``).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 100  # arrays/objects inside each other
MAX_BYTES = 1 << 20  # 1 MiB
_INT_MIN, _INT_LIMIT = -(1 << 63), 1 << 64

# A JSON string literal (unrolled loop: linear time, no backtracking blow-up).
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


class JSONValueError(ValueError):
    """The bytes are not one acceptable JSON value; the message says why (and where, for numbers)."""


class _Bad:
    """Placeholder for a literal Go would refuse (NaN, 1e400, ...): reported with its path."""

    __slots__ = ("literal", "problem")

    def __init__(self, literal: str, problem: str) -> None:
        self.literal = literal if len(literal) <= 40 else literal[:37] + "..."
        self.problem = problem


def _too_deep(text: str, limit: int) -> bool:
    """Does any array/object nest more than ``limit`` deep (brackets inside strings don't count)?"""
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case, decided at C speed
    brackets = _NOT_BRACKET_RE.sub("", _STRING_RE.sub('""', text))
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0) > limit


def _path_of(doc: Any, target: _Bad) -> str:
    """Where ``target`` is in ``doc``, as ``Backend.Routes[2]`` ("" for the top level)."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return ""


def decode_json(raw: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """Decode one JSON value like Go's ``encoding/json`` would accept it, within bounds.

    ``raw``: bytes (UTF-8; invalid sequences become U+FFFD as in Go) or str. Returns dicts, lists,
    str, int, float, bool or None. Raises :class:`JSONValueError` for anything else: not JSON,
    NaN/Infinity, a number out of 64-bit range (message names the field path), nesting deeper than
    ``max_depth``, more than ``max_bytes`` bytes. Never raises RecursionError or OverflowError.
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise JSONValueError(f"value is {size} bytes, more than the {max_bytes} accepted")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if _too_deep(text, max_depth):
        raise JSONValueError(f"arrays/objects nested more than {max_depth} deep")
    bad: list[_Bad] = []

    def parse_int(s: str) -> Any:
        if len(s) <= 18:  # |n| < 10**18 always fits
            return int(s)
        n = int(s) if len(s) <= 40 else None  # bounded work for absurd literals
        if n is not None and _INT_MIN <= n < _INT_LIMIT:
            return n
        bad.append(_Bad(f"number {s}", "is out of range"))
        return bad[-1]

    def parse_float(s: str) -> Any:
        f = float(s)
        if math.isfinite(f):
            return f
        bad.append(_Bad(f"number {s}", "is out of range"))
        return bad[-1]

    def parse_constant(s: str) -> Any:  # NaN, Infinity, -Infinity
        bad.append(_Bad(s, "is not a JSON value"))
        return bad[-1]

    try:
        doc = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except RecursionError:  # unreachable after the depth check; kept as a last line of defence
        raise JSONValueError(f"arrays/objects nested more than {max_depth} deep") from None
    except ValueError as e:  # json.JSONDecodeError and friends
        raise JSONValueError(str(e)) from None
    if bad:
        where = _path_of(doc, bad[0])
        raise JSONValueError(f"{bad[0].literal}{f' in {where}' if where else ''} {bad[0].problem}")
    return doc
