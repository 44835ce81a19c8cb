"""Log lines for people and for machines: readable text on a terminal, JSON lines otherwise."""

import json
import logging
import os
import time
from typing import IO, Any, Literal

type LogFormat = Literal["auto", "json", "text"]

_STANDARD_RECORD_KEYS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller added to a record with `extra=` (request ids, routes, durations)."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_RECORD_KEYS}


def utc_timestamp(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's time as ISO 8601 UTC with milliseconds."""
    return formatter.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; extra fields of a record become keys."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        line: dict[str, Any] = {
            "ts": utc_timestamp(self, record),
            "level": record.levelname,
            "logger": record.name,
            "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        line.update(record_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """One readable line per record: time, level, logger, message, then the extra fields as key=value."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        extras = " ".join(f"{key}={value}" for key, value in record_fields(record).items())
        line = (f"{utc_timestamp(self, record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
                f"{' ' if extras else ''}{extras}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def formatter_for(log_format: LogFormat, stream: IO[str]) -> logging.Formatter:
    """The formatter `log_format` asks for; `auto` is text when `stream` is a terminal, JSON otherwise."""
    if log_format == "text" or (log_format == "auto" and stream.isatty()):
        return TextFormatter()
    return JsonFormatter()


def configure_logging(level: str, log_format: LogFormat, stream: IO[str]) -> None:
    """Send every log record at `level` or above to `stream` in the chosen format."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(log_format, stream))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
