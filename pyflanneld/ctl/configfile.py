"""A network config file written by an operator (JSON or YAML) → upstream's JSON, checked like the daemon.

`config validate` and `config set` accept the config in JSON (what etcd stores) or in YAML (easier to
write by hand and to keep in a repository). The document is turned into compact JSON, which is both
what the daemon's parser (pyflanneld.config.parse_config) checks and what `config set` writes, so
what is validated is byte for byte what is stored.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import Any

import yaml

from ..config import NetworkConfig, parse_config
from ..oneline import one_line

MAX_BYTES = 1 << 20  # a network config is a few hundred bytes; etcd's default request limit is 1.5 MiB
MAX_NODES = 100_000  # values in the document, YAML aliases expanded


class ConfigFileError(ValueError):
    """The file cannot be read as a JSON/YAML document: one line naming where and why."""


def load_document(text: str, source: str) -> Any:
    """The JSON or YAML document in `text` as plain JSON data (dict/list/str/int/float/bool/None).

    JSON is tried first (it is what etcd holds); YAML otherwise, unless `source` ends in `.json`.
    A text that looks like JSON (starts with `{`) but is valid in neither reports the JSON error. Values
    JSON has no type for (YAML dates, binary, sets, non-string keys; numbers out of range such as
    1e400; strings that are not text, such as a lone surrogate escape "\\ud800") are errors naming
    the key path. Raises ConfigFileError."""
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ConfigFileError(f"{source}: the document is nested too deeply") from None
    except ValueError as json_error:
        if source.endswith(".json"):
            raise ConfigFileError(f"{source}: invalid JSON: {json_error}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            if text.lstrip().startswith("{"):
                raise ConfigFileError(f"{source}: invalid JSON: {json_error}") from None
            raise ConfigFileError(f"{source}: invalid YAML: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigFileError(f"{source}: the document is nested too deeply") from None
    return _plain(doc, source)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's problem and where it is, as one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return one_line(f"{problem}{where}")


def _plain(doc: Any, source: str) -> Any:
    """Check that a decoded document is plain JSON data that can be written back as UTF-8 JSON, as a
    copy; raises ConfigFileError naming the key path. YAML aliases are copied, so a document that
    expands past MAX_NODES values (a "billion laughs") or refers to itself is refused instead of
    eating memory."""
    budget = MAX_NODES

    def text(s: str, what: str) -> str:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: "\ud800" in JSON, YAML's double quotes
            raise ConfigFileError(f"{source}: {what} holds {s!r}, which is not text (a lone UTF-16 "
                                  "surrogate); remove it") from None
        return s

    def walk(v: Any, path: str) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ConfigFileError(f"{source}: more than {MAX_NODES} values (YAML aliases expanded); "
                                  "a network config is a few lines")
        here = path or "the document"
        if isinstance(v, str):
            return text(v, here)
        if v is None or isinstance(v, (bool, int)):
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ConfigFileError(f"{source}: {here} is {v!r} (a number out of range), which JSON cannot hold")
            return v
        if isinstance(v, list):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ConfigFileError(f"{source}: key {k!r} in {here} is not a string; quote it")
                text(k, f"a key in {here}")
                name = k if k.isprintable() and k else json.dumps(k)  # the message stays one line
                out[k] = walk(x, f"{path}.{name}" if path else name)
            return out
        kind = "a date/time" if isinstance(v, (datetime.date, datetime.datetime)) else f"a YAML {type(v).__name__}"
        raise ConfigFileError(f"{source}: {here} is {kind}, which JSON has no type for; quote it")

    try:
        return walk(doc, "")
    except RecursionError:
        raise ConfigFileError(f"{source}: the document is nested too deeply (or refers to itself)") from None


def to_json(doc: Any) -> str:
    """Compact JSON, keys in the file's order: what `config set` stores (upstream reads any JSON)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check(raw: str) -> NetworkConfig:
    """Everything flannel checks before using a config, with its texts: upstream's
    CheckNetworkConfig (parse_config, IPv4 and IPv6), then a known backend type that carries the
    config's IP families (pyflanneld.backend.base.check_config, as the daemon). Raises ConfigError."""
    from ..backend.base import check_config  # the registry imports every backend

    cfg = parse_config(raw)
    check_config(cfg)
    return cfg


def read_source(path: str) -> tuple[str, str]:
    """(text, name for messages) of a file path, or of stdin for `-`. Raises ConfigFileError."""
    source = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_BYTES + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigFileError(f"cannot read {source}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise ConfigFileError(f"{source}: larger than {MAX_BYTES} bytes; a network config is a few lines")
    try:
        return data.decode("utf-8-sig"), source
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{source}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def load(text: str, source: str) -> tuple[str, NetworkConfig]:
    """File text → (the JSON to store, the parsed config). Raises ConfigFileError or ConfigError."""
    if not text.strip():
        raise ConfigFileError(f"{source}: empty; write the config there, e.g. Network: 10.5.0.0/16")
    doc = load_document(text, source)
    raw = to_json(doc)
    return raw, check(raw)
