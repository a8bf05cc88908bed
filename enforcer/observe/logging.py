"""Process logging: the ``enforcer`` logger writes one line per event to stderr.

stdout is kept for the flow log, so diagnostics never mix with flow records. Text lines
look like ``2026-11-23T19:50:00.123Z WARNING enforcer.flowlog: message``; with
``json=True`` each line is a JSON object (``ts``, ``level``, ``logger``, ``msg`` and
``exc`` when there is a traceback). Calling ``setup_logging`` again replaces the handler.
"""

from __future__ import annotations

import json as _json
import logging
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


class _UtcFormatter(logging.Formatter):
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self.converter = time.gmtime


class _TextFormatter(_UtcFormatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: fold tracebacks and multi-line messages.
        return super().format(record).replace("\n", "\n    ")


class _JsonFormatter(_UtcFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": self.formatTime(record), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.dumps(out, separators=(",", ":"), default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second call replaces it."""


def setup_logging(level: str = "info", json: bool = False) -> logging.Logger:
    """Configure the ``enforcer`` logger (stderr, one line per event); return it."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})") from None
    logger = logging.getLogger("enforcer")
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False
    return logger
