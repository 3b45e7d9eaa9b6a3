"""structlog set-up: one event per line on stderr; console on a terminal, logfmt otherwise, or JSON."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(verbosity: int = 0, fmt: str = "auto") -> None:
    """Configure structlog for the daemon: one line per event on stderr, UTC ISO timestamps; level
    debug with ``verbosity`` ≥ 1 (``-v``), else info; ``fmt`` "logfmt", "json", "console" or
    "auto" (console on a terminal, logfmt otherwise)."""
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "logfmt"
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    elif fmt == "console":
        processors += [structlog.dev.ConsoleRenderer(colors=True)]
    else:
        processors += [structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"],
                                                           bool_as_flag=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (grpc, httpx, pyroute2): warnings only, same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "pyroute2", "aetcd"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
