"""Logging for the daemon: one readable line per event by default, one JSON object with a flag.

kafka-python logs every failed connection attempt at ERROR, many times a second while a
broker is away. The daemon says what matters itself ("broker unreachable, retrying in
4s"), so kafka-python's own records are only shown at DEBUG, or when they are CRITICAL.

>>> import io
>>> stream = io.StringIO()
>>> setup_logging("INFO", json_format=True, stream=stream)
>>> logging.getLogger("streamlstm.test").info("hello %s", "world", extra={"events": 3})
>>> record = orjson.loads(stream.getvalue())
>>> record["level"], record["logger"], record["message"], record["events"]
('INFO', 'streamlstm.test', 'hello world', 3)
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class HumanFormatter(logging.Formatter):
    """``2025-01-01 12:00:00.123 INFO  daemon: message``; the package prefix is dropped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-5s %(short)s: %(message)s")
        self.datefmt = "%Y-%m-%d %H:%M:%S"
        self.converter = time.localtime

    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix("streamlstm.")
        return super().format(record)


def setup_logging(
    level: str = "INFO", json_format: bool = False, stream: IO[str] | None = None
) -> None:
    """Configure the root logger once for a command (replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("kafka").setLevel("DEBUG" if level == "DEBUG" else "CRITICAL")
