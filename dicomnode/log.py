"""Logging for journald: one line per event on stderr, ``key=value`` (default) or JSON.

A line in ``kv`` format reads ``2024-05-01T12:00:00.123Z INFO dicomnode.net.scp event=stored
series=1.2.3 size=524288``. Values with spaces, quotes or ``=`` are double-quoted. Patient
identifiers are logged only at DEBUG (callers pass them only in DEBUG events); Python warnings
from libraries, which quote header values, are logged at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dicomnode.config import LoggingConfig

# Marks the handler this module installs, so setup_logging can be called again (tests, demo).
_HANDLER_NAME = "dicomnode-stderr"
_FIELDS_ATTR = "dicomnode_fields"


def format_value(value: Any) -> str:
    """Render one value for a key=value line; quote when it would otherwise be ambiguous."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\t\n\\'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    return text


def format_fields(event_name: str, fields: dict[str, Any]) -> str:
    """``event=NAME key=value ...`` in the given field order."""
    parts = [f"event={format_value(event_name)}"]
    parts.extend(f"{key}={format_value(value)}" for key, value in fields.items())
    return " ".join(parts)


def event(logger: logging.Logger, event: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any) -> None:
    """Log one event as a single ``event=NAME key=value ...`` line (structured fields kept for JSON).

    ``exc_info``: add the exception being handled (an ``exc=`` field in either format).
    """
    if not logger.isEnabledFor(level):
        return
    logger.log(level, format_fields(event, fields), exc_info=exc_info, extra={_FIELDS_ATTR: {"event": event, **fields}},
               stacklevel=2)


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``ts level logger message``; exceptions are folded into one quoted ``exc=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            exc = self.formatException(record.exc_info)
            line += f" exc={format_value(exc)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then the event's fields (or ``msg``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name}
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _LibraryWarningsToDebug(logging.Filter):
    """Python warnings (``py.warnings``) only at DEBUG: pydicom and highdicom quote the values they
    warn about (a one-word PatientName in full, raw header bytes), so at INFO they would leak
    patient identifiers into the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class SkippedOverlapToDebug(logging.Filter):
    """apscheduler's "skipped: maximum number of running instances reached" at DEBUG.

    The node's timers run with ``max_instances=1`` and ``coalesce`` on purpose: a completion check
    still running when the next is due (a busy machine) makes the next one redundant, not late work.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "maximum number of running instances reached" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(cfg: LoggingConfig) -> None:
    """Send all logs to stderr in ``cfg.format`` at ``cfg.level``; idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(cfg.level)
    # Warnings go through logging (not straight to stderr), demoted to DEBUG.
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _LibraryWarningsToDebug) for f in warnings_logger.filters):
        warnings_logger.addFilter(_LibraryWarningsToDebug())
    # pynetdicom logs every PDU at INFO/DEBUG; keep it to warnings unless we debug the node.
    logging.getLogger("pynetdicom").setLevel(logging.INFO if cfg.level == "DEBUG" else logging.WARNING)
    # Alembic narrates every migration step at INFO; an upgrade is worth one line from us, not ten.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # highdicom narrates each output it builds ("copy Patient-related attributes ...", ~37 lines a
    # job) and logs what it coerces with the values (patient identifiers): errors only, unless DEBUG.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if cfg.level == "DEBUG" else logging.ERROR)
    # pydicom warns once per element about source data that breaks a VR rule (a 17-character SH
    # from a modality, say); we pass such values through unchanged, so the lines say nothing new.
    # Its first import resets its logger to WARNING, so import it before setting the level.
    import pydicom.config  # noqa: F401

    logging.getLogger("pydicom").setLevel(logging.DEBUG if cfg.level == "DEBUG" else logging.ERROR)
