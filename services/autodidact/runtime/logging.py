"""structlog, configured once per process.

JSON lines when stderr is not a terminal (containers, CI), a readable console
format on one. Context variables (the request id above all) are merged into
every line. Loggers are cached on first use and filter by level without
formatting, as structlog's performance guide recommends.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


class _Stderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured: a
    progress display (progress.py) or a test's capture may replace it meanwhile."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    if json is None:
        json = not sys.stderr.isatty()
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]  # a file in all but name
        cache_logger_on_first_use=True,
    )
