"""Logging setup for every entry point: structlog, JSON lines off a TTY, bound context.

Usage (once, at the top of a ``main``)::

    from pydstack.logs import configure
    configure(level="info")          # JSON when stderr is not a terminal
    log = structlog.get_logger().bind(actor="scheduler")

Context bound with ``structlog.contextvars.bound_contextvars`` (actor, subject, seq,
correlation id) appears in every line logged inside it, including lines from library code.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def configure(
    *, level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog for this process; ``json=None`` means "JSON unless a TTY"."""
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(_LEVELS)}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            # JSON needs the traceback as a string; the console renderer prints it itself.
            *([structlog.processors.format_exc_info] if json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
